"""`stage=sft`: supervised fine-tuning on chat data with masked cross-entropy, easy -> hard when asked.

    python -m lfm2_train recipe=sft model.init_from=<pretrain run>/final stage.dataset=chat.jsonl
    python -m lfm2_train recipe=sft stage.curriculum.source=file stage.curriculum.file=difficulty.json

Conversations are rendered with the tokenizer's chat template, labelled only on assistant turns
(`data/chat.py`), and packed whole with document ids (`data/sft_stream.py`), so attention and the
convolution never cross examples. Unusable rows are skipped and counted by reason. The training order is
a curriculum (difficulty from a dataset column or from a file written by `data_pipelines.sft_difficulty`)
or a seeded shuffle, repeated for `stage.epochs`; `data.pacing` applies as in pre-training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..data.chat_sources import open_sft
from ..data.mixed_stream import MixedStream
from ..data.packed import split_documents
from ..data.replay import replay_stream
from ..data.sft_order import curriculum_order, example_sequence, row_difficulty
from ..data.sft_stream import SFTStream
from ..engine.distributed import Runtime, builds_on_meta
from ..engine.model_setup import add_embedding_dropout, build_model, setup_lora
from ..engine.trainer import Trainer, TrainJob
from ..losses import lm_loss
from ..tokenizer import resolve_tokenizer


def build_job(cfg: DictConfig, runtime: Runtime) -> TrainJob:
    stage, data_cfg, t = cfg.stage, cfg.data, cfg.trainer
    model = build_model(cfg.model, meta=builds_on_meta(cfg))
    if data_cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"data.seq_len={data_cfg.seq_len} exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    tokenizer = resolve_tokenizer(stage, cfg.model.init_from)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    data, encoded = open_sft(stage, data_cfg, tokenizer, runtime)  # chat shards: data.path, or stage.dataset cached
    if runtime.is_main:
        print(f"sft: {data.source}: {encoded.describe()}")

    example_difficulty, curriculum = row_difficulty(cfg, data, encoded.row_index)
    order = curriculum_order(example_difficulty, cfg)
    if data.order is not None:  # data.order of data.path's chat shards
        order, curriculum = data.order, data.curriculum
    n = len(encoded.examples)
    train, val = split_documents(n, data_cfg.val_fraction, data_cfg.val_max_documents, data_cfg.seed)
    rows_per_step = t.micro_batch_size * runtime.world_size * t.grad_accum
    # Epochs count passes over the chat data, so replayed pre-training rows add steps rather than remove chat.
    sequence, steps = example_sequence(encoded, train, order, cfg, rows_per_step * (1 - stage.mix_pretrain))
    if steps != t.max_steps:
        if runtime.is_main:
            print(f"sft: stage.epochs={stage.epochs} -> trainer.max_steps={steps}")
        cfg.trainer.max_steps = steps
    lora = setup_lora(model, cfg.model, runtime.device, cfg.seed)
    add_embedding_dropout(model, stage.embedding_dropout)

    val_batches = []
    if len(val) and t.eval_batches:
        val_stream = SFTStream(encoded.examples, val, data_cfg.seq_len, tokenizer.pad_token_id)
        val_batches = val_stream.drain(t.micro_batch_size)[: t.eval_batches]
    inputs: dict[str, Any] = {
        "dataset": data.source, "dataset_sha256": data.fingerprint, "tokenizer_fingerprint": tokenizer.fingerprint(),
        "init_from": cfg.model.init_from, "preset": cfg.model.preset, "rows": encoded.n_rows,
        "skipped": dict(sorted(encoded.skipped.items())), "train_conversations": int(len(train)),
        "val_conversations": int(len(val)), "epochs": stage.epochs, "curriculum": curriculum,
        "embedding_dropout": stage.embedding_dropout, "lora": lora.to_peft_dict() if lora else None,
        "chat_shards": data.inputs,
    }
    train: Any = SFTStream(encoded.examples, sequence, data_cfg.seq_len, tokenizer.pad_token_id)
    if stage.mix_pretrain > 0:
        train = MixedStream(train, replay_stream(cfg, tokenizer, steps * rows_per_step, runtime, inputs),
                            stage.mix_pretrain)
    return TrainJob(model=model, train=train, loss_fn=lm_loss, val_batches=val_batches, tokenizer=tokenizer,
                    inputs=inputs, lora=lora)


def run(cfg: DictConfig) -> dict[str, Any]:
    runtime = Runtime.from_env(cfg.distributed)
    job = build_job(cfg, runtime)
    summary = Trainer(cfg, job, runtime).fit()
    summary["skipped"] = job.inputs["skipped"]
    if runtime.is_main:
        print(f"\nsft: {summary['status']} at step {summary['steps']} ({summary['tokens']} labelled tokens, "
              f"{summary['seconds']}s); train loss {summary.get('loss')}, val loss {summary.get('val_loss')}; "
              f"output {Path(cfg.output_dir)}")
    return summary
