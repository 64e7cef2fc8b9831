"""`stage=sft` end to end on tiny configs: learning, outputs, skip counts, curriculum order, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize

from lfm2_train.config import register_configs
from lfm2_train.data.chat_dataset import bundled_rows, save_difficulty
from lfm2_train.engine.distributed import Runtime
from lfm2_train.engine.model_setup import add_embedding_dropout
from lfm2_train.model import LFM2ForCausalLM
from lfm2_train.stages import run_stage
from lfm2_train.stages.sft import build_job
from lfm2_train.tasks import sft_conversations

BASE = ["stage=sft", "logger=disabled", "trainer.progress_bar=false", "data.seq_len=64", "trainer.micro_batch_size=4",
        "stage.bundled_rows=120", "stage.epochs=null", "trainer.max_steps=6", "trainer.eval_every=3",
        "trainer.checkpoint_every=0", "optim.lr=1e-2", "optim.min_lr=1e-3", "optim.warmup_steps=1"]


def _cfg(out: Path, *overrides: str):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train", overrides=[*BASE, f"output_dir={out}", *overrides])


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _chat_file(path: Path) -> Path:
    rows = sft_conversations(60, seed=5)
    rows += [{"messages": [{"role": "user", "content": "no reply"}], "answer": 0, "difficulty": 0.0},
             {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}], "answer": 0,
              "difficulty": 0.0},
             {"messages": [{"role": "user", "content": "7 " * 80}, {"role": "assistant", "content": "7"}],
              "answer": 7, "difficulty": 0.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_tiny_sft_learns_skips_bad_rows_and_writes_an_hf_dir(tmp_path):
    data = _chat_file(tmp_path / "chat.jsonl")
    summary = run_stage(_cfg(tmp_path / "run", f"stage.dataset={data}", f"stage.cache_dir={tmp_path / 'cache'}",
                             "trainer.max_steps=8"))
    assert summary["status"] == "finished" and summary["val_loss"] is not None
    assert summary["skipped"] == {"no_assistant_turn": 1, "too_long": 1, "unknown_role": 1}
    losses = _losses(tmp_path / "run")
    assert losses[8] < losses[1]
    final = Path(summary["final"])
    manifest = json.loads((final / "lfm2_train_manifest.json").read_text())
    inputs = manifest["inputs"]
    assert manifest["stage"] == "sft" and len(inputs["dataset_sha256"]) == 64
    assert inputs["rows"] == 63 and inputs["train_conversations"] + inputs["val_conversations"] == 60
    assert LFM2ForCausalLM.from_pretrained(final).config.vocab_size == 512
    assert (final / "tokenizer.json").is_file()


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    extra = ["stage.embedding_dropout=0.1", "stage.curriculum.source=column", "stage.curriculum.method=buckets",
             "stage.curriculum.n_buckets=3"]
    run_stage(_cfg(tmp_path / "full", *extra))
    part = run_stage(_cfg(tmp_path / "part", *extra, "trainer.stop_after_steps=3"))
    assert part["status"] == "interrupted"
    resumed = run_stage(_cfg(tmp_path / "part", *extra))
    assert resumed["start_step"] == 3 and resumed["status"] == "finished"
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    a = LFM2ForCausalLM.from_pretrained(tmp_path / "full" / "final").state_dict()
    b = LFM2ForCausalLM.from_pretrained(tmp_path / "part" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _sequence_difficulty(job, difficulty: np.ndarray) -> np.ndarray:
    # bundled rows are all usable, so example i is dataset row i
    return difficulty[job.train.sequence]


def test_curriculum_from_column_is_easy_to_hard_every_epoch(tmp_path):
    cfg = _cfg(tmp_path, "stage.curriculum.source=column", "stage.epochs=2", "data.val_fraction=0.1")
    job = build_job(cfg, Runtime())
    diff = np.array(bundled_rows(120, 0).column("difficulty"))
    seq = _sequence_difficulty(job, diff)
    n_train = job.inputs["train_conversations"]
    assert len(seq) == 2 * n_train
    for epoch in (seq[:n_train], seq[n_train:]):
        assert np.all(np.diff(epoch) >= 0)
    assert cfg.trainer.max_steps >= 1 and job.inputs["curriculum"] == {"source": "column", "column": "difficulty"}


def test_curriculum_from_file_and_stale_file_refused(tmp_path):
    data = bundled_rows(120, 0)
    reverse = -np.array(data.column("difficulty"))  # a file that says the opposite of the column
    path = save_difficulty(tmp_path / "d.json", reverse, dataset_fingerprint=data.fingerprint, method="test")
    job = build_job(_cfg(tmp_path, "stage.curriculum.source=file", f"stage.curriculum.file={path}"), Runtime())
    seq = _sequence_difficulty(job, reverse)
    n_train = job.inputs["train_conversations"]
    assert np.all(np.diff(seq[:n_train]) >= 0) and job.inputs["curriculum"]["method"] == "test"
    with pytest.raises(ValueError, match="scored other data"):
        build_job(_cfg(tmp_path, "stage.curriculum.source=file", f"stage.curriculum.file={path}",
                       "stage.bundled_seed=1"), Runtime())
    holes = save_difficulty(tmp_path / "h.json", [None] * 120, dataset_fingerprint=data.fingerprint, method="test")
    with pytest.raises(ValueError, match="120 usable rows have no difficulty"):
        build_job(_cfg(tmp_path, "stage.curriculum.source=file", f"stage.curriculum.file={holes}"), Runtime())


def test_epochs_set_the_number_of_steps(tmp_path):
    cfg = _cfg(tmp_path, "stage.epochs=1", "data.val_fraction=0")
    job = build_job(cfg, Runtime())
    assert len(job.train.sequence) == 120
    rows = 0
    try:
        while True:
            job.train.next_batch(1)
            rows += 1
    except StopIteration:
        pass
    assert cfg.trainer.max_steps == rows // 4


def test_embedding_dropout_only_in_training(tmp_path):
    job = build_job(_cfg(tmp_path, "stage.embedding_dropout=0.5"), Runtime())
    ids = torch.arange(1, 33)[None]
    model = job.model
    model.eval()
    with torch.no_grad():
        a, b = model(ids), model(ids)
        assert torch.equal(a, b)
        model.train()
        assert not torch.allclose(model(ids), a)
    with pytest.raises(ValueError, match="embedding_dropout"):
        add_embedding_dropout(model, 1.0)


@pytest.mark.parametrize("overrides,match", [
    (["data.path=/x"], "stage.dataset"),
    (["stage.curriculum.source=magic"], "stage.curriculum.source"),
    (["stage.curriculum.source=file"], "stage.curriculum.file"),
    (["stage.curriculum.source=column", "stage.curriculum.column=nope"], "no column 'nope'"),
    (["stage.epochs=0"], "stage.epochs"),
])
def test_bad_config_is_named(tmp_path, overrides, match):
    with pytest.raises((ValueError, KeyError), match=match):
        build_job(_cfg(tmp_path, *overrides), Runtime())


def test_all_rows_unusable_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="no usable conversation"):
        build_job(_cfg(tmp_path, f"stage.dataset={path}", f"stage.cache_dir={tmp_path / 'cache'}"), Runtime())


@pytest.mark.slow
def test_pretrain_free_sft_raises_arithmetic_accuracy(tmp_path):
    """Random init -> SFT on bundled one-digit addition -> greedy chat accuracy rises (numbers in docs/SFT.md)."""
    from lfm2_train.engine.model_setup import build_model
    from lfm2_train.evaluation import arithmetic_accuracy
    from lfm2_train.tokenizer import LFM2Tokenizer

    cfg = _cfg(tmp_path, "stage.bundled_rows=600", "stage.bundled_levels=[0]", "stage.epochs=3",
               "trainer.micro_batch_size=16", "trainer.eval_every=0", "optim.warmup_steps=10",
               "optim.lr=5e-3", "optim.min_lr=5e-4")
    torch.manual_seed(cfg.seed)
    before_model = build_model(cfg.model)  # the same initial weights the stage builds from the seed
    summary = run_stage(cfg)
    final = Path(summary["final"])
    tok = LFM2Tokenizer.from_pretrained(final)
    after_model = LFM2ForCausalLM.from_pretrained(final)
    before = arithmetic_accuracy(before_model, tok, n=64, seed=123, levels=(0,))
    after = arithmetic_accuracy(after_model, tok, n=64, seed=123, levels=(0,))
    print(f"arithmetic accuracy (level 0, n=64): before {before['accuracy']:.3f}, after {after['accuracy']:.3f}; "
          f"{summary['steps']} steps, {summary['seconds']}s")
    assert after["accuracy"] > before["accuracy"] and after["accuracy"] >= 0.1
