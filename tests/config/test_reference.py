"""The generated configuration reference: current, complete, comments parsed, isolated from stray configs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from lfm2_train.config import reference
from lfm2_train.config.reference import DEFAULT_OUTPUT, REGENERATE, field_doc, field_rows, main, render


@pytest.fixture(scope="module")
def rendered() -> str:
    return render()


def test_docs_config_reference_is_current(rendered):
    current = DEFAULT_OUTPUT.read_text() if DEFAULT_OUTPUT.is_file() else ""
    assert current == rendered, f"docs/CONFIG_REFERENCE.md is stale; regenerate it with `{REGENERATE}`"


def test_every_registered_stage_and_field_is_listed(rendered):
    from lfm2_train.config import register_configs

    register_configs()
    stages = ConfigStore.instance().repo["stage"]
    assert {"pretrain.yaml", "distill.yaml", "cache_teacher.yaml"} <= set(stages)
    for name, node in stages.items():
        assert f"`stage={name.removesuffix('.yaml')}`" in rendered or f"`{name.removesuffix('.yaml')}`" in rendered
        cls = OmegaConf.get_type(node.node)
        for f in dataclasses.fields(cls):
            assert f"`stage.{f.name}" in rendered, f"stage {name}: field {f.name} missing from the reference"
    for key in ("`optim.lr`", "`trainer.resume`", "`data.pacing.kind`", "`distributed.zero_stage`",
                "`stage.kd.temperature`", "`sources[].weight`", "`fim.rate`"):
        assert key in rendered


@dataclass
class _Inner:
    depth: int = 3  # how deep


@dataclass
class _Sample:
    """Why this sample exists."""

    plain: int = 1
    # above the field
    above: str = "x"  # and trailing
    choice: str = "a|b"  # a | b (a '#' inside a string is not a comment: "#no")
    long_one: str | None = None  # a trailing comment long enough to hit the line-length limit and wrap onto
    # the next line, which still describes long_one
    inner: _Inner = field(default_factory=_Inner)
    items: list[_Inner] = field(default_factory=list)


def test_comments_types_and_nested_fields():
    assert field_doc(_Sample, "plain").comment == ""
    assert field_doc(_Sample, "above").comment == "above the field and trailing"
    assert field_doc(_Sample, "choice").comment == "a | b (a '#' inside a string is not a comment: \"#no\")"
    assert field_doc(_Sample, "long_one").comment.endswith("wrap onto the next line, which still describes long_one")
    assert field_doc(_Sample, "inner").comment == ""
    rows = {r.key: r for r in field_rows(_Sample, {"plain": 1, "above": "x", "choice": "a|b", "long_one": None,
                                                    "inner": {"depth": 3}, "items": []}, "s.")}
    assert rows["s.long_one"].type == "str | None" and rows["s.long_one"].default == "null"
    assert rows["s.inner.depth"].description == "how deep" and rows["s.inner.depth"].default == "3"
    assert rows["s.items"].default == "[]" and rows["s.items[].depth"].default == "3"
    assert "s.inner" not in rows


def test_check_flag_reports_stale_and_current(tmp_path, capsys, monkeypatch, rendered):
    monkeypatch.setattr(reference, "render", lambda: rendered)
    out = tmp_path / "ref.md"
    assert main(["--check", "--output", str(out)]) == 1
    assert "is missing" in capsys.readouterr().err
    out.write_text("old\n")
    assert main(["--check", "--output", str(out)]) == 1
    assert REGENERATE in capsys.readouterr().err
    assert main(["--output", str(out)]) == 0 and out.read_text() == rendered
    assert main(["--check", "--output", str(out)]) == 0


def test_stray_configs_in_the_store_do_not_leak_and_are_kept(rendered):
    cs = ConfigStore.instance()
    cs.store(group="stage", name="zz_test_only", node=_Sample)
    try:
        assert render() == rendered
        assert "zz_test_only.yaml" in cs.repo["stage"]
        assert "hydra" in cs.repo  # Hydra's own configs survive the isolated registration
    finally:
        del cs.repo["stage"]["zz_test_only.yaml"]
