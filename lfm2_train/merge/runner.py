"""Run one merge: check the inputs, plan the output tensors, stream them through a method, publish.

The output directory appears only when complete: everything is written into a temporary sibling and
renamed at the end, so an interrupted merge never leaves something that looks like a checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.format import sha256_file
from ..model.config import LFM2Config
from ..model.hf_io import _parse_size
from . import methods
from .checks import (
    MergeCompatibilityError,
    check_configs,
    check_tensor_set,
    check_tokenizers,
    expected_tensors,
)
from .config import MergeConfigError, MergeSpec
from .streaming import CheckpointSource, ShardedWriter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "added_tokens.json")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TensorJob:
    """One output tensor: where each input's copy lives, and where it sits for gradients (t) and slices."""

    key: str
    sources: dict[str, str]  # model dir -> that model's tensor name
    t: float
    slice_index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _generator(seed: int, key: str, index: int) -> torch.Generator:
    """A generator seeded from (seed, tensor name, model index): the same draw whatever the tensor order."""
    digest = hashlib.sha256(f"{seed}/{key}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class MergePlan:
    """The inputs opened and checked, and the list of output tensors with their sources."""

    def __init__(self, spec: MergeSpec) -> None:
        self.spec = spec
        self.sources = {p: CheckpointSource(p) for p in spec.models}
        self.reference = self.sources[spec.base_model or spec.models[0]]
        self.notes = check_configs(self.reference, [s for s in self.sources.values() if s is not self.reference],
                                   same_depth=not spec.explicit_slices)
        self.notes += spec.notes
        paths = [s.path for s in self.sources.values()]
        if spec.tokenizer_source:
            paths.append(Path(spec.tokenizer_source))
        self.tokenizer_fingerprints, tok_notes = check_tokenizers(paths)
        self.notes += tok_notes
        for source in self.sources.values():
            check_tensor_set(source)
        self.config, layer_map = self._layers()
        self.jobs = self._jobs(layer_map)

    # ------------------------------------------------------------------------------------------ layers
    def _layers(self) -> tuple[LFM2Config, list[tuple[int, int, int, int, dict[str, int]]]]:
        """Output layers: (output index, slice index, position in slice, slice length, model -> source layer)."""
        spec, ref = self.spec, self.reference.config
        layer_map, layer_types = [], []
        for si, sl in enumerate(spec.slices):
            ranges = {}
            for src in sl.sources:
                n = self.sources[src.model].config.num_hidden_layers
                lo, hi = src.layer_range or (0, n)
                if hi > n:
                    raise MergeCompatibilityError(f"slices[{si}]: layer_range [{lo}, {hi}) is beyond the "
                                                  f"{n} layers of {src.model}")
                ranges[src.model] = (lo, hi)
            lengths = {hi - lo for lo, hi in ranges.values()}
            if len(lengths) != 1:
                raise MergeCompatibilityError(f"slices[{si}]: sources cover different numbers of layers "
                                              f"{sorted(ranges.values())}")
            n_layers = lengths.pop()
            if spec.base_is_input and spec.base_model not in ranges:
                first = next(iter(ranges.values()))
                ranges[spec.base_model] = first  # the base sits at the same layers as the first source
            for i in range(n_layers):
                out_index = len(layer_types)
                src_layers = {m: lo + i for m, (lo, _) in ranges.items()}
                kinds = {self.sources[m].config.layer_types[j] for m, j in src_layers.items()}
                if len(kinds) != 1:
                    raise MergeCompatibilityError(f"output layer {out_index} (slices[{si}]) mixes layer types "
                                                  f"{sorted(kinds)} across {src_layers}")
                for m, j in src_layers.items():
                    if self.sources[m].config.is_moe_layer(j) != ref.is_moe_layer(out_index):
                        raise MergeCompatibilityError(
                            f"output layer {out_index} would take layer {j} of {m}, but one is a dense and the other "
                            f"an MoE layer (num_dense_layers={ref.num_dense_layers})")
                layer_types.append(kinds.pop())
                layer_map.append((out_index, si, i, n_layers, src_layers))
        config = ref.replace(num_hidden_layers=len(layer_types), layer_types=layer_types) \
            if spec.explicit_slices else ref
        return config, layer_map

    def _jobs(self, layer_map: list) -> list[TensorJob]:
        spec = self.spec
        out_shapes = expected_tensors(self.config)
        first, last = spec.slices[0], spec.slices[-1]
        by_layer = {out_index: (si, i, n, src_layers) for out_index, si, i, n, src_layers in layer_map}

        def models_of(sl) -> list[str]:
            ms = list(dict.fromkeys(s.model for s in sl.sources))
            if spec.base_is_input and spec.base_model not in ms:
                ms = [spec.base_model, *ms]
            return ms

        jobs = []
        for key, shape in out_shapes.items():
            m = _LAYER.match(key)
            if m:
                si, i, n, src_layers = by_layer[int(m.group(1))]
                sources = {model: f"model.layers.{j}.{m.group(2)}" for model, j in src_layers.items()}
                t = i / (n - 1) if n > 1 else 1.0
            else:
                # mergekit's LFM2 layout: embedding and final norm (`embedding_norm`) are pre-weights taken
                # from the first slice, the head a post-weight from the last; all of them at t = 0
                at_start = "lm_head" not in key
                si = 0 if at_start else len(spec.slices) - 1
                sources = {model: key for model in models_of(first if at_start else last)}
                t = 0.0
            shapes = {model: self.sources[model].entries[k].shape for model, k in sources.items()}
            for model, s in shapes.items():
                if s != shape:
                    raise MergeCompatibilityError(f"tensor {key}: {model} has shape {s} (as {sources[model]}), the "
                                                  f"output needs {shape}")
            ref_model = spec.base_model if spec.base_model in sources else next(iter(sources))
            src_dtype = self.sources[ref_model].entries[sources[ref_model]].dtype
            if key.endswith("expert_bias"):
                dtype = torch.float32  # routing bias stays fp32, as in the released checkpoints
            elif spec.dtype and src_dtype.is_floating_point:
                dtype = _TORCH_DTYPES[spec.dtype]
            else:
                dtype = src_dtype
            jobs.append(TensorJob(key, sources, t, si, shape, dtype))
        return jobs

    # ------------------------------------------------------------------------------------------ merging
    def merge_tensor(self, job: TensorJob) -> torch.Tensor:
        """Read this tensor from each input (one at a time, in its stored dtype), merge, return it in the
        output dtype. The methods upcast a block of rows at a time, so bf16 inputs are never held in
        float32 whole; the tensors read here are owned by this call, so the output may take the first
        input's storage (`consume=True`)."""
        spec, method = self.spec, self.spec.method
        base = spec.base_model if spec.base_model in job.sources else None
        models = [m for m in job.sources if m != base] if method.task_vectors else list(job.sources)
        if method.needs_base and base is None:
            raise MergeCompatibilityError(f"tensor {job.key}: base_model {spec.base_model} is not among its sources")
        key_is_bias = job.key.endswith("expert_bias")
        tensors = {m: self.sources[m].read(k) for m, k in job.sources.items()}
        if not all(t.is_floating_point() for t in tensors.values()):
            values = list(tensors.values())
            if any(not torch.equal(values[0], v) for v in values[1:]):
                raise MergeCompatibilityError(f"tensor {job.key} is not floating point and differs between inputs; "
                                              "it cannot be averaged")
            return values[0]
        if key_is_bias:
            if spec.expert_bias == "mean":
                return torch.stack([t.float() for t in tensors.values()]).mean(0)
            return tensors[base or next(iter(tensors))].float()
        try:
            return self._merge(job, tensors, base, models)
        except ValueError as err:
            raise MergeConfigError(f"tensor {job.key}: {err}") from None

    def _merge(self, job: TensorJob, tensors: dict[str, torch.Tensor], base: str | None,
               models: list[str]) -> torch.Tensor:
        spec, method = self.spec, self.spec.method

        def g(name: str) -> Any:
            return spec.global_param(name, job.key, job.t, job.slice_index)

        def per_model(name: str) -> list[Any]:
            return [spec.tensor_param(name, m, job.key, job.t, job.slice_index) for m in models]

        name, xs = method.name, [tensors[m] for m in models]
        b = tensors[base] if base is not None else None
        kw = {"consume": True, "out_dtype": job.dtype}
        if name == "passthrough":
            scale = per_model("scale")[0]
            return methods.passthrough(xs[0], None if scale is None else float(scale), out_dtype=job.dtype)
        if name == "linear":
            return methods.linear(xs, [float(w) for w in per_model("weight")], normalize=bool(g("normalize")), **kw)
        if name == "slerp":
            return methods.slerp(b, xs[0], float(g("t")), **kw)
        if name == "nearswap":
            return methods.nearswap(b, xs[0], float(g("t")), **kw)
        if name == "nuslerp":
            return methods.nuslerp(xs[0], xs[1], [float(w) for w in per_model("weight")], b,
                                   row_wise=bool(g("nuslerp_row_wise")), flatten=bool(g("nuslerp_flatten")), **kw)
        if name == "multislerp":
            return methods.multislerp(xs, [float(w) for w in per_model("weight")], b,
                                      normalize_weights=bool(g("normalize_weights")), eps=float(g("eps")), **kw)
        if name == "karcher":
            return methods.karcher(xs, max_iter=int(g("max_iter")), tol=float(g("tol")), **kw)
        if name == "model_stock":
            return methods.model_stock(b, xs, filter_wise=bool(g("filter_wise")), **kw)
        if name == "sce":
            return methods.sce(b, xs, select_topk=float(g("select_topk")), **kw)
        index = {m: spec.models.index(m) for m in models}
        sparsification = method.sparsification
        generators = [_generator(spec.seed, job.key, index[m]) for m in models] \
            if sparsification in ("random", "della") else None
        return methods.merge_task_vectors(
            b, xs, [float(w) for w in per_model("weight")],
            densities=[float(d) for d in per_model("density")], sparsification=sparsification,
            consensus=method.consensus, normalize=bool(g("normalize")), rescale=bool(g("rescale")),
            rescale_mode=str(g("rescale_mode")) if sparsification else "l1",
            epsilons=[float(e) for e in per_model("epsilon")] if sparsification == "della" else None,
            gammas=[float(e) for e in per_model("gamma")] if sparsification == "magnitude_outliers" else None,
            lambda_=float(g("lambda")), generators=generators, **kw)

    def output_dtype_name(self) -> str:
        embed = next(j for j in self.jobs if j.key == "model.embed_tokens.weight")
        return str(embed.dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def _sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime): a selection merges the same inputs many times."""
    st = path.stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


def _hash_inputs(sources: dict[str, CheckpointSource]) -> dict[str, Any]:
    out = {}
    for path, source in sources.items():
        files = {f.name: _sha256(f) for f in source.weight_files()}
        out[path] = {"config_sha256": _sha256(source.path / "config.json"), "weights_sha256": files}
    return out


def merge_checkpoints(spec: MergeSpec, output_dir: str | Path, *, max_shard_size: int | str = "2GB",
                      hash_inputs: bool = True, overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Merge per `spec` into `output_dir` (a Hugging Face directory with tokenizer and manifest)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} already exists and is not empty; choose another output or overwrite")
    start = time.perf_counter()
    plan = MergePlan(spec)  # every check happens here, before anything is written
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        writer = ShardedWriter(tmp, [(j.key, j.shape, j.dtype) for j in plan.jobs], _parse_size(max_shard_size))
        for n, job in enumerate(plan.jobs, start=1):
            writer.write(job.key, plan.merge_tensor(job))
            if progress and (n % 50 == 0 or n == len(plan.jobs)):
                print(f"merge: {n}/{len(plan.jobs)} tensors", flush=True)
        files = writer.close()
        ref = plan.reference.path
        plan.config.save(tmp, dtype=plan.output_dtype_name())
        if (ref / "generation_config.json").is_file():
            shutil.copy2(ref / "generation_config.json", tmp / "generation_config.json")
        tok_dir = Path(spec.tokenizer_source) if spec.tokenizer_source else ref
        copied = [name for name in TOKENIZER_FILES if (tok_dir / name).is_file()]
        for name in copied:
            shutil.copy2(tok_dir / name, tmp / name)
        if not copied:
            plan.notes.append(f"{tok_dir} has no tokenizer files: the output has none")
        manifest = {
            "stage": "merge",
            "merge_method": spec.method.name,
            "merge_config": spec.raw,
            "base_model": spec.base_model,
            "models": spec.models,
            "tokenizer_source": str(tok_dir) if copied else None,
            "tokenizer_fingerprints": plan.tokenizer_fingerprints,
            "dtype": plan.output_dtype_name(),
            "seed": spec.seed,
            "expert_bias": spec.expert_bias,
            "notes": plan.notes,
            "inputs": _hash_inputs(plan.sources) if hash_inputs else {p: {} for p in plan.sources},
        }
        (tmp / "lfm2_train_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"output": str(output_dir), "method": spec.method.name, "tensors": len(plan.jobs),
            "bytes": sum(f.stat().st_size for f in (output_dir / f.name for f in files)),
            "shards": len(files), "seconds": round(time.perf_counter() - start, 3), "notes": plan.notes}
