"""Pre-training rows replayed during fine-tuning (`stage.mix_pretrain`), so the model keeps its language
modelling: the training split of a token dataset, read in a seeded shuffle."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..tokenizer import LFM2Tokenizer, model_tokenizer_dir
from .format import ShardReader, check_compatible, load_manifest
from .pacing import PacingConfig
from .packed import DocumentStream, split_documents
from .resolve import resolve_dataset
from .training_sequence import training_sequence


def replay_stream(cfg: DictConfig, tokenizer: LFM2Tokenizer, total_rows: int, runtime: Any,
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
