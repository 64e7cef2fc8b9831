"""A chain file: the whole pipeline as an ordered list of steps, each a stage or a data job.

```yaml
description: what this chain is for
common: [trainer.log_every=10]          # Hydra overrides given to every stage step
steps:
  - name: shards                         # also the step's directory name and its placeholder
    job: tokenize                        # a data_pipelines job: `args` is its config (output_dir is set)
    args: {tokenizer: "{tokenizer}"}
  - name: teacher
    stage: pretrain                      # an lfm2_train stage: `overrides` are Hydra overrides
    overrides: [data.path={shards}, trainer.max_steps=200]
    evaluate: true                       # score the step's `final/` on the chat-arithmetic task
```

`{name}` in any string is replaced by that earlier step's directory, `{out}` by the step's own. Steps only
talk through these directories, never through globals, which is what makes skipping and resuming safe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ..config.paths import chain_path

# The data jobs a chain step may run (the runner finds them by name through lfm2_train.jobs).
DATA_JOBS = ("train_tokenizer", "tokenize", "scoring", "curriculum", "preference_pairs", "sft_difficulty",
             "chat_shards")
BUILTIN_JOBS = ("export",)
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ChainSpecError(ValueError):
    """The chain file cannot be run as written; the message names the file and the step."""


@dataclass
class Step:
    name: str
    stage: str | None = None  # an lfm2_train stage (pretrain, distill, sft, ...)
    job: str | None = None  # or a data_pipelines job / a built-in job
    overrides: list[str] = field(default_factory=list)  # stage steps: Hydra overrides
    args: dict[str, Any] = field(default_factory=dict)  # job steps: the job's config
    evaluate: bool = False  # measure the task metric on the step's model

    @property
    def kind(self) -> str:
        return f"stage:{self.stage}" if self.stage else f"job:{self.job}"

    def references(self) -> list[str]:
        """Names of the earlier steps this step reads (from its `{placeholders}`)."""
        text = " ".join(self.overrides) + " " + repr(self.args)
        return [n for n in dict.fromkeys(_PLACEHOLDER.findall(text)) if n != "out"]


@dataclass
class ChainSpec:
    name: str
    steps: list[Step]
    description: str = ""
    common: list[str] = field(default_factory=list)
    eval_levels: list[int] | None = None  # the task levels `evaluate: true` scores (None = all)
    # token shards (usually "{shards}") whose held-out documents give each evaluated model's LM loss
    eval_lm_data: str | None = None
    source: str = "<chain>"

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)


_STEP_KEYS = {"name", "stage", "job", "overrides", "args", "evaluate"}
_TOP_KEYS = {"description", "common", "steps", "eval_levels", "eval_lm_data"}


def load_chain(chain: str) -> ChainSpec:
    """A chain by packaged name (`tiny`) or by YAML path; every step is checked before anything runs."""
    path = Path(chain)
    if not path.suffix:
        path = chain_path(chain)
    if not path.is_file():
        raise ChainSpecError(f"stage.chain={chain!r}: no such chain file ({path})")
    where = str(path)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # yaml / interpolation errors: say which file
        raise ChainSpecError(f"{where}: cannot read the chain file: {err}") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("steps"), list) or not raw["steps"]:
        raise ChainSpecError(f"{where}: expected a mapping with a non-empty `steps` list")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ChainSpecError(f"{where}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    steps: list[Step] = []
    for i, item in enumerate(raw["steps"]):
        label = f"{where}: steps[{i}]"
        if not isinstance(item, dict):
            raise ChainSpecError(f"{label}: expected a mapping")
        bad = set(item) - _STEP_KEYS
        if bad:
            raise ChainSpecError(f"{label}: unknown key(s) {sorted(bad)}; allowed: {sorted(_STEP_KEYS)}")
        step = Step(**item)
        label = f"{where}: step {step.name!r}"
        if not isinstance(step.name, str) or not _NAME.match(step.name) or step.name == "out":
            raise ChainSpecError(f"{where}: steps[{i}].name={step.name!r} must be an identifier other than 'out'")
        if any(s.name == step.name for s in steps):
            raise ChainSpecError(f"{label}: the name is used twice")
        if (step.stage is None) == (step.job is None):
            raise ChainSpecError(f"{label}: give exactly one of `stage` or `job`")
        if step.job is not None and step.job not in DATA_JOBS + BUILTIN_JOBS:
            raise ChainSpecError(f"{label}: unknown job {step.job!r}; available: {list(DATA_JOBS + BUILTIN_JOBS)}")
        if step.stage is not None and step.args:
            raise ChainSpecError(f"{label}: stage steps take `overrides`, not `args`")
        if step.job is not None and step.overrides:
            raise ChainSpecError(f"{label}: job steps take `args`, not `overrides`")
        known = {s.name for s in steps}
        for ref in step.references():
            if ref not in known:
                raise ChainSpecError(f"{label}: `{{{ref}}}` does not name an earlier step ({sorted(known) or 'none'})")
        steps.append(step)
    common = raw.get("common") or []
    lm_data = raw.get("eval_lm_data")
    if lm_data is not None:
        unknown_refs = [m.group(1) for m in _PLACEHOLDER.finditer(str(lm_data)) if m.group(1) not in
                        {s.name for s in steps}]
        if unknown_refs:
            raise ChainSpecError(f"{where}: eval_lm_data: `{{{unknown_refs[0]}}}` does not name a step")
    return ChainSpec(name=path.stem, steps=steps, description=raw.get("description", ""), common=list(common),
                     eval_levels=raw.get("eval_levels"), eval_lm_data=lm_data, source=where)


def substitute(value: Any, dirs: dict[str, Path]) -> Any:
    """`value` with every `{step}` placeholder replaced by that step's directory (recursively)."""
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: str(dirs[m.group(1)]) if m.group(1) in dirs else m.group(0), value)
    if isinstance(value, list):
        return [substitute(v, dirs) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, dirs) for k, v in value.items()}
    return value
