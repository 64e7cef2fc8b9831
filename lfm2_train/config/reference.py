"""Render every registered config group and option as Markdown: `docs/CONFIG_REFERENCE.md`.

`python -m lfm2_train.config.reference` regenerates the file; `--check` exits 1 when it is stale. The tables
come from the structured configs themselves (ConfigStore nodes for the values, the dataclass source for the
types and the `# comments`), so a field added to a schema shows up without anyone editing the docs, and a
test (`tests/config/test_reference.py`) fails until the file is regenerated.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from hydra.core.config_store import ConfigNode, ConfigStore
from omegaconf import OmegaConf

from ..jobs import job_module, job_names
from .paths import RECIPE_DIR, packaged_chains, recipe_files

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "CONFIG_REFERENCE.md"
REGENERATE = "python -m lfm2_train.config.reference"
MAX_DEFAULT_CHARS = 60


# ---------------------------------------------------------------------------------------------- source comments
@dataclasses.dataclass
class FieldDoc:
    annotation: str
    comment: str


@cache
def _class_field_docs(cls: type) -> dict[str, FieldDoc]:
    """Annotation text and comments of the fields a class defines itself: the trailing `# comment` on the
    field's line(s), preceded by any comment lines directly above it."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(src)
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, whole line)
    lines = src.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            whole = not lines[row - 1][:col].strip()
            comments[row] = (tok.string.lstrip("#").strip(), whole)
    docs: dict[str, FieldDoc] = {}
    previous_end = body[0].lineno - 1 if body else 0
    previous: str | None = None
    for stmt in body:
        above = []
        row = stmt.lineno - 1
        while row > previous_end and row in comments and comments[row][1]:
            above.insert(0, comments[row][0])
            row -= 1
        if previous is not None and above and _wrapped(lines[previous_end - 1], comments.get(previous_end)):
            # A long trailing comment continued on the next line(s) belongs to the field above.
            docs[previous].comment = " ".join([docs[previous].comment, *above])
            above = []
        previous = None
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            trailing = [comments[r][0] for r in range(stmt.lineno, stmt.end_lineno + 1)
                        if r in comments and not comments[r][1]]
            text = " ".join(part for part in [*above, *trailing] if part)
            docs[stmt.target.id] = FieldDoc(ast.get_source_segment(src, stmt.annotation) or "", text)
            previous = stmt.target.id
        previous_end = stmt.end_lineno or stmt.lineno
    return docs


def _wrapped(line: str, comment: tuple[str, bool] | None) -> bool:
    """A trailing comment that ran into the line-length limit mid-sentence."""
    return (comment is not None and not comment[1] and len(line) >= 100 and bool(comment[0])
            and (comment[0][-1].isalnum() or comment[0][-1] == ","))


def field_doc(cls: type, name: str) -> FieldDoc:
    for klass in cls.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            return _class_field_docs(klass).get(name, FieldDoc("", ""))
    return FieldDoc("", "")


def _doc_line(cls: type) -> str:
    """The class docstring, on one line (dataclasses without one get an auto-generated signature: skip it)."""
    doc = cls.__dict__.get("__doc__") or ""
    if not doc or doc.startswith(f"{cls.__name__}("):
        return ""
    return " ".join(doc.split())


# ---------------------------------------------------------------------------------------------- values
def _dataclass_of(annotation: Any) -> tuple[type | None, bool]:
    """(dataclass, is a list of it) for a resolved type hint, else (None, False)."""
    origin = typing.get_origin(annotation)
    if origin in (list, typing.List):  # noqa: UP006 - typing.List may come back from get_type_hints
        args = typing.get_args(annotation)
        if args and dataclasses.is_dataclass(args[0]):
            return args[0], True
        return None, False
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            return _dataclass_of(inner[0])
        return None, False
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return annotation, False
    return None, False


def _format_value(value: Any) -> str:
    if value == "???":
        return "??? (required)"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    text = text.removesuffix("...").strip()
    if len(text) > MAX_DEFAULT_CHARS:
        if isinstance(value, list):
            return f"({len(value)} items)"
        if isinstance(value, dict):
            return f"({len(value)} keys)"
        return text[: MAX_DEFAULT_CHARS - 1] + "…"
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


@dataclasses.dataclass
class Row:
    key: str
    type: str
    default: str
    description: str


