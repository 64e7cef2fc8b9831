"""`stage=preference` on a tiny model: learns to separate pairs, reuses the reference cache, refuses bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize

from lfm2_train.config import register_configs
from lfm2_train.data.ref_logps import StaleCacheError
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.stages import run_stage
from lfm2_train.tasks import make_problems
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

BASE = ["stage=preference", "logger=disabled", "trainer.progress_bar=false", "trainer.micro_batch_size=4",
        "trainer.eval_every=0", "trainer.checkpoint_every=0", "optim.lr=2e-3", "optim.min_lr=2e-4",
        "optim.warmup_steps=0", "stage.beta=0.5", "data.seq_len=64", "data.val_fraction=0.2",
        "stage.epochs=null", "trainer.max_steps=8"]


def _cfg(out: Path, *overrides: str):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train", overrides=[*BASE, f"output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft") / "final"
    torch.manual_seed(0)
    LFM2ForCausalLM(get_preset("tiny")).save_pretrained(out)
    LFM2Tokenizer.from_pretrained(tiny_tokenizer_path()).save_pretrained(out)
    return out


def _write_pairs(path: Path, n: int = 20) -> Path:
    rows = []
    for p in make_problems(n, seed=1, levels=(0,)):
        rows.append({"prompt": [{"role": "user", "content": p.question}],
                     "chosen": [{"role": "assistant", "content": p.solution}],
                     "rejected": [{"role": "assistant", "content": f"Answer: {p.answer + 3}"}]})
    rows.append({"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"})  # identical: skipped
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
def test_trains_reuses_the_reference_cache_and_exports(tmp_path, sft_dir, reference_loads):
    pairs = _write_pairs(tmp_path / "pairs.jsonl")
    calls = reference_loads
    common = [f"model.init_from={sft_dir}", f"stage.dataset={pairs}", f"stage.ref_cache={tmp_path / 'ref'}",
              "stage.losses=[{name: ln_dpo, weight: 1.0}, {name: apo_zero, weight: 0.5, length_normalize: true}]"]
    a = run_stage(_cfg(tmp_path / "a", *common))
    assert calls["n"] == 1 and a["ref_cache"]["status"] == "computed"
    assert a["status"] == "finished" and a["steps"] == 8 and a["skipped"] == {"identical": 1}
    rows = _losses(tmp_path / "a")
    # step 1 is scored before any update: policy == reference, so every reward is 0
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert rows[0]["loss_ln_dpo"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[0]["loss_ln_apo_zero"] == pytest.approx(1.0, abs=1e-4)
    assert {"reward_chosen", "reward_rejected", "accuracy", "lr", "grad_norm"} <= set(rows[0])
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert a["train_pairs"]["accuracy"] > 0.5 and a["train_pairs"]["reward_margin"] > 0
    assert "val_pairs" in a

    b = run_stage(_cfg(tmp_path / "b", *common))  # second run: the cache matches, pi_ref is never built
    assert calls["n"] == 1 and b["ref_cache"]["status"] == "hit"
    assert [r["loss"] for r in _losses(tmp_path / "b")] == [r["loss"] for r in rows]

    final = Path(a["final"])
    manifest = json.loads((final / "lfm2_train_manifest.json").read_text())
    inputs = manifest["inputs"]
    assert manifest["stage"] == "preference" and inputs["train_pairs"] + inputs["val_pairs"] == 20
    assert inputs["pairs_hash"] and inputs["reference_weights_sha256"] and inputs["reference"] == str(sft_dir)
    assert [t["name"] for t in inputs["losses"]] == ["ln_dpo", "apo_zero"]
    assert LFM2ForCausalLM.from_pretrained(final).config.vocab_size == 512


def test_epochs_set_the_steps_and_bad_input_is_refused(tmp_path, sft_dir):
    pairs = _write_pairs(tmp_path / "pairs.jsonl")
    cfg = _cfg(tmp_path / "e", f"model.init_from={sft_dir}", f"stage.dataset={pairs}", "stage.epochs=0.5",
               f"stage.ref_cache={tmp_path / 'ref'}", "trainer.eval_every=0")
    out = run_stage(cfg)
    assert out["steps"] == 2  # floor(0.5 * 16 train pairs / 4 per step)

    with pytest.raises(ValueError, match="needs pi_ref"):
        run_stage(_cfg(tmp_path / "x", f"stage.dataset={pairs}"))
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}) + "\n")
    with pytest.raises(ValueError, match="no usable preference pair.*identical=1"):
        run_stage(_cfg(tmp_path / "y", f"model.init_from={sft_dir}", f"stage.dataset={only_bad}"))
    with pytest.raises(ValueError, match="unknown"):
        run_stage(_cfg(tmp_path / "z", f"model.init_from={sft_dir}", f"stage.dataset={pairs}",
                       "stage.losses=[{name: kto}]"))
    other_ref = tmp_path / "other_ref"
    torch.manual_seed(5)
    LFM2ForCausalLM(get_preset("tiny")).save_pretrained(other_ref)
    with pytest.raises(StaleCacheError, match="reference_weights_sha256"):
        run_stage(_cfg(tmp_path / "w", f"model.init_from={sft_dir}", f"stage.dataset={pairs}",
                       f"stage.reference={other_ref}", f"stage.ref_cache={tmp_path / 'ref'}"))


def test_reference_free_simpo_needs_no_reference(tmp_path):
    pairs = _write_pairs(tmp_path / "pairs.jsonl", n=8)
    out = run_stage(_cfg(tmp_path / "s", f"stage.dataset={pairs}", "stage.losses=[{name: simpo}]", "stage.margin=0.1",
                         "trainer.max_steps=2", "data.val_fraction=0"))
    assert out["status"] == "finished" and out["ref_cache"]["status"].startswith("not needed")
    assert "loss_simpo" in _losses(tmp_path / "s")[0]
