"""The merge configuration: mergekit's YAML shape, validated up front, and per-tensor parameter lookup.

Accepted (top level): `merge_method`, `base_model`, `models: [{model, parameters}]` or
`slices: [{sources: [{model, layer_range, parameters}], parameters}]`, `parameters`, `dtype` /
`out_dtype`, `tokenizer_source` (or `tokenizer: {source}`), plus our `expert_bias` (base | mean) and
`seed` (DARE / DELLA draws). A parameter value is a scalar, a gradient (a list of numbers
interpolated over the layers of a slice, layer i of n at t = i / (n - 1), a one-layer slice at t = 1;
tensors outside the layers — embedding, final norm, head — at t = 0, all as mergekit places them), or a
list of `{filter, value}` conditions where `filter` is a substring of the tensor name and a condition
without `filter` (or with `filter: "*"`) matches everything. Lookup order for a model's parameter: its slice source, the
slice, its `models` entry, the global `parameters`, the method default; a level whose conditions do not
match the tensor falls through to the next. Unknown methods, keys and parameter names are errors that
name them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REQUIRED = object()


class MergeConfigError(ValueError):
    """The merge configuration is malformed; the message names the offending key, method or parameter."""


@dataclass(frozen=True)
class MethodSpec:
    """What a method accepts: method-level (`global_params`) and per-model (`tensor_params`) parameters,
    and mergekit's base policy: `required` (task vectors are taken against it), `optional` (used when
    given) or `input` (a given base_model is just one more input, as mergekit adds it to the models)."""

    name: str
    global_params: dict[str, Any]
    tensor_params: dict[str, Any]
    base: str = "required"
    sparsification: str | None = None
    consensus: str | None = None

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    @property
    def task_vectors(self) -> bool:
        """Whether the base is subtracted from the other inputs (the base is not an input of its own)."""
        return self.base in ("required", "optional")


# mergekit's generalized task arithmetic family: method-level int8_mask / normalize / rescale / lambda,
# per-model weight / density (+ gamma for breadcrumbs, epsilon for DELLA). `rescale_mode` is ours:
# l1 (mergekit: restore the task vector's L1 norm per tensor) or inverse_p (the DARE / DELLA papers).
def _gta(name: str, sparsification: str | None, consensus: str | None, normalize: bool, rescale: bool,
         extra: dict[str, Any] | None = None) -> MethodSpec:
    global_params = {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0}
    if sparsification is not None:
        global_params["rescale_mode"] = "l1"
    return MethodSpec(name, global_params, {"weight": REQUIRED, "density": 1.0, **(extra or {})},
                      sparsification=sparsification, consensus=consensus)


METHODS: dict[str, MethodSpec] = {m.name: m for m in [
    MethodSpec("linear", {"normalize": True}, {"weight": REQUIRED}, base="input"),
    MethodSpec("slerp", {"t": REQUIRED}, {}),
    MethodSpec("nuslerp", {"nuslerp_row_wise": False, "nuslerp_flatten": True}, {"weight": REQUIRED}, base="optional"),
    MethodSpec("multislerp", {"normalize_weights": True, "eps": 1e-8}, {"weight": REQUIRED}, base="optional"),
    MethodSpec("karcher", {"max_iter": 10, "tol": 1e-5}, {}, base="input"),
    MethodSpec("nearswap", {"t": REQUIRED}, {}),
    MethodSpec("passthrough", {}, {"scale": None}, base="input"),
    MethodSpec("model_stock", {"filter_wise": False}, {}),
    MethodSpec("sce", {"int8_mask": False, "select_topk": 1.0}, {}),
    _gta("task_arithmetic", None, None, normalize=False, rescale=False),
    _gta("ties", "magnitude", "sum", normalize=True, rescale=False),
    _gta("dare_ties", "random", "sum", normalize=False, rescale=True),
    _gta("dare_linear", "random", None, normalize=False, rescale=True),
    _gta("breadcrumbs", "magnitude_outliers", None, normalize=False, rescale=False, extra={"gamma": 0.01}),
    _gta("breadcrumbs_ties", "magnitude_outliers", "sum", normalize=False, rescale=False, extra={"gamma": 0.01}),
    _gta("della", "della", "sum", normalize=True, rescale=True, extra={"epsilon": 0.15}),
    _gta("della_linear", "della", None, normalize=False, rescale=True, extra={"epsilon": 0.15}),
]}
KNOWN_PARAMETERS = {p for m in METHODS.values() for p in (*m.global_params, *m.tensor_params)}
# other spellings of the same methods
ALIASES = {"model_soup": "linear", "soup": "linear", "dare": "dare_ties", "della_ties": "della"}

TOP_LEVEL_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "tokenizer", "expert_bias", "seed", "name"}
DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


@dataclass
class Source:
    model: str  # resolved checkpoint directory
    layer_range: tuple[int, int] | None = None  # None: all layers (filled in once configs are read)
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Slice:
    sources: list[Source]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeSpec:
    """A validated merge configuration."""

    method: MethodSpec
    base_model: str | None
    slices: list[Slice]  # without `slices` in the YAML: one slice over all layers of `models`
    model_parameters: dict[str, dict[str, Any]]  # from `models:` entries
    parameters: dict[str, Any]
    dtype: str | None
    tokenizer_source: str | None  # a model directory, or None = the base model (else the first model)
    expert_bias: str
    seed: int
    explicit_slices: bool
    raw: dict[str, Any]  # the configuration as given (for the manifest)
    notes: list[str] = field(default_factory=list)  # e.g. parameters this method ignores

    @property
    def base_is_input(self) -> bool:
        """Whether base_model joins every slice's inputs: always for task-vector methods (placed at the
        first source's layers in explicit slices); for the others only in the `models` form, as mergekit
        adds it there."""
        return bool(self.base_model) and (self.method.task_vectors or not self.explicit_slices)

    @property
    def models(self) -> list[str]:
        """Every input directory, base first, each once."""
        out = [self.base_model] if self.base_model else []
        for s in self.slices:
            for src in s.sources:
                if src.model not in out:
                    out.append(src.model)
        return out

    # -------------------------------------------------------------------------------- parameter lookup
    def global_param(self, name: str, tensor: str, t: float, slice_index: int) -> Any:
        levels = [self.slices[slice_index].parameters, self.parameters]
        return self._lookup(name, tensor, t, levels, self.method.global_params, where="")

    def tensor_param(self, name: str, model: str, tensor: str, t: float, slice_index: int) -> Any:
        sl = self.slices[slice_index]
        levels = [src.parameters for src in sl.sources if src.model == model][:1]
        levels += [sl.parameters, self.model_parameters.get(model, {}), self.parameters]
        return self._lookup(name, tensor, t, levels, self.method.tensor_params, where=f" for model {model}")

    def _lookup(self, name: str, tensor: str, t: float, levels: list[dict[str, Any]], defaults: dict[str, Any],
                where: str) -> Any:
        for level in levels:
            if name in level:
                value = evaluate_setting(level[name], tensor, t, name)
                if value is not None:
                    return value
        default = defaults[name]
        if default is REQUIRED:
            raise MergeConfigError(f"merge_method {self.method.name} needs parameter {name!r}{where} "
                                   f"(tensor {tensor}); set it under parameters")
        return default


def evaluate_setting(setting: Any, tensor: str, t: float, name: str = "parameter") -> Any:
    """A parameter's value for one tensor: scalar, gradient over t in [0, 1], or filtered conditions."""
    if setting is None or isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, dict):
        return evaluate_setting([setting], tensor, t, name)
    if isinstance(setting, (list, tuple)):
        if not setting:
            raise MergeConfigError(f"parameter {name!r} is an empty list")
        if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            if len(setting) == 1:
                return float(setting[0])
            scaled = t * (len(setting) - 1)
            i0 = min(int(math.floor(scaled)), len(setting) - 1)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        if all(isinstance(e, (bool, str)) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        for cond in setting:
            if not isinstance(cond, dict):
                raise MergeConfigError(f"parameter {name!r}: a list must hold only numbers (a gradient) or only "
                                       f"{{filter, value}} conditions; got {cond!r}")
            if not cond.get("filter") or cond["filter"] == "*" or cond["filter"] in tensor:
                return evaluate_setting(cond["value"], tensor, t, name)
        return None
    raise MergeConfigError(f"parameter {name!r} has unsupported value {setting!r}")


def _check_setting(setting: Any, name: str, where: str) -> None:
    conds = setting if isinstance(setting, list) else [setting]
    for cond in conds:
        if isinstance(cond, dict):
            unknown = sorted(set(cond) - {"filter", "value"})
            if unknown or "value" not in cond:
                raise MergeConfigError(f"parameter {name!r}{where}: a condition is {{filter, value}}; "
                                       f"got keys {sorted(cond)}")
            _check_setting(cond["value"], name, where)
        elif isinstance(cond, list):
            raise MergeConfigError(f"parameter {name!r}{where}: nested lists are not a parameter value")


def _check_params(params: Any, allowed: set[str], method: str, where: str, hint: str = "",
                  ignored: list[str] | None = None) -> dict[str, Any]:
    """The parameters of one level, validated. A name this method does not use but another mergekit
    method does (`weight` under model_stock, `density` under linear) is dropped and listed in `ignored`,
    as mergekit ignores it, so a YAML written for mergekit still runs; a name no method knows (a typo)
    or a method-level one given per model (where mergekit would silently drop it) is an error."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise MergeConfigError(f"parameters{where} must be a mapping, got {params!r}")
    own = set(METHODS[method].global_params) | set(METHODS[method].tensor_params)
    unused = sorted(k for k in set(params) - allowed if k in KNOWN_PARAMETERS and k not in own)
    unknown = sorted(set(params) - allowed - set(unused))
    if unknown:
        raise MergeConfigError(f"unknown parameter(s) {unknown}{where} for merge_method {method}; "
                               f"it accepts {sorted(allowed)}{hint}")
    if unused and ignored is not None:
        ignored.append(f"parameter(s) {unused}{where} are not used by merge_method {method} (ignored, as mergekit "
                       "does)")
    for name, value in params.items():
        _check_setting(value, name, where)
    return {k: v for k, v in params.items() if k not in unused}


def _model_path(value: Any, where: str, base_dir: Path | None) -> str:
    if not isinstance(value, (str, Path)) or not str(value):
        raise MergeConfigError(f"{where}: expected a checkpoint directory, got {value!r}")
    path = Path(str(value).removeprefix("model:")).expanduser()
    if not path.is_absolute() and not path.exists() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    return str(path.resolve())


def _dtype(value: Any) -> str | None:
    if value is None:
        return None
    name = _DTYPE_ALIASES.get(str(value), str(value)).removeprefix("torch.")
    if name not in DTYPES:
        raise MergeConfigError(f"dtype {value!r} is not supported; choose one of {list(DTYPES)}")
    return name


def parse_merge_config(data: dict[str, Any], *, base_dir: str | Path | None = None, seed: int = 0) -> MergeSpec:
    """Validate a mergekit-style dict (see the module docstring) into a `MergeSpec`."""
    if not isinstance(data, dict):
        raise MergeConfigError(f"a merge configuration is a mapping, got {type(data).__name__}")
    raw = copy.deepcopy(data)
    base_dir = Path(base_dir) if base_dir is not None else None
    unknown = sorted(set(data) - TOP_LEVEL_KEYS)
    if unknown:
        raise MergeConfigError(f"unknown merge configuration key(s) {unknown}; accepted: {sorted(TOP_LEVEL_KEYS)}")
    name = data.get("merge_method")
    if not name:
        raise MergeConfigError(f"merge configuration needs merge_method (one of {sorted(METHODS)})")
    name = ALIASES.get(str(name), str(name))
    if name not in METHODS:
        raise MergeConfigError(f"unknown merge_method {data['merge_method']!r}; available: {sorted(METHODS)}")
    method = METHODS[name]
    allowed_global = set(method.global_params) | set(method.tensor_params)
    notes: list[str] = []
    parameters = _check_params(data.get("parameters"), allowed_global, name, " in parameters", ignored=notes)
    per_model_hint = ""
    if method.global_params:
        per_model_hint = f" (method-level {sorted(method.global_params)} go under the top-level parameters)"

    base = _model_path(data["base_model"], "base_model", base_dir) if data.get("base_model") else None
    if data.get("models") and data.get("slices"):
        raise MergeConfigError("give either models or slices, not both")
    model_parameters: dict[str, dict[str, Any]] = {}
    slices: list[Slice] = []
    if data.get("slices"):
        for i, sl in enumerate(data["slices"]):
            if not isinstance(sl, dict) or not sl.get("sources"):
                raise MergeConfigError(f"slices[{i}] needs a non-empty sources list")
            extra = sorted(set(sl) - {"sources", "parameters"})
            if extra:
                raise MergeConfigError(f"unknown key(s) {extra} in slices[{i}]; accepted: sources, parameters")
            sources = []
            for j, src in enumerate(sl["sources"]):
                where = f"slices[{i}].sources[{j}]"
                if not isinstance(src, dict) or "model" not in src:
                    raise MergeConfigError(f"{where} needs a model")
                extra = sorted(set(src) - {"model", "layer_range", "parameters"})
                if extra:
                    raise MergeConfigError(f"unknown key(s) {extra} in {where}; accepted: model, layer_range, "
                                           "parameters")
                lr = src.get("layer_range")
                if lr is not None:
                    if (not isinstance(lr, (list, tuple)) or len(lr) != 2 or not all(isinstance(v, int) for v in lr)
                            or lr[0] < 0 or lr[1] <= lr[0]):
                        raise MergeConfigError(f"{where}.layer_range must be [start, end) with 0 <= start < end; "
                                               f"got {lr!r}")
                    lr = (int(lr[0]), int(lr[1]))
                params = _check_params(src.get("parameters"), set(method.tensor_params), name,
                                       f" in {where}.parameters", per_model_hint, notes)
                sources.append(Source(_model_path(src["model"], f"{where}.model", base_dir), lr, params))
            slices.append(Slice(sources, _check_params(sl.get("parameters"), allowed_global, name,
                                                       f" in slices[{i}].parameters", ignored=notes)))
    else:
        entries = data.get("models") or []
        if not entries:
            raise MergeConfigError("merge configuration needs models (or slices)")
        sources = []
        for j, entry in enumerate(entries):
            if isinstance(entry, (str, Path)):
                entry = {"model": entry}
            if not isinstance(entry, dict) or "model" not in entry:
                raise MergeConfigError(f"models[{j}] needs a model")
            extra = sorted(set(entry) - {"model", "parameters"})
            if extra:
                raise MergeConfigError(f"unknown key(s) {extra} in models[{j}]; accepted: model, parameters")
            path = _model_path(entry["model"], f"models[{j}].model", base_dir)
            if any(s.model == path for s in sources):
                raise MergeConfigError(f"models[{j}]: {path} is listed twice")
            model_parameters[path] = _check_params(entry.get("parameters"), set(method.tensor_params), name,
                                                   f" in models[{j}].parameters", per_model_hint, notes)
            sources.append(Source(path))
        slices.append(Slice(sources))

    if method.needs_base and not base:
        raise MergeConfigError(f"merge_method {name} needs base_model")
    for i, sl in enumerate(slices):
        paths = list(dict.fromkeys(s.model for s in sl.sources))
        if base and base not in paths and (method.task_vectors or not data.get("slices")):
            paths.append(base)  # mergekit adds base_model to the inputs (we also place it in explicit slices)
        others = [p for p in paths if p != base] if method.task_vectors else paths
        where = f" in slices[{i}]" if data.get("slices") else ""
        if name in ("slerp", "nearswap") and len(others) != 1:
            raise MergeConfigError(f"{name} merges exactly two models, base_model and one other{where}; "
                                   f"got {len(paths)}")
        if name == "nuslerp" and len(others) != 2:
            raise MergeConfigError(f"nuslerp merges exactly two models besides an optional base_model{where}; "
                                   f"got {len(others)}")
        if name == "model_stock" and len(others) < 2:
            raise MergeConfigError(f"model_stock needs at least two models besides base_model{where}")
        if name == "passthrough" and len(paths) != 1:
            raise MergeConfigError(f"passthrough takes exactly one input per slice (base_model counts as one)"
                                   f"{where}; got {len(paths)}")
        if not others:
            raise MergeConfigError(f"merge_method {name} needs at least one model besides base_model{where}")

    expert_bias = str(data.get("expert_bias", "base"))
    if expert_bias not in ("base", "mean"):
        raise MergeConfigError(f"expert_bias={expert_bias!r}; choose base or mean")
    tok = data.get("tokenizer_source")
    if isinstance(data.get("tokenizer"), dict):
        extra = sorted(set(data["tokenizer"]) - {"source"})
        if extra:
            raise MergeConfigError(f"tokenizer: only source is supported; got {extra}")
        tok = data["tokenizer"].get("source", tok)
    elif data.get("tokenizer") is not None:
        raise MergeConfigError("tokenizer must be a mapping {source: ...}")
    if tok == "union":
        raise MergeConfigError("tokenizer_source: union is not supported: inputs must share one vocabulary "
                               "(use base or a model directory)")
    tokenizer_source = None if tok in (None, "base") else _model_path(tok, "tokenizer_source", base_dir)
    return MergeSpec(method=method, base_model=base, slices=slices, model_parameters=model_parameters,
                     parameters=parameters, dtype=_dtype(data.get("out_dtype") or data.get("dtype")),
                     tokenizer_source=tokenizer_source, expert_bias=expert_bias,
                     seed=int(data.get("seed", seed)), explicit_slices=bool(data.get("slices")), raw=raw,
                     notes=notes)


def load_merge_config(path: str | Path, *, seed: int = 0) -> MergeSpec:
    """Parse a YAML file; relative model paths that do not exist from the working directory are tried
    relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"merge configuration {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise MergeConfigError(f"{path} is not valid YAML: {err}") from None
    try:
        return parse_merge_config(data, base_dir=path.parent, seed=seed)
    except MergeConfigError as err:
        raise MergeConfigError(f"{path}: {err}") from None