def field_rows(cls: type, values: Any, prefix: str) -> list[Row]:
    """One row per leaf field of `cls` (nested dataclasses and lists of dataclasses flattened)."""
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    rows: list[Row] = []
    for f in dataclasses.fields(cls):
        if f.name == "defaults":  # Hydra's defaults list, not a key
            continue
        doc = field_doc(cls, f.name)
        value = values.get(f.name, "???") if isinstance(values, dict) else "???"
        inner, is_list = _dataclass_of(hints.get(f.name))
        key = f"{prefix}{f.name}"
        if inner is not None and not is_list and isinstance(value, dict):
            rows.extend(field_rows(inner, value, f"{key}."))
            continue
        rows.append(Row(key, doc.annotation, _format_value(value), doc.comment))
        if inner is not None and is_list:
            element = OmegaConf.to_container(OmegaConf.structured(inner), resolve=False)
            rows.extend(field_rows(inner, element, f"{key}[]."))
    return rows


def _table(rows: list[Row]) -> list[str]:
    out = ["| key | type | default | description |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| `{r.key}` | {_cell(r.type)} | `{_cell(r.default)}` | {_cell(r.description)} |")
    return out


# ---------------------------------------------------------------------------------------------- the store
@contextmanager
def _isolated_store() -> Iterator[ConfigStore]:
    """Register into an empty repository so that configs a test (or anything else in this process) stored
    do not leak into the reference; whatever was registered meanwhile is added back afterwards."""
    import hydra.conf  # noqa: F401 - Hydra's own configs must be in the real repository, not in ours

    cs = ConfigStore.instance()
    saved = cs.repo
    cs.repo = {}
    try:
        yield cs
    finally:
        fresh, cs.repo = cs.repo, saved
        _merge_missing(saved, fresh)


