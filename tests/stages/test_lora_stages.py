"""LoRA in `stage=sft` and `stage=preference` on a tiny model: adapter-only checkpoints and outputs, a frozen
base, exact resume, the base-as-reference with the reference cache keyed on the base weights, and the
refusals (QLoRA on CPU, DeepSpeed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize
from safetensors import safe_open
from torch.distributed.checkpoint import FileSystemReader

from lfm2_train.config import register_configs
from lfm2_train.engine.distributed import Runtime
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.model.lora import lora_state_dict
from lfm2_train.model.peft_io import is_adapter_dir, load_model, read_adapter_config, read_adapter_state
from lfm2_train.model.qlora import QLoRAUnavailable
from lfm2_train.stages import run_stage
from lfm2_train.stages.sft import build_job
from lfm2_train.tasks import make_problems
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

SFT = ["stage=sft", "logger=disabled", "trainer.progress_bar=false", "data.seq_len=64", "trainer.micro_batch_size=4",
       "stage.bundled_rows=120", "stage.epochs=null", "trainer.max_steps=6", "trainer.eval_every=3",
       "trainer.checkpoint_every=0", "optim.lr=1e-2", "optim.min_lr=1e-3", "optim.warmup_steps=1",
       "model.lora.r=4", "model.lora.lora_alpha=8"]
PREF = ["stage=preference", "logger=disabled", "trainer.progress_bar=false", "trainer.micro_batch_size=4",
        "trainer.eval_every=0", "trainer.checkpoint_every=0", "optim.lr=1e-2", "optim.min_lr=1e-3",
        "optim.warmup_steps=0", "stage.beta=0.5", "data.seq_len=64", "data.val_fraction=0.2", "stage.epochs=null",
        "trainer.max_steps=4", "optim.weight_decay=0"]


def _cfg(out: Path, base: list[str], *overrides: str):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train", overrides=[*base, f"output_dir={out}", *overrides])


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "final"
    torch.manual_seed(0)
    LFM2ForCausalLM(get_preset("tiny")).save_pretrained(out)
    LFM2Tokenizer.from_pretrained(tiny_tokenizer_path()).save_pretrained(out)
    return out


def _pairs(path: Path, n: int = 20) -> Path:
    rows = [{"prompt": [{"role": "user", "content": p.question}],
             "chosen": [{"role": "assistant", "content": p.solution}],
             "rejected": [{"role": "assistant", "content": f"Answer: {p.answer + 3}"}]}
            for p in make_problems(n, seed=1, levels=(0,))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_job_freezes_the_base_and_optimises_only_adapters(tmp_path, base_dir):
    job = build_job(_cfg(tmp_path, SFT, f"model.init_from={base_dir}", "model.lora.target_modules=[q_proj,w2]"),
                    Runtime())
    trainable = {n for n, p in job.model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(job.model))
    assert trainable and all(n.endswith(("q_proj.lora_A.weight", "q_proj.lora_B.weight", "w2.lora_A.weight",
                                         "w2.lora_B.weight")) for n in trainable)
    assert job.lora is not None and job.lora.base_model_name_or_path == str(base_dir.resolve())
    assert job.inputs["lora"]["r"] == 4


def test_sft_lora_trains_writes_a_peft_adapter_and_leaves_the_base(tmp_path, base_dir):
    summary = run_stage(_cfg(tmp_path / "run", SFT, f"model.init_from={base_dir}", "trainer.checkpoint_every=3"))
    losses = _losses(tmp_path / "run")
    assert summary["status"] == "finished" and losses[6] < losses[1]
    final = Path(summary["final"])
    assert is_adapter_dir(final) and not (final / "model.safetensors").exists()
    assert (final / "tokenizer.json").is_file()
    assert read_adapter_config(final).base_model_name_or_path == str(base_dir.resolve())
    with safe_open(str(final / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("base_model.model.model.layers.") and ".lora_" in k for k in keys)
    # checkpoints hold the adapter and an optimizer over adapter tensors only
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003"
    stored = list(FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata)
    model_keys = [k for k in stored if k.startswith("model.")]
    optim_tensors = {k.rsplit(".", 1)[0] for k in stored if k.startswith("optim.state.")}
    n_adapter = len(read_adapter_state(final))
    assert len(model_keys) == n_adapter and all(".lora_" in k for k in model_keys)
    assert len(optim_tensors) == n_adapter and all(".lora_" in k for k in optim_tensors)
    # the folded model = base + adapter, and it differs from the untouched base
    folded, base = load_model(final).eval(), LFM2ForCausalLM.from_pretrained(base_dir).eval()
    x = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (folded(x) - base(x)).abs().max() > 1e-3


@pytest.mark.slow
def test_sft_lora_resume_equals_uninterrupted(tmp_path, base_dir):
    extra = [f"model.init_from={base_dir}", "model.lora.lora_dropout=0.1", "stage.embedding_dropout=0.1"]
    run_stage(_cfg(tmp_path / "full", SFT, *extra))
    part = run_stage(_cfg(tmp_path / "part", SFT, *extra, "trainer.stop_after_steps=3"))
    assert part["status"] == "interrupted"
    resumed = run_stage(_cfg(tmp_path / "part", SFT, *extra))
    assert resumed["start_step"] == 3 and resumed["status"] == "finished"
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    a = read_adapter_state(tmp_path / "full" / "final")
    b = read_adapter_state(tmp_path / "part" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_preference_lora_uses_the_base_as_reference_and_shares_its_cache(tmp_path, base_dir, reference_loads):
    pairs = _pairs(tmp_path / "pairs.jsonl")
    common = [f"stage.dataset={pairs}", f"stage.ref_cache={tmp_path / 'ref'}"]
    a = run_stage(_cfg(tmp_path / "lora", PREF, *common, f"model.init_from={base_dir}", "model.lora.r=4"))
    assert reference_loads["n"] == 0  # pi_ref = the policy with its adapters disabled: no second model
    assert a["ref_cache"]["status"] == "computed" and a["status"] == "finished"
    rows = [json.loads(line) for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)  # adapters start at zero: policy == pi_ref
    assert rows[-1]["loss"] < rows[0]["loss"] and a["train_pairs"]["reward_margin"] > 0
    assert is_adapter_dir(a["final"])
    # the cache is keyed on the base weights: a full fine-tuning run from the same base hits it
    b = run_stage(_cfg(tmp_path / "full", PREF, *common, f"model.init_from={base_dir}", "trainer.max_steps=1"))
    assert b["ref_cache"]["status"] == "hit" and reference_loads["n"] == 0
    first = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-5)  # cached values == the base's log-probs


@pytest.mark.slow
def test_preference_lora_on_an_sft_adapter(tmp_path, base_dir):
    """init_from = an SFT-LoRA output: the policy is base + SFT adapter folded, plus new adapters; pi_ref is
    that folded SFT model (adapters disabled), and the cache key covers base and SFT adapter."""
    sft = run_stage(_cfg(tmp_path / "sft", SFT, f"model.init_from={base_dir}", "trainer.max_steps=2"))
    pairs = _pairs(tmp_path / "pairs.jsonl")
    pref = run_stage(_cfg(tmp_path / "pref", PREF, f"stage.dataset={pairs}", f"stage.ref_cache={tmp_path / 'r'}",
                          f"model.init_from={sft['final']}", "model.lora.r=2", "trainer.max_steps=2"))
    rows = [json.loads(line) for line in (tmp_path / "pref" / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert read_adapter_config(pref["final"]).base_model_name_or_path == str(Path(sft["final"]).resolve())
    # the whole stack resolves: base <- SFT adapter <- preference adapter
    model = load_model(pref["final"])
    assert not lora_state_dict(model)


def test_continue_training_a_given_adapter(tmp_path, base_dir):
    sft = run_stage(_cfg(tmp_path / "a", SFT, f"model.init_from={base_dir}", "trainer.max_steps=2"))
    job = build_job(_cfg(tmp_path / "b", SFT, f"model.init_from={base_dir}", "model.lora.r=0",
                         f"model.lora.adapter={sft['final']}"), Runtime())
    saved = read_adapter_state(sft["final"])
    own = lora_state_dict(job.model)
    assert own.keys() == saved.keys() and all(torch.equal(own[k], saved[k]) for k in own)
    with pytest.raises(ValueError, match="model.lora.r=8"):
        build_job(_cfg(tmp_path / "c", SFT, f"model.init_from={base_dir}", "model.lora.r=8",
                       f"model.lora.adapter={sft['final']}"), Runtime())


def test_qlora_on_cpu_is_refused_clearly(tmp_path, base_dir):
    with pytest.raises(QLoRAUnavailable, match="needs a CUDA GPU.*quantize=none"):
        build_job(_cfg(tmp_path, SFT, f"model.init_from={base_dir}", "model.lora.quantize=nf4"), Runtime())
    with pytest.raises(ValueError, match="needs LoRA adapters"):
        build_job(_cfg(tmp_path, SFT, f"model.init_from={base_dir}", "model.lora.r=0", "model.lora.quantize=nf4"),
                  Runtime())


def test_lora_with_deepspeed_is_refused(tmp_path, base_dir):
    from lfm2_train.engine.trainer import Trainer

    cfg = _cfg(tmp_path, SFT, f"model.init_from={base_dir}", "distributed=zero2")
    job = build_job(cfg, Runtime())
    with pytest.raises(ValueError, match="LoRA .* none, ddp or fsdp2"):
        Trainer(cfg, job, Runtime())


def test_lora_on_a_stage_without_adapters_is_refused(tmp_path, tiny_dataset):
    cfg = _cfg(tmp_path, ["stage=pretrain", "logger=disabled", f"data.path={tiny_dataset}", "data.seq_len=32",
                          "trainer.max_steps=1"], "model.lora.r=4")
    with pytest.raises(ValueError, match="model.lora applies to stage=sft and stage=preference"):
        run_stage(cfg)


def test_export_folds_an_adapter(tmp_path, base_dir):
    """stage=export takes an adapter directory (folded into its recorded base) or stage.merge_adapter."""
    sft = run_stage(_cfg(tmp_path / "sft", SFT, f"model.init_from={base_dir}", "trainer.max_steps=2"))
    want = load_model(sft["final"]).state_dict()
    for name, extra in (("a", [f"stage.source={sft['final']}"]),
                        ("b", [f"stage.source={base_dir}", f"stage.merge_adapter={sft['final']}"])):
        run_stage(_cfg(tmp_path / name, ["stage=export", "logger=disabled"], *extra))
        got = LFM2ForCausalLM.from_pretrained(tmp_path / name / "model").state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), name
