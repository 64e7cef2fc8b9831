"""When a stage is missing an input, say what it needs — and, if the tiny chain has run here, the exact
command that feeds it the chain's outputs (docs/CHAIN.md maps every chain directory to the input it feeds)."""

from __future__ import annotations

from pathlib import Path

# stage -> [(override, glob inside a chain work directory)], in the order the command line shows them
CHAIN_INPUTS: dict[str, list[tuple[str, str]]] = {
    "cache_teacher": [("stage.teacher", "*-teacher/final"), ("data.path", "*-shards")],
    "distill": [("stage.teacher_cache", "*-teacher_cache/cache"), ("data.path", "*-shards")],
    "midtrain": [("model.init_from", "*-teacher/final"), ("data.path", "*-shards")],
    "sft": [("model.init_from", "*-student/final")],
    "preference": [("model.init_from", "*-sft/final"), ("stage.dataset", "*-pairs/pairs.jsonl")],
    "eval": [("model.init_from", "*-export/model")],
    "generate": [("model.init_from", "*-export/model")],
}


def chain_command(stage: str, root: Path = Path("outputs")) -> str | None:
    """`python -m lfm2_train stage=<stage> key=<chain output> …` from the newest chain run under `root`."""
    wanted = CHAIN_INPUTS.get(stage)
    if not wanted or not root.is_dir():
        return None
    for workdir in sorted(root.glob("chain-*"), key=lambda p: p.stat().st_mtime, reverse=True):
        found = [sorted(workdir.glob(pattern)) for _, pattern in wanted]
        if all(found):
            args = " ".join(f"{key}={paths[-1]}" for (key, _), paths in zip(wanted, found))
            return f"python -m lfm2_train stage={stage} {args}"
    return None


def needs(stage: str, what: str) -> str:
    """The message for a missing input, with the command that uses the chain's outputs when they exist."""
    command = chain_command(stage)
    return f"stage={stage} needs {what}" + (f". The tiny chain's outputs are here:\n  {command}" if command else "")
