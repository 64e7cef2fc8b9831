"""`stage=sft` / `stage=preference` on chat shards (`data.path`): exact resume, the reference cache shared with
the JSONL path, and the configurations that are refused (each naming what to change)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize

from data_pipelines.chat_shards import run as run_job
from lfm2_train.config import register_configs
from lfm2_train.data.format import DataFormatError
from lfm2_train.engine.distributed import Runtime
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.stages import run_stage
from lfm2_train.stages.preference import build_job as build_preference_job
from lfm2_train.stages.sft import build_job as build_sft_job
from lfm2_train.tasks import make_problems, sft_conversations
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

SFT = ["stage=sft", "logger=disabled", "trainer.progress_bar=false", "data.seq_len=64", "trainer.micro_batch_size=4",
       "stage.epochs=null", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.checkpoint_every=0",
       "optim.lr=1e-2", "optim.min_lr=1e-3", "optim.warmup_steps=1"]
PREFERENCE = ["stage=preference", "logger=disabled", "trainer.progress_bar=false", "trainer.micro_batch_size=4",
              "trainer.eval_every=0", "trainer.checkpoint_every=0", "optim.lr=2e-3", "optim.min_lr=2e-4",
              "optim.warmup_steps=0", "stage.beta=0.5", "data.seq_len=64", "data.val_fraction=0.2",
              "stage.epochs=null", "trainer.max_steps=4"]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LFM2_TRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cfg(base: list[str], out: Path, *overrides: str):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train", overrides=[*base, f"output_dir={out}", *overrides])


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A chat file, a pair file, and the job's shards of each (sft with an easy -> hard order)."""
    root = tmp_path_factory.mktemp("chat_stage_data")
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in sft_conversations(60, seed=5)))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p.question}],
                                         "chosen": [{"role": "assistant", "content": p.solution}],
                                         "rejected": [{"role": "assistant", "content": f"Answer: {p.answer + 3}"}]})
                             + "\n" for p in make_problems(20, seed=1, levels=(0,))))
    run_job({"kind": "sft", "dataset": str(chat), "seq_len": 64, "output_dir": str(root / "sft"),
             "difficulty": {"source": "column", "method": "buckets", "n_buckets": 3}})
    run_job({"kind": "preference", "dataset": str(pairs), "seq_len": 64, "output_dir": str(root / "pairs")})
    return {"chat": chat, "pairs": pairs, "sft": root / "sft", "preference": root / "pairs"}


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sft_model") / "final"
    torch.manual_seed(0)
    LFM2ForCausalLM(get_preset("tiny")).save_pretrained(out)
    LFM2Tokenizer.from_pretrained(tiny_tokenizer_path()).save_pretrained(out)
    return out


def test_sft_on_chat_shards_resumes_exactly(tmp_path, data):
    extra = [f"data.path={data['sft']}", "data.order=difficulty-buckets", "stage.embedding_dropout=0.1"]
    full = run_stage(_cfg(SFT, tmp_path / "full", *extra))
    part = run_stage(_cfg(SFT, tmp_path / "part", *extra, "trainer.stop_after_steps=3"))
    assert part["status"] == "interrupted"
    resumed = run_stage(_cfg(SFT, tmp_path / "part", *extra))
    assert resumed["start_step"] == 3 and resumed["status"] == "finished"
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    inputs = json.loads((Path(full["final"]) / "lfm2_train_manifest.json").read_text())["inputs"]
    assert inputs["dataset"] == str(data["chat"]) and inputs["chat_shards"]["directory"] == str(data["sft"])
    assert inputs["curriculum"]["source"] == "order" and inputs["curriculum"]["method"] == "buckets"


def test_preference_on_chat_shards_shares_the_reference_cache_with_jsonl(tmp_path, data, sft_dir, reference_loads):
    common = [f"model.init_from={sft_dir}", "stage.losses=[{name: ln_dpo}]"]
    a = run_stage(_cfg(PREFERENCE, tmp_path / "a", *common, f"stage.dataset={data['pairs']}"))
    b = run_stage(_cfg(PREFERENCE, tmp_path / "b", *common, f"data.path={data['preference']}"))
    assert a["ref_cache"]["status"] == "computed" and b["ref_cache"]["status"] == "hit"
    assert reference_loads["n"] == 1 and b["ref_cache"]["directory"] == a["ref_cache"]["directory"]
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def _other_template_tokenizer(directory: Path) -> Path:
    tok = LFM2Tokenizer.from_pretrained(tiny_tokenizer_path())
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    return tok.save_pretrained(directory)


@pytest.mark.parametrize("kind,overrides,match", [
    ("sft", ["data.path={sft}", "stage.dataset={chat}"], "not both"),
    ("sft", ["data.path={sft}", "stage.curriculum.source=column"], "data.order"),
    ("sft", ["data.order=difficulty-sort"], "stage.curriculum"),
    ("sft", ["data.path={preference}"], "holds preference chat shards"),
    ("sft", ["data.path={sft}", "data.seq_len=32"], "made for data.seq_len=64"),
    ("sft", ["data.path={sft}", "data.order=nope"], "order 'nope' not found"),
    ("sft", ["data.path={sft}", "stage.tokenizer={other_tokenizer}"], "another chat template"),
    ("preference", ["data.path={preference}", "data.order=x"], "shuffles its pairs"),
    ("preference", ["data.path={preference}", "stage.dataset={pairs}"], "not both"),
    ("preference", [], "stage.dataset=.*or data.path"),
])
def test_bad_chat_shard_configs_are_named(tmp_path, data, kind, overrides, match):
    paths = {**{k: str(v) for k, v in data.items()}, "other_tokenizer": str(_other_template_tokenizer(tmp_path / "t"))}
    overrides = [o.format(**paths) for o in overrides]
    base = SFT if kind == "sft" else [*PREFERENCE, "stage.losses=[{name: simpo}]"]
    cfg = _cfg(base, tmp_path / "run", *overrides)
    build = build_sft_job if kind == "sft" else build_preference_job
    with pytest.raises((ValueError, DataFormatError), match=match):
        build(cfg, Runtime())


def test_pretraining_refuses_chat_shards(tmp_path, data):
    """Conversations packed as plain documents would lose their label masks and separators: refused by name."""
    cfg = _cfg(["stage=pretrain", "logger=disabled", "trainer.progress_bar=false", "model=tiny",
                "trainer.max_steps=1"], tmp_path / "pre", f"data.path={data['sft']}")
    with pytest.raises(DataFormatError, match="holds sft chat shards.*data_pipelines.tokenize"):
        run_stage(cfg)
    assert not (tmp_path / "pre" / "final").exists()
