"""The LoRA variant of the fine-tune chain: its recipes compose, and the chain runs end to end on a tiny
checkpoint (SFT adapters -> preference adapters on the SFT model -> folded checkpoint -> HF export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose
from omegaconf import OmegaConf

from lfm2_train.chain.spec import load_chain, substitute
from lfm2_train.config import register_configs
from lfm2_train.config.paths import initialize_conf
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.model.peft_io import is_adapter_dir, read_adapter_config
from lfm2_train.stages import run_stage
from lfm2_train.tasks import make_problems, sft_conversations
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

REPO = Path(__file__).resolve().parents[2]
CHAIN = REPO / "recipes" / "finetune_lfm2" / "finetune_lfm2_lora.yaml"
ENV = ("LFM2_CHECKPOINT", "LFM2_SFT_DATA", "LFM2_PAIRS")


def _compose(*overrides: str):
    register_configs()
    with initialize_conf():
        return compose(config_name="lfm2_train", overrides=["output_dir=/tmp/unused", *overrides])


def test_lora_chain_is_valid_and_every_step_composes(monkeypatch, tmp_path):
    for var in ENV:
        monkeypatch.setenv(var, f"/inputs/{var.lower()}")
    spec = load_chain(str(CHAIN))
    assert [s.name for s in spec.steps] == ["sft", "pref", "merged", "export"]
    dirs = {s.name: tmp_path / s.name for s in spec.steps}
    for step in spec.steps:
        if step.stage is None:
            continue
        cfg = _compose(f"stage={step.stage}", *spec.common, *substitute(step.overrides, dirs))
        assert cfg.stage.name == step.stage and not OmegaConf.missing_keys(cfg), step.name
    sft = _compose("stage=sft", *substitute(spec.step("sft").overrides, dirs))
    pref = _compose("stage=preference", *substitute(spec.step("pref").overrides, dirs))
    assert sft.model.lora.r == 16 and pref.model.lora.r == 16 and pref.model.init_from == f"{tmp_path}/sft/final"
    merged = _compose("stage=merge", *substitute(spec.step("merged").overrides, dirs))
    assert merged.stage.merge_adapter == f"{tmp_path}/pref/final" and merged.stage.merge_method is None


@pytest.mark.slow
def test_lora_chain_runs_on_a_tiny_checkpoint(monkeypatch, tmp_path):
    base = tmp_path / "base"
    torch.manual_seed(0)
    LFM2ForCausalLM(get_preset("tiny")).save_pretrained(base)
    LFM2Tokenizer.from_pretrained(tiny_tokenizer_path()).save_pretrained(base)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in sft_conversations(80, seed=0)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p.question}],
                                         "chosen": [{"role": "assistant", "content": p.solution}],
                                         "rejected": [{"role": "assistant", "content": f"Answer: {p.answer + 1}"}]})
                             + "\n" for p in make_problems(24, seed=1, levels=(0,))))
    for var, value in zip(ENV, (base, chat, pairs)):
        monkeypatch.setenv(var, str(value))
    # the packaged chain, made tiny: short rows, fp32 on CPU, a few steps
    raw = yaml.safe_load(CHAIN.read_text())
    small = ["data.seq_len=64", "trainer.precision=fp32", "trainer.micro_batch_size=4", "trainer.grad_accum=1",
             "stage.epochs=null", "trainer.max_steps=3", "trainer.eval_every=0", "optim.warmup_steps=1",
             "trainer.progress_bar=false", "logger=disabled", "model.lora.r=4", "model.lora.lora_alpha=8"]
    for step in raw["steps"]:
        if step.get("stage") in ("sft", "preference"):
            step["overrides"] += small
    chain = tmp_path / "chain.yaml"
    chain.write_text(yaml.safe_dump(raw))
    register_configs()
    with initialize_conf():
        cfg = compose(config_name="lfm2_train", overrides=[
            "stage=chain", f"stage.chain={chain}", f"stage.workdir={tmp_path / 'work'}", "logger=disabled",
            f"output_dir={tmp_path / 'out'}"])
    run_stage(cfg)
    work = tmp_path / "work"
    sft, pref, merged, export = (next(work.glob(f"*-{name}")) for name in ("sft", "pref", "merged", "export"))
    assert is_adapter_dir(sft / "final") and is_adapter_dir(pref / "final")
    assert read_adapter_config(pref / "final").base_model_name_or_path == str((sft / "final").resolve())
    model = LFM2ForCausalLM.from_pretrained(export / "model")
    assert model.config.vocab_size == 512 and (export / "model" / "tokenizer.json").is_file()
    assert (export / "model-q8_0.gguf").is_file()
