"""Chat data, stage configs and batch digests for the chat-shard equivalence tests.

`chat_batch_digests.json` beside this file holds the digests of the batches the SFT and preference stages
build when they tokenise the JSONL rows in memory (`encode_rows` / `encode_pairs` -> `SFTStream` /
`PairStream`). The shard paths must reproduce them bit for bit. The file was written by

    python tests/data/chat_batches.py tests/data/chat_batch_digests.json

run on a tree whose stages tokenise in memory; this module uses only what such a tree has.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lfm2_train.tasks import make_problems, sft_conversations

DIGESTS = Path(__file__).with_name("chat_batch_digests.json")
N_BATCHES = 6
TOOLS = [{"name": "add"}]

SFT = ["stage=sft", "logger=disabled", "trainer.progress_bar=false", "data.seq_len=128", "trainer.micro_batch_size=4",
       "stage.epochs=null", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.checkpoint_every=0"]
PREFERENCE = ["stage=preference", "logger=disabled", "trainer.progress_bar=false", "trainer.micro_batch_size=4",
              "trainer.eval_every=0", "trainer.checkpoint_every=0", "data.seq_len=64", "data.val_fraction=0.2",
              "stage.epochs=null", "trainer.max_steps=6", "stage.losses=[{name: simpo}]"]

# scenario -> (kind, stage overrides; "{chat}", "{pairs}", "{mix}" stand for the files the tests write)
SCENARIOS: dict[str, tuple[str, list[str]]] = {
    "sft_curriculum": ("sft", ["stage.dataset={chat}", "data.val_fraction=0.1", "stage.curriculum.source=column",
                               "stage.curriculum.method=buckets", "stage.curriculum.n_buckets=3"]),
    "sft_epochs": ("sft", ["stage.dataset={chat}", "stage.epochs=2"]),
    "sft_bundled": ("sft", ["stage.bundled_rows=80", "stage.curriculum.source=column"]),
    "sft_mix": ("sft", ["stage.dataset={chat}", "stage.mix_pretrain=0.25", "stage.mix_data={mix}"]),
    "preference_chat": ("preference", ["stage.dataset={pairs}"]),
    "preference_raw": ("preference", ["stage.dataset={pairs}", "stage.plain_text=raw"]),
}


def chat_rows() -> list[dict[str, Any]]:
    """40 arithmetic conversations, a system + multi-turn one, a tool call, and three unusable rows."""
    rows = sft_conversations(40, seed=5)
    rows.append({"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "Answer: 4"},
        {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "Answer: 6"}],
        "answer": 6, "difficulty": 0.5})
    rows.append({"messages": [
        {"role": "user", "content": "Add 12 and 30."},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": json.dumps({"a": 12, "b": 30})}}]},
        {"role": "tool", "content": "42"}, {"role": "assistant", "content": "Answer: 42"}],
        "answer": 42, "difficulty": 1.5, "tools": TOOLS})
    rows += [{"messages": [{"role": "user", "content": "no reply"}], "answer": 0, "difficulty": 0.0},
             {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}], "answer": 0,
              "difficulty": 0.0},
             {"messages": [{"role": "user", "content": "7 " * 80}, {"role": "assistant", "content": "7"}],
              "answer": 7, "difficulty": 0.0}]
    return rows


def pair_rows() -> list[dict[str, Any]]:
    """Conversational, implicit-prompt and plain-string pairs, plus an unusable one (identical)."""
    rows: list[dict[str, Any]] = []
    for i, p in enumerate(make_problems(24, seed=1, levels=(0, 1))):
        if i % 3 == 0:
            rows.append({"prompt": [{"role": "user", "content": p.question}],
                         "chosen": [{"role": "assistant", "content": p.solution}],
                         "rejected": [{"role": "assistant", "content": f"Answer: {p.answer + 3}"}]})
        elif i % 3 == 1:
            user = {"role": "user", "content": p.question}
            rows.append({"chosen": [user, {"role": "assistant", "content": p.solution}],
                         "rejected": [user, {"role": "assistant", "content": f"Answer: {p.answer - 1}"}]})
        else:
            rows.append({"prompt": p.question, "chosen": p.solution, "rejected": f"Answer: {p.answer * 2 + 1}"})
    rows.append({"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"})
    return rows


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_inputs(directory: Path) -> dict[str, Path]:
    """The chat file, the pair file and a small pre-training dataset (for replay) under `directory`."""
    conftest = _load_conftest()
    directory.mkdir(parents=True, exist_ok=True)
    return {"chat": write_jsonl(directory / "chat.jsonl", chat_rows()),
            "pairs": write_jsonl(directory / "pairs.jsonl", pair_rows()),
            "mix": conftest.write_text_dataset(directory / "mix", conftest.arithmetic_texts(200))}


def _load_conftest() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_chat_batches_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_config(kind: str, overrides: Sequence[str], output_dir: Path) -> Any:
    from hydra import compose, initialize

    from lfm2_train.config import register_configs

    register_configs()
    base = SFT if kind == "sft" else PREFERENCE
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train", overrides=[*base, f"output_dir={output_dir}", *overrides])


def scenario_overrides(name: str, inputs: dict[str, Path]) -> tuple[str, list[str]]:
    kind, overrides = SCENARIOS[name]
    return kind, [o.format(**{k: str(v) for k, v in inputs.items()}) for o in overrides]


def batch_digest(batch: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for key in sorted(batch):
        t = batch[key].contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def array_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.int64).tobytes()).hexdigest()


def job_digests(kind: str, cfg: Any) -> dict[str, Any]:
    """What a stage's job feeds the trainer: step count, example order, the first training batches, the
    validation batches (and the preference stage's probe batches and pair hash)."""
    from lfm2_train.engine.distributed import Runtime

    if kind == "sft":
        from lfm2_train.stages.sft import build_job

        job = build_job(cfg, Runtime())
        probe: list[dict[str, torch.Tensor]] = []
    else:
        from lfm2_train.stages.preference import build_job

        job, _, probe = build_job(cfg, Runtime())
    stream = job.train
    primary = getattr(stream, "primary", stream)
    order = primary.sequence if kind == "sft" else np.asarray(primary.index)
    out = {"max_steps": int(cfg.trainer.max_steps), "order": array_digest(order),
           "train": [batch_digest(stream.next_batch(cfg.trainer.micro_batch_size)) for _ in range(N_BATCHES)],
           "val": [batch_digest(b) for b in job.val_batches], "probe": [batch_digest(b) for b in probe]}
    if kind == "preference":
        out["pairs_hash"] = job.inputs["pairs_hash"]
    return out


def record(path: Path, workdir: Path) -> dict[str, Any]:
    inputs = write_inputs(workdir / "inputs")
    digests = {}
    for name in SCENARIOS:
        kind, overrides = scenario_overrides(name, inputs)
        digests[name] = job_digests(kind, compose_config(kind, overrides, workdir / name))
    path.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    return digests


if __name__ == "__main__":
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LFM2_TRAIN_CACHE"] = str(Path(tmp) / "cache")
        record(Path(sys.argv[1]), Path(tmp))
