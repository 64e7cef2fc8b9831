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

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ..data.chat_dataset import ChatRows, EncodedRows, load_difficulty
from ..data.chat_sources import open_sft
from ..data.format import ShardReader, check_compatible, load_manifest
from ..data.mixed_stream import MixedStream
from ..data.pacing import PacingConfig
from ..data.packed import DocumentStream, split_documents
from ..data.sft_stream import SFTStream, count_rows, positions_needed
from ..engine.distributed import Runtime, builds_on_meta
from ..engine.trainer import Trainer, TrainJob
from ..losses import lm_loss
from ..model import LFM2ForCausalLM
from ..tokenizer import LFM2Tokenizer, tiny_tokenizer_path
from .common import build_model, model_tokenizer_dir, resolve_dataset, setup_lora
from .pretrain import training_sequence

CURRICULUM_SOURCES = ("none", "column", "file")


def resolve_tokenizer(stage: DictConfig, init_from: str | None) -> LFM2Tokenizer:
    """`stage.tokenizer`, else the tokenizer saved with `model.init_from`, else the bundled tiny one."""
    if stage.tokenizer:
        return LFM2Tokenizer.from_pretrained(stage.tokenizer)
    if init_from and (Path(init_from) / "tokenizer.json").is_file():
        return LFM2Tokenizer.from_pretrained(init_from)
    return LFM2Tokenizer.from_pretrained(tiny_tokenizer_path())


def row_difficulty(cfg: DictConfig, data: ChatRows) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Per-row difficulty (higher = harder) from the configured source, with what to record about it."""
    cur = cfg.stage.curriculum
    if cur.source not in CURRICULUM_SOURCES:
        raise ValueError(f"stage.curriculum.source={cur.source!r}; choose one of {list(CURRICULUM_SOURCES)}")
    if cur.source == "none":
        return None, {"source": "none"}
    if cur.source == "column":
        try:
            values = np.array(data.column(cur.column), dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"stage.curriculum.column={cur.column!r}: values are not numbers ({err})") from err
        return values, {"source": "column", "column": cur.column}
    if not cur.file:
        raise ValueError("stage.curriculum.source=file needs stage.curriculum.file=<difficulty file>")
    values, header = load_difficulty(cur.file, dataset_fingerprint=data.fingerprint, n_rows=len(data),
                                     require_complete=False)  # only the usable rows need a value
    return values, {"source": "file", "file": str(cur.file), "method": header["method"],
                    "file_sha256": _sha256(Path(cur.file))}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def curriculum_order(difficulty: np.ndarray | None, cfg: DictConfig) -> np.ndarray | None:
    """Example indices easy -> hard (None without a curriculum), via the pre-training curriculum's methods."""
    if difficulty is None:
        return None
    from data_pipelines.curriculum import build_order

    cur = cfg.stage.curriculum
    if cur.method not in ("sort", "buckets"):
        raise ValueError(f"stage.curriculum.method={cur.method!r}; choose sort or buckets")
    return build_order(cur.method, difficulty, len(difficulty), n_buckets=cur.n_buckets, seed=cfg.data.seed)


def example_sequence(encoded: EncodedRows, train: np.ndarray, order: np.ndarray | None, cfg: DictConfig,
                     rows_per_step: float) -> tuple[np.ndarray, int]:
    """(the examples the run reads, in order; the number of optimizer steps).

    With `stage.epochs` the sequence is that many passes and the steps are the full steps it packs into;
    otherwise `trainer.max_steps` decides and the passes repeat until the sequence is long enough.
    `rows_per_step` counts chat rows only (fractional when pre-training rows are mixed in).
    """
    pacing = PacingConfig.from_dict(OmegaConf.to_container(cfg.data.pacing, resolve=True))
    seq_len, seed = cfg.data.seq_len, cfg.data.seed
    lengths = np.array([positions_needed(e) for e in encoded.examples])

    def build(n_samples: int) -> tuple[np.ndarray, int]:
        seq = training_sequence(train, order, pacing, n_samples, seed)
        return seq, count_rows(lengths[seq], seq_len)

    epochs = cfg.stage.epochs
    if epochs is not None:
        if epochs <= 0:
            raise ValueError(f"stage.epochs={epochs} must be > 0 (or null to let trainer.max_steps decide)")
        seq, rows = build(max(1, math.ceil(epochs * len(train))))
        steps = int(rows // rows_per_step)
        if steps < 1:
            raise ValueError(f"stage.epochs={epochs} over {len(train)} training conversations packs into {rows} "
                             f"rows, fewer than one step needs ({rows_per_step:g}); add data or epochs")
        return seq, steps
    steps = cfg.trainer.max_steps
    need = math.ceil(steps * rows_per_step)
    n_samples = math.ceil(1.25 * need * seq_len / max(float(lengths[train].mean()), 1.0)) + math.ceil(rows_per_step)
    seq, rows = build(n_samples)
    while rows < need:
        n_samples *= 2
        seq, rows = build(n_samples)
    return seq, steps


def add_embedding_dropout(model: LFM2ForCausalLM, p: float) -> torch.utils.hooks.RemovableHandle | None:
    """Dropout on the token-embedding output, applied from outside: the model code stays dropout-free."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"stage.embedding_dropout={p} must be in [0, 1)")
    if p == 0.0:
        return None

    def hook(module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return F.dropout(output, p=p, training=module.training)  # (B, T, d)

    return model.model.embed_tokens.register_forward_hook(hook)


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

    difficulty, curriculum = row_difficulty(cfg, data)
    example_difficulty = difficulty[encoded.row_index] if difficulty is not None else None
    if example_difficulty is not None and np.isnan(example_difficulty).any():
        missing = encoded.row_index[np.isnan(example_difficulty)]
        raise ValueError(f"curriculum ({curriculum}): {len(missing)} usable rows have no difficulty "
                         f"(first: row {int(missing[0])}); score them or predict them with method=classifier")
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


def replay_stream(cfg: DictConfig, tokenizer: LFM2Tokenizer, total_rows: int, runtime: Runtime,
                  inputs: dict[str, Any]) -> DocumentStream:
    """Pre-training rows to mix in: the training split of `stage.mix_data` (its held-out documents stay
    held out, so a held-out LM loss on that dataset measures what the mix preserved), seeded shuffle."""
    stage, data_cfg = cfg.stage, cfg.data
    mix_cfg = OmegaConf.create({"path": stage.mix_data, "tokenizer": None})
    dataset_dir, _ = resolve_dataset(mix_cfg, runtime, tokenizer=model_tokenizer_dir(cfg.model.init_from))
    manifest = load_manifest(dataset_dir)
    check_compatible(manifest, tokenizer_fingerprint=tokenizer.fingerprint(), vocab_size=None,
                     source=f"stage.mix_data={dataset_dir}")
    reader = ShardReader(dataset_dir, manifest)
    train_docs, _ = split_documents(len(reader), data_cfg.val_fraction, data_cfg.val_max_documents, data_cfg.seed)
    rows = math.ceil(total_rows * stage.mix_pretrain) + 1
    mean_len = float(reader.doc_lengths()[train_docs].mean())
    n_docs = math.ceil(1.25 * rows * data_cfg.seq_len / mean_len) + 1
    sequence = training_sequence(train_docs, None, PacingConfig(), n_docs, data_cfg.seed)
    inputs["mix_pretrain"] = {"fraction": stage.mix_pretrain, "dataset": str(dataset_dir),
                              "manifest_hash": manifest.hash()}
    return DocumentStream(reader, sequence, data_cfg.seq_len)


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
