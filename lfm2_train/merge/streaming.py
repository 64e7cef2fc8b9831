"""Tensor-at-a-time checkpoint reading and shard writing, so a merge never holds a whole model.

Reading: every tensor is fetched through its own short-lived `safe_open`. A handle kept open for the
whole merge would keep every page it ever touched mapped into the process (resident memory grows to
the size of each input); reopening drops the mapping as soon as the tensor is freed. Inputs written
with the fused expert layout (`experts.gate_up_proj` / `experts.down_proj`) are presented under the
per-expert on-disk names, reading one expert's slice at a time.

Writing: the output's tensor names, shapes and dtypes are known before the first tensor is merged, so
the shard layout and every safetensors header are fixed up front and each merged tensor goes straight
to its file: nothing is buffered beyond the tensor being written.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open

from ..model.config import LFM2Config
from ..model.hf_io import SAFE_INDEX, SAFE_SINGLE, CheckpointError, read_config

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
_FUSED = re.compile(r"^(.*\.feed_forward\.experts)\.(gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    key: str  # name inside the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    expert: int | None = None  # fused layout: which expert
    part: str | None = None  # fused layout: w1 | w3 | w2


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The JSON header of a .safetensors file (names, dtypes, shapes, offsets) without touching the data."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {err}") from None
    header.pop("__metadata__", None)
    return header


class CheckpointSource:
    """One input checkpoint directory: its config, its tensor names / shapes / dtypes, and lazy reads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config: LFM2Config = read_config(self.path)
        self.entries: dict[str, TensorEntry] = {}
        for file in self.weight_files():
            for key, info in read_safetensors_header(file).items():
                if info["dtype"] not in ST_DTYPES:
                    raise CheckpointError(f"{file}: tensor {key} has unsupported dtype {info['dtype']}")
                dtype, shape = ST_DTYPES[info["dtype"]], tuple(info["shape"])
                if m := _FUSED.match(key):
                    self._add_fused(file, key, m.group(1), m.group(2), dtype, shape)
                else:
                    self._add(key, TensorEntry(file, key, dtype, shape))
        if self.config.tie_word_embeddings:
            self.entries.pop("lm_head.weight", None)  # some exporters write the tied head anyway

    def weight_files(self) -> list[Path]:
        index = self.path / SAFE_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from None
            files = [self.path / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shard(s) that do not exist: {missing}")
            return files
        if (self.path / SAFE_SINGLE).is_file():
            return [self.path / SAFE_SINGLE]
        if list(self.path.glob("pytorch_model*.bin")):
            raise CheckpointError(f"{self.path} holds pytorch_model*.bin weights; merging streams safetensors only "
                                  "(re-save it with LFM2ForCausalLM.from_pretrained(...).save_pretrained(...))")
        raise FileNotFoundError(f"no {SAFE_SINGLE} or {SAFE_INDEX} in {self.path}")

    def _add(self, key: str, entry: TensorEntry) -> None:
        if key in self.entries:
            raise CheckpointError(f"{self.path}: tensor {key} is stored twice")
        self.entries[key] = entry

    def _add_fused(self, file: Path, key: str, prefix: str, kind: str, dtype: torch.dtype,
                   shape: tuple[int, ...]) -> None:
        if kind == "gate_up_proj":  # (E, 2F, d): gate (w1) rows then up (w3) rows
            e, two_f, d = shape
            for j in range(e):
                for part in ("w1", "w3"):
                    self._add(f"{prefix}.{j}.{part}.weight", TensorEntry(file, key, dtype, (two_f // 2, d), j, part))
        else:  # (E, d, F)
            for j in range(shape[0]):
                self._add(f"{prefix}.{j}.w2.weight", TensorEntry(file, key, dtype, tuple(shape[1:]), j, "w2"))

    def read(self, key: str) -> torch.Tensor:
        """One tensor, through a handle that is closed again before returning."""
        entry = self.entries.get(key)
        if entry is None:
            raise CheckpointError(f"{self.path}: tensor {key} is missing")
        with safe_open(str(entry.file), framework="pt") as f:
            if entry.expert is None:
                return f.get_tensor(entry.key)
            expert = f.get_slice(entry.key)[entry.expert]
        if entry.part == "w1":
            return expert[: entry.shape[0]].contiguous()
        if entry.part == "w3":
            return expert[entry.shape[0]:].contiguous()
        return expert.contiguous()

    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files())


class ShardedWriter:
    """Writes a planned list of tensors into safetensors shards of at most `max_shard_bytes` each
    (a single larger tensor gets a shard of its own), plus the index when there is more than one."""

    def __init__(self, directory: str | Path, plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for key, shape, dtype in plan:
            nbytes = _nbytes(shape, dtype)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((key, tuple(shape), dtype))
            size += nbytes
        n = len(shards)
        self.names = [SAFE_SINGLE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        self.shards = shards
        self.total_bytes = sum(_nbytes(s, d) for _, s, d in plan)
        self._order = [(i, key, shape, dtype) for i, shard in enumerate(shards) for key, shape, dtype in shard]
        self._next = 0
        self._file: BinaryIO | None = None
        self._file_index = -1

    def _open_shard(self, i: int) -> None:
        if self._file is not None:
            self._file.close()
        header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, shape, dtype in self.shards[i]:
            nbytes = _nbytes(shape, dtype)
            header[key] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._file = open(self.directory / self.names[i], "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._file_index = i

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """The next planned tensor; its name, shape and dtype must match the plan."""
        if self._next >= len(self._order):
            raise RuntimeError(f"ShardedWriter: {key} is beyond the planned tensors")
        i, want, shape, dtype = self._order[self._next]
        if key != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"ShardedWriter: expected {want} {shape} {dtype}, got {key} "
                               f"{tuple(tensor.shape)} {tensor.dtype}")
        if i != self._file_index:
            self._open_shard(i)
        data = tensor.detach().cpu().contiguous().reshape(-1)
        if data.numel():
            self._file.write(data.view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> list[Path]:
        if self._next != len(self._order):
            raise RuntimeError(f"ShardedWriter: {len(self._order) - self._next} planned tensors were never written")
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.names) > 1:
            weight_map = {key: self.names[i] for i, shard in enumerate(self.shards) for key, _, _ in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [self.directory / n for n in self.names]


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()
