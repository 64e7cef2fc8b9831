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
from lfm2_train.engine.job import build_job
from lfm2_train.engine.trainer import Trainer, TrainingDiverged
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.stages import run_stage
from lfm2_train.tokenizer import train_bpe_tokenizer

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
    # A checkpoint whose tokenizer differs from the dataset's: its ids would mean other text.
    ckpt = tmp_path / "ckpt"
    LFM2ForCausalLM(get_preset("tiny")).save_pretrained(ckpt)
    train_bpe_tokenizer(make_texts(200, seed=9), vocab_size=300).save_pretrained(ckpt)
    with pytest.raises(DataFormatError, match="against model.init_from"):
        run_stage(_cfg(tmp_path / "x", tiny_dataset, f"model.init_from={ckpt}"))
    empty = make_dataset(tmp_path / "empty", [])
    with pytest.raises(DataFormatError, match="holds no documents"):
        run_stage(_cfg(tmp_path / "x", empty))
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_midtrain_requires_and_continues_from_a_pretrain_output(tmp_path, tiny_dataset):
    with pytest.raises(ValueError, match="model.init_from"):
        run_stage(_cfg(tmp_path / "m0", tiny_dataset, "stage=midtrain"))
    first = run_stage(_cfg(tmp_path / "pre", tiny_dataset, "trainer.max_steps=3"))
    mid = run_stage(_cfg(tmp_path / "mid", tiny_dataset, "stage=midtrain", f"model.init_from={first['final']}",
                         "data.seq_len=64", "optim.schedule=decay", "optim.warmup_steps=0", "trainer.max_steps=3"))
    assert mid["status"] == "finished"
    rows = [json.loads(line) for line in (tmp_path / "mid" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == pytest.approx(3e-3)
    # It starts from the pretrained weights, not from scratch: its first loss is below a fresh model's.
    fresh = _losses(tmp_path / "pre")[1]
    assert _losses(tmp_path / "mid")[1] < fresh


def test_moe_training_updates_expert_bias(tmp_path, tiny_dataset):
    summary = run_stage(_cfg(tmp_path, tiny_dataset, "model=tiny-moe", "trainer.max_steps=3"))
    model = LFM2ForCausalLM.from_pretrained(summary["final"])
    biases = [m.expert_bias for m in model.moe_layers()]
    assert biases and all(b.abs().sum() > 0 for b in biases)


def test_activation_checkpointing_changes_nothing_and_bf16_is_close(tmp_path, tiny_dataset):
    run_stage(_cfg(tmp_path / "plain", tiny_dataset, "trainer.max_steps=3"))
    run_stage(_cfg(tmp_path / "ac", tiny_dataset, "trainer.max_steps=3", "trainer.activation_checkpointing=true"))
    assert _losses(tmp_path / "plain") == _losses(tmp_path / "ac")
    run_stage(_cfg(tmp_path / "bf16", tiny_dataset, "trainer.max_steps=3", "trainer.precision=bf16"))
    fp32, bf16 = _losses(tmp_path / "plain"), _losses(tmp_path / "bf16")
    assert all(abs(fp32[s] - bf16[s]) < 0.05 * fp32[s] for s in fp32)
    assert fp32 != bf16  # autocast really ran in bf16


@pytest.mark.slow
def test_torch_compile_matches_eager(tmp_path, tiny_dataset):
    # aot_eager traces through dynamo + AOTAutograd (the wiring under test) without minutes of C++ codegen.
    run_stage(_cfg(tmp_path / "eager", tiny_dataset, "trainer.max_steps=2"))
    run_stage(_cfg(tmp_path / "compiled", tiny_dataset, "trainer.max_steps=2", "trainer.compile=true",
                   "trainer.compile_backend=aot_eager"))
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert all(abs(eager[s] - compiled[s]) < 1e-4 for s in eager)


@pytest.mark.slow
def test_pretrain_without_data_path_trains_on_the_bundled_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("LFM2_TRAIN_CACHE", str(tmp_path / "cache"))
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        default = compose(config_name="lfm2_train", overrides=[])
        cfg = compose(config_name="lfm2_train", overrides=[
            "stage=pretrain", f"output_dir={tmp_path / 'run'}", "logger=disabled", "trainer.progress_bar=false",
            "trainer.max_steps=3", "trainer.eval_every=3", "trainer.eval_batches=2"])
    assert default.stage.name == "chain" and default.stage.chain == "tiny"  # the quick start runs the whole chain
    assert cfg.data.path is None
    summary = run_stage(cfg)
    assert summary["status"] == "finished" and summary["val_loss"] is not None
    assert len(list((tmp_path / "cache").glob("bundled-*/manifest.json"))) == 1


def test_resume_mid_curriculum_continues_in_order(tmp_path, make_dataset, make_texts):
    from lfm2_train.data.format import load_manifest, save_order

    data = make_dataset(tmp_path / "d", make_texts(300, seed=3))
    n = load_manifest(data).num_documents
    save_order(data, "hard_last", np.arange(n)[::-1].copy(), {"method": "test"})
    paced = ["data.order=hard_last", "data.pacing.kind=linear", "data.pacing.start_fraction=0.3",
             "data.pacing.full_at=0.5", "trainer.eval_every=0"]
    run_stage(_cfg(tmp_path / "full", data, *paced))
    run_stage(_cfg(tmp_path / "part", data, *paced, "trainer.stop_after_steps=4"))
    run_stage(_cfg(tmp_path / "part", data, *paced))
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    state = json.loads((tmp_path / "part" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["data"]["cursor"] > 0  # the checkpoint really was taken mid-stream
