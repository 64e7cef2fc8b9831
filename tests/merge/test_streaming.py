"""Streaming I/O: the planned shard writer round-trips through safetensors; fused expert layouts are read."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lfm2_train.merge.streaming import CheckpointSource, ShardedWriter


def test_sharded_writer_round_trip(tmp_path):
    tensors = {"a": torch.randn(4, 8), "b": torch.randn(3).bfloat16(), "c": torch.arange(6, dtype=torch.int64),
               "d": torch.tensor(2.5), "e": torch.randn(2, 3, 4).half()}
    plan = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=100)
    for k, v in tensors.items():
        writer.write(k, v)
    files = writer.close()
    assert len(files) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    for key, name in index["weight_map"].items():
        with safe_open(str(tmp_path / name), "pt") as f:
            assert torch.equal(f.get_tensor(key), tensors[key])


def test_sharded_writer_refuses_out_of_plan_tensors(tmp_path):
    writer = ShardedWriter(tmp_path, [("a", (2,), torch.float32)], max_shard_bytes=1 << 20)
    with pytest.raises(RuntimeError, match="expected a"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()


def test_fused_expert_layout_is_presented_per_expert(tmp_path, make_checkpoint):
    path = make_checkpoint(tmp_path / "moe", "tiny-moe")
    per_expert = CheckpointSource(path)
    # Rewrite the same weights in transformers' fused in-memory layout.
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    for name in ("config.json",):
        (fused_dir / name).write_text((path / name).read_text())
    state, groups = {}, {}
    for key in per_expert.entries:
        parts = key.split(".")
        if "experts" in parts:
            i = parts.index("experts")
            groups.setdefault((".".join(parts[:i + 1]), parts[i + 2]), {})[int(parts[i + 1])] = per_expert.read(key)
        else:
            state[key] = per_expert.read(key)
    for (prefix, part), experts in list(groups.items()):
        if part == "w1":
            w3 = groups[(prefix, "w3")]
            state[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([experts[j], w3[j]]) for j in sorted(experts)])
        elif part == "w2":
            state[f"{prefix}.down_proj"] = torch.stack([experts[j] for j in sorted(experts)])
    save_file(state, str(fused_dir / "model.safetensors"))
    fused = CheckpointSource(fused_dir)
    assert set(fused.entries) == set(per_expert.entries)
    for key in per_expert.entries:
        assert torch.equal(fused.read(key), per_expert.read(key)), key