def _merge_missing(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if key not in into:
            into[key] = value
        elif isinstance(into[key], dict) and isinstance(value, dict):
            _merge_missing(into[key], value)


def _node_type(node: ConfigNode) -> type | None:
    t = OmegaConf.get_type(node.node)
    return t if isinstance(t, type) and dataclasses.is_dataclass(t) else None


def _values(node: ConfigNode) -> dict[str, Any]:
    return OmegaConf.to_container(node.node, resolve=False)  # type: ignore[return-value]


def _collect() -> tuple[dict[str, Any], dict[str, ConfigNode]]:
    """(lfm2_train repository, data-job primary configs) registered by the code as it is now."""
    from . import schema

    with _isolated_store() as cs:
        schema.register_configs()
        main_repo = cs.repo
    jobs: dict[str, ConfigNode] = {}
    for name in job_names():
        module = job_module(name)
        register = getattr(module, "register_configs", None) or getattr(module, "_register_hydra", None)
        if register is None:
            continue
        with _isolated_store() as cs:
            register()
            for name, node in cs.repo.items():
                if isinstance(node, ConfigNode) and _node_type(node) is not None:
                    jobs[name.removesuffix(".yaml")] = node
    return main_repo, jobs


def _root_defaults(root_cls: type) -> list[tuple[str, str | None]]:
    defaults = root_cls().defaults
    out = []
    for entry in defaults:
        if isinstance(entry, dict):
            (group, option), = entry.items()
            out.append((group.removeprefix("override ").strip("/"), option))
    return out


# ---------------------------------------------------------------------------------------------- sections
def _group_section(group: str, default: str | None, options: dict[str, ConfigNode]) -> list[str]:
    names = [n.removesuffix(".yaml") for n in options]
    listed = ", ".join(f"`{n}`" + (" (default)" if n == default else "") for n in names)
    out = [f"### `{group}`", "", f"Options: {listed}.", ""]
    by_class: dict[type, list[str]] = {}
    for name, node in options.items():
        cls = _node_type(node)
        if cls is not None:
            by_class.setdefault(cls, []).append(name.removesuffix(".yaml"))
    for cls, members in by_class.items():
        first = default if default in members else members[0]
        values = _values(options[f"{first}.yaml"])
        if len(by_class) > 1:
            chosen = ", ".join(f"`{group}={m}`" for m in members)
            out += [f"#### {chosen} (`{cls.__name__}`)", ""]
        doc = _doc_line(cls)
        if doc:
            out += [doc, ""]
        rows = field_rows(cls, values, f"{group}.")
        out += _table(rows)
        if len(members) > 1:
            out += ["", f"Defaults above are `{group}={first}`'s. What the other options change:", "",
                    "| option | differs in |", "|---|---|"]
            base = {r.key: r.default for r in rows}
            for m in members:
                if m == first:
                    continue
                diff = [f"`{r.key}={r.default}`" for r in field_rows(cls, _values(options[f"{m}.yaml"]), f"{group}.")
                        if base.get(r.key) != r.default]
                out.append(f"| `{m}` | {_cell(', '.join(diff) or 'nothing')} |")
        out.append("")
    return out


def _yaml_header_description(path: Path) -> str:
    """The first sentence of a YAML file's leading comment block (the `@package` line skipped)."""
    lines = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        text = stripped.lstrip("#").strip()
        if text.startswith("@package"):
            continue
        lines.append(text)
    text = " ".join(lines)
    end = text.find(". ")
    return text[: end + 1] if end != -1 else text


def _recipe_section() -> list[str]:
    files = recipe_files()
    if not files:
        return []
    out = ["### `recipe`", "",
           "YAML files in `recipes/` (`# @package _global_`) that set values across groups. "
           "Apply one with `recipe=<name>`; later command-line overrides still win. `???` values are required "
           "(see `recipes/README.md`).", "",
           "| recipe | stage | model | description |", "|---|---|---|---|"]
    for path in files:
        name = path.relative_to(RECIPE_DIR).with_suffix("").as_posix()
        data = yaml.safe_load(path.read_text()) or {}
        picks: dict[str, str] = {}
        for entry in data.get("defaults", []) or []:
            if isinstance(entry, dict):
                for k, v in entry.items():
                    picks[k.removeprefix("override").strip().strip("/")] = str(v)
        stage, model = picks.get("stage", "—"), picks.get("model", "—")
        out.append(f"| `{name}` | {stage} | {model} | {_cell(_yaml_header_description(path))} |")
    return [*out, ""]


def _chain_section() -> list[str]:
    files = packaged_chains()
    if not files:
        return []
    out = ["### Packaged chains (`stage.chain=<name>`)", "", "| chain | steps | description |", "|---|---|---|"]
    for path in files:
        data = yaml.safe_load(path.read_text()) or {}
        steps = data.get("steps") or []
        names = " → ".join(str(s.get("name")) for s in steps if isinstance(s, dict))
        description = " ".join(str(data.get("description") or "").split())
        out.append(f"| `{path.stem}` | {_cell(names)} | {_cell(description)} |")
    return [*out, ""]


def render() -> str:
    from .schema import RootConfig

    repo, jobs = _collect()
    root_node = repo["lfm2_train.yaml"]
    root_cls = _node_type(root_node) or RootConfig
    root_values = _values(root_node)
    groups = _root_defaults(root_cls)
    group_names = {g for g, _ in groups}
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{REGENERATE}` from the structured configs; do not edit by hand. -->",
        "",
        f"Generated from the dataclasses in `lfm2_train/config/schema.py` and the data jobs' configs by `{REGENERATE}`"
        " (`--check` tells whether this file is current; `tests/config/test_reference.py` fails when it is not).",
        "Every key can be set on the command line (`python -m lfm2_train stage=sft optim.lr=1e-4`), in a recipe "
        "(`recipe=<name>`) or in a YAML file under `--config-dir`; an unknown key is an error naming it. "
        "`??? (required)` marks a value without a default. Descriptions are the comments next to each field.",
        "",
        "## `python -m lfm2_train`",
        "",
        "Config groups (pick an option with `<group>=<option>`, then set its keys with `<group>.<key>=<value>`): "
        + ", ".join(f"`{g}` (default `{d}`)" for g, d in groups if d is not None) + ".",
        "",
        "### Top-level keys",
        "",
    ]
    top_rows = [r for r in field_rows(root_cls, root_values, "") if r.key.split(".")[0] not in group_names]
    out += _table(top_rows) + [""]
    for group, default in groups:
        options = repo.get(group)
        if isinstance(options, dict) and options:
            out += _group_section(group, default, {k: v for k, v in options.items() if isinstance(v, ConfigNode)})
        elif group == "recipe":
            out += _recipe_section()
    out += _chain_section()
    if jobs:
        out += ["## Data jobs (`python -m data_pipelines.<job>`)", "",
                "Offline jobs with their own Hydra configs (`docs/DATA.md`, `docs/CURRICULUM.md`).", ""]
        for name, node in jobs.items():
            cls = _node_type(node)
            assert cls is not None
            out += [f"### `{name}`", ""]
            doc = _doc_line(cls)
            if doc:
                out += [doc, ""]
            out += _table(field_rows(cls, _values(node), "")) + [""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfm2_train.config.reference", description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.is_file() else None
        if current != text:
            why = "is missing" if current is None else "is stale"
            print(f"{args.output} {why}: regenerate it with `{REGENERATE}`", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
