"""`stage=preference` with TRL's names, the trl_compatible conventions and LD-DPO (a two-step run, tiny model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize

from lfm2_train.config import register_configs
from lfm2_train.engine.distributed import Runtime
from lfm2_train.losses.preference import pair_logps_split
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.stages import run_stage
from lfm2_train.stages.preference import build_job
from lfm2_train.tasks import make_problems
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

BASE = ["stage=preference", "logger=disabled", "trainer.progress_bar=false", "trainer.micro_batch_size=4",
        "trainer.eval_every=0", "trainer.checkpoint_every=0", "optim.lr=2e-3", "optim.warmup_steps=0",
        "stage.beta=0.5", "data.seq_len=64", "data.val_fraction=0", "stage.epochs=null", "trainer.max_steps=2"]


def _cfg(out: Path, *overrides: str):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train", overrides=[*BASE, f"output_dir={out}", *overrides])


def test_ld_dpo_with_trl_conventions_runs_and_its_reference_tails_match_the_policy_at_step_0(tmp_path):
    sft = tmp_path / "sft"
    torch.manual_seed(0)
    LFM2ForCausalLM(get_preset("tiny")).save_pretrained(sft)
    LFM2Tokenizer.from_pretrained(tiny_tokenizer_path()).save_pretrained(sft)
    rows = [{"prompt": p.question, "chosen": p.solution, "rejected": f"Answer: {p.answer + 3} (sure)"}
            for p in make_problems(8, seed=1, levels=(0,))]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"model.init_from={sft}", f"stage.dataset={pairs}", f"stage.ref_cache={tmp_path / 'ref'}",
                 "stage.conventions=trl_compatible", "stage.ld_alpha=0.5",
                 "stage.losses=[{name: sigmoid, weight: 1.0}, {name: ipo, weight: 0.5}, {name: sft, weight: 0.2}]"]

    cfg = _cfg(tmp_path / "job", *overrides)
    job, pair_loss, probe = build_job(cfg, Runtime.from_env(cfg.distributed))
    assert job.inputs["conventions"] == "trl_compatible" and job.inputs["nll_reduction"] == "token"
    assert job.inputs["losses"][1] == {"name": "ipo", "weight": 0.5, "length_normalize": True}
    batch = probe[0]
    assert batch["ref_logps"].shape == (batch["input_ids"].shape[0], 2, 2)
    with torch.no_grad():  # the policy is pi_ref: the cached totals and tails are its own
        logps, lengths, tails = pair_logps_split(job.model.eval(), batch)
    assert (lengths[:, 0] != lengths[:, 1]).all() and (tails != 0).any()
    assert torch.allclose(batch["ref_logps"][..., 0], logps, atol=1e-4)
    assert torch.allclose(batch["ref_logps"][..., 1], tails, atol=1e-4)

    out = run_stage(_cfg(tmp_path / "run", *overrides))
    assert out["status"] == "finished" and (tmp_path / "ref" / "ld_shared").is_dir()
    first = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line][0]
    assert first["loss_sigmoid"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["loss_ln_ipo"] == pytest.approx(1.0, abs=1e-4)  # (0 - 1 / (2 beta))^2 at beta = 0.5
    assert first["loss_sft"] > 0 and first["reward_margin"] == pytest.approx(0.0, abs=1e-4)
