"""Pretrain stage end to end on a tiny dataset: determinism, exact resume, signals, NaN policy, bad input."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize
from hydra.errors import ConfigCompositionException

from lfm2_train.config import register_configs
from lfm2_train.data.format import DataFormatError
from lfm2_train.engine.distributed import Runtime
from lfm2_train.engine.trainer import Trainer, TrainingDiverged
from lfm2_train.model import LFM2ForCausalLM
from lfm2_train.stages import run_stage
from lfm2_train.stages.pretrain import build_job

BASE = ["stage=pretrain", "logger=disabled", "trainer.progress_bar=false", "trainer.max_steps=6",
        "trainer.micro_batch_size=4", "data.seq_len=32", "trainer.eval_every=3", "trainer.checkpoint_every=2",
        "optim.warmup_steps=2", "data.verify_hashes=true"]


def _cfg(out: Path, data: Path, *overrides: str):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train",
                       overrides=[*BASE, f"output_dir={out}", f"data.path={data}", *overrides])


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_same_seed_gives_bitwise_identical_losses_and_learns(tmp_path, tiny_dataset):
    a = run_stage(_cfg(tmp_path / "a", tiny_dataset))
    run_stage(_cfg(tmp_path / "b", tiny_dataset))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert a["status"] == "finished" and a["steps"] == 6 and a["val_loss"] is not None
    losses = _losses(tmp_path / "a")
    assert losses[6] < losses[1]
    final = Path(a["final"])
    manifest = json.loads((final / "lfm2_train_manifest.json").read_text())
    assert manifest["inputs"]["manifest_hash"]
    model = LFM2ForCausalLM.from_pretrained(final)
    assert (final / "tokenizer.json").is_file() and model.config.vocab_size == 512


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, tiny_dataset):
    run_stage(_cfg(tmp_path / "full", tiny_dataset))
    part = run_stage(_cfg(tmp_path / "part", tiny_dataset, "trainer.stop_after_steps=3"))
    assert part["status"] == "interrupted" and part["steps"] == 3
    resumed = run_stage(_cfg(tmp_path / "part", tiny_dataset))
    assert resumed["start_step"] == 3 and resumed["status"] == "finished"
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    a = LFM2ForCausalLM.from_pretrained(tmp_path / "full" / "final").state_dict()
    b = LFM2ForCausalLM.from_pretrained(tmp_path / "part" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_writes_a_checkpoint_and_stops(tmp_path, tiny_dataset):
    cfg = _cfg(tmp_path, tiny_dataset, "trainer.checkpoint_every=0")
    job = build_job(cfg, Runtime())
    calls = {"n": 0}
    inner = job.loss_fn

    def loss_then_signal(model, batch):
        calls["n"] += 1
        if calls["n"] == 2 and model.training:
            signal.raise_signal(signal.SIGTERM)
        return inner(model, batch)

    job.loss_fn = loss_then_signal
    summary = Trainer(cfg, job).fit()
    assert summary["status"] == "interrupted" and summary["steps"] == 2
    assert (tmp_path / "checkpoints" / "step-00000002" / "checksums.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_nan_steps_are_skipped_then_stop_naming_the_step(tmp_path, tiny_dataset):
    cfg = _cfg(tmp_path, tiny_dataset, "trainer.max_nan_skips=1", "trainer.eval_every=0")
    job = build_job(cfg, Runtime())
    inner = job.loss_fn
    calls = {"n": 0}

    def sometimes_nan(model, batch):
        calls["n"] += 1
        loss, n = inner(model, batch)
        return (loss * float("nan"), n) if calls["n"] in (2, 4) else (loss, n)

    job.loss_fn = sometimes_nan
    with pytest.warns(UserWarning, match="step 1: non-finite loss"):
        with pytest.raises(TrainingDiverged, match="at step 3"):
            Trainer(cfg, job).fit()


def test_bad_inputs_fail_before_any_step(tmp_path, tiny_dataset, make_dataset, make_texts):
    with pytest.raises(ConfigCompositionException):
        _cfg(tmp_path, tiny_dataset, "trainer.max_stepz=3")
    with pytest.raises(FileNotFoundError, match="data.path"):
        run_stage(_cfg(tmp_path / "x", tmp_path / "missing"))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        run_stage(_cfg(tmp_path / "x", tiny_dataset, "+model.overrides.max_position_embeddings=16"))
    with pytest.raises(DataFormatError, match="embeds only 256"):
        run_stage(_cfg(tmp_path / "x", tiny_dataset, "+model.overrides.vocab_size=256"))
    # A modified shard is caught by its hash.
    copy = make_dataset(tmp_path / "copy", make_texts(50))
    shard = copy / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataFormatError, match="sha256"):
        run_stage(_cfg(tmp_path / "x", copy))
    # Data made with another tokenizer is refused.
    other = make_dataset(tmp_path / "other", make_texts(50))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer_fingerprint"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataFormatError, match="tokenized with tokenizer"):
        run_stage(_cfg(tmp_path / "x", other))
    assert not (tmp_path / "x" / "checkpoints").exists()


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
