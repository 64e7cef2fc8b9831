"""The language-modelling job builder: it reads the documents in the dataset's curriculum order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hydra import compose, initialize

from lfm2_train.config import register_configs
from lfm2_train.engine.distributed import Runtime
from lfm2_train.engine.job import build_job

BASE = ["stage=pretrain", "logger=disabled", "trainer.progress_bar=false", "trainer.max_steps=6",
        "trainer.micro_batch_size=4", "data.seq_len=32", "trainer.eval_every=3", "trainer.checkpoint_every=2",
        "optim.warmup_steps=2", "data.verify_hashes=true"]


def _cfg(out: Path, data: Path, *overrides: str):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train",
                       overrides=[*BASE, f"output_dir={out}", f"data.path={data}", *overrides])


def test_curriculum_order_is_followed(tmp_path, make_dataset, make_texts):
    from lfm2_train.data.format import ShardReader, load_manifest, save_order

    data = make_dataset(tmp_path / "d", make_texts(120))
    n = load_manifest(data).num_documents
    order = np.arange(n)[::-1].copy()
    save_order(data, "rev", order, {"method": "test"})
    cfg = _cfg(tmp_path / "o", data, "data.order=rev", "data.val_fraction=0")
    job = build_job(cfg, Runtime())
    first = job.train.next_batch(1)["input_ids"][0]
    reader = ShardReader(data)
    assert first[: len(reader.document(n - 1))].tolist() == reader.document(n - 1).tolist()
