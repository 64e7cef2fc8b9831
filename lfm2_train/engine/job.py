"""The language-modelling training job: token shards in curriculum (or shuffled) order, packed into rows,
with the model, the loss and the held-out validation batches the trainer needs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..data.format import DataFormatError, ShardReader, check_compatible, load_manifest, load_order, verify_shards
from ..data.pacing import PacingConfig
from ..data.packed import DocumentStream, split_documents
from ..data.resolve import resolve_dataset
from ..data.training_sequence import training_sequence
from ..hints import needs
from ..losses import lm_loss
from ..model import LFM2Config
from ..tokenizer import LFM2Tokenizer
from .distributed import Runtime, builds_on_meta
from .model_setup import build_model, model_config
from .trainer import TrainJob


def build_job(cfg: DictConfig, runtime: Runtime) -> TrainJob:
    """The next-token-prediction job on token shards (`stage=pretrain` / `midtrain`; distillation and the
    architecture search's proxy runs add to it). Everything that can refuse the data is checked before the
    model is built: hashes, tokenizer fingerprints (the dataset's and `model.init_from`'s), vocabulary size."""
    data = cfg.data
    if cfg.stage.name == "midtrain" and not cfg.model.init_from:
        raise ValueError(needs("midtrain", "model.init_from=<pretrain run>/final (it continues a pre-training run)"))
    dataset_dir, tokenizer_dir = resolve_dataset(data, runtime)
    manifest = load_manifest(dataset_dir)
    chat = manifest.extra.get("chat")
    if chat is not None:  # conversations with label masks: packed as plain documents they would lose both
        raise DataFormatError(f"data.path={dataset_dir} holds {chat.get('kind', 'chat')} chat shards "
                              f"(data_pipelines.chat_shards) for stage={chat.get('kind', 'sft')}; stage="
                              f"{cfg.stage.name} reads token shards written by data_pipelines.tokenize")
    if data.verify_hashes:
        verify_shards(dataset_dir, manifest)
    tokenizer = LFM2Tokenizer.from_pretrained(tokenizer_dir)
    init_tok = Path(cfg.model.init_from or "") / "tokenizer.json"
    if cfg.model.init_from and init_tok.is_file():  # the checkpoint's ids must mean what the dataset's ids mean
        check_compatible(manifest, tokenizer_fingerprint=LFM2Tokenizer.from_pretrained(init_tok.parent).fingerprint(),
                         vocab_size=None, source=f"{dataset_dir} (against model.init_from={cfg.model.init_from})")
    # Checked on the config, before a (possibly multi-GB) model is built.
    vocab = (LFM2Config.from_json_file(Path(cfg.model.init_from) / "config.json") if cfg.model.init_from
             else model_config(cfg.model)).vocab_size
    check_compatible(manifest, tokenizer_fingerprint=tokenizer.fingerprint(), vocab_size=vocab,
                     source=str(dataset_dir))
    model = build_model(cfg.model, meta=builds_on_meta(cfg))
    if data.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"data.seq_len={data.seq_len} exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    reader = ShardReader(dataset_dir, manifest)
    if len(reader) == 0:
        raise DataFormatError(f"{dataset_dir} holds no documents")

    train_docs, val_docs = split_documents(len(reader), data.val_fraction, data.val_max_documents, data.seed)
    t = cfg.trainer
    rows_per_step = t.micro_batch_size * runtime.world_size * t.grad_accum
    lengths = reader.doc_lengths()
    mean_len = float(lengths[train_docs].mean())
    n_samples = math.ceil(1.25 * t.max_steps * rows_per_step * data.seq_len / mean_len) + rows_per_step
    base_order = None
    if data.order:
        base_order, _ = load_order(dataset_dir, data.order, manifest)
    pacing = PacingConfig.from_dict(OmegaConf.to_container(data.pacing, resolve=True))
    sequence = training_sequence(train_docs, base_order, pacing, n_samples, data.seed)
    train = DocumentStream(reader, sequence, data.seq_len)

    val_batches = []
    if len(val_docs) and t.eval_batches:
        val_batches = DocumentStream(reader, val_docs, data.seq_len).drain(t.micro_batch_size)[: t.eval_batches]
    inputs: dict[str, Any] = {"dataset": str(dataset_dir), "manifest_hash": manifest.hash(),
                              "tokenizer_fingerprint": tokenizer.fingerprint(), "order": data.order,
                              "init_from": cfg.model.init_from, "preset": cfg.model.preset,
                              "train_documents": int(len(train_docs)), "val_documents": int(len(val_docs))}
    return TrainJob(model=model, train=train, loss_fn=lm_loss, val_batches=val_batches, tokenizer=tokenizer,
                    inputs=inputs)
