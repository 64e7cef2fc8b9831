"""The import contracts of `.importlinter` (docs/ARCHITECTURE.md, "Layers") hold, and they bite.

Each contract is checked through import-linter's own contract classes against the grimp graph of the code as it
is; then a deliberate back-import is added to a copy of the graph and the contract that forbids it must report
itself broken, so a contract that silently matches nothing cannot pass for a kept one.
"""

from __future__ import annotations

import copy
from pathlib import Path

import grimp
import pytest
from importlinter.api import read_configuration  # also configures import-linter's settings
from importlinter.contracts.acyclic_siblings import AcyclicSiblingsContract
from importlinter.contracts.forbidden import ForbiddenContract
from importlinter.contracts.independence import IndependenceContract
from importlinter.contracts.layers import LayersContract
from importlinter.domain.contract import Contract, ContractCheck

CONFIG = Path(__file__).resolve().parents[1] / ".importlinter"
CONTRACT_TYPES: dict[str, type[Contract]] = {
    "layers": LayersContract,
    "forbidden": ForbiddenContract,
    "independence": IndependenceContract,
    "acyclic_siblings": AcyclicSiblingsContract,
}


@pytest.fixture(scope="module")
def config() -> dict:
    return read_configuration(str(CONFIG))


@pytest.fixture(scope="module")
def graph(config: dict) -> grimp.ImportGraph:
    session = config["session_options"]
    return grimp.build_graph(*session["root_packages"], cache_dir=None,
                             exclude_type_checking_imports=session.get("exclude_type_checking_imports") == "True")


def contract(config: dict, contract_id: str) -> Contract:
    (options,) = [c for c in config["contracts_options"] if c["id"] == contract_id]
    return CONTRACT_TYPES[options["type"]](options["name"], config["session_options"], options)


def check(config: dict, contract_id: str, graph: grimp.ImportGraph,
          extra_import: tuple[str, str] | None = None) -> ContractCheck:
    """The contract checked on a copy of `graph` (checks remove ignored imports), plus one import if given."""
    graph = copy.deepcopy(graph)
    if extra_import is not None:
        graph.add_import(importer=extra_import[0], imported=extra_import[1])
    return contract(config, contract_id).check(graph, verbose=False)


def test_the_config_declares_the_contracts_the_docs_describe(config):
    assert {c["id"]: c["type"] for c in config["contracts_options"]} == {
        "layers": "layers", "library-not-jobs": "forbidden", "jobs-use-the-library": "forbidden",
        "stages-independent": "independence", "acyclic": "acyclic_siblings"}


@pytest.mark.parametrize("contract_id", ["layers", "library-not-jobs", "jobs-use-the-library", "stages-independent",
                                         "acyclic"])
def test_every_contract_is_kept(config, graph, contract_id):
    result = check(config, contract_id, graph)
    assert result.kept, f"{contract_id} is broken: {result.metadata}"


@pytest.mark.parametrize(("contract_id", "back_import"), [
    ("layers", ("lfm2_train.model.lfm2", "lfm2_train.stages.sft")),  # the backbone reaching up into a stage
    ("layers", ("lfm2_train.losses.cross_entropy", "lfm2_train.data.packed")),  # the cycle this layout removed
    ("layers", ("lfm2_train.engine.trainer", "lfm2_train.inference.fast")),  # independent siblings
    ("acyclic", ("lfm2_train.model.lfm2", "lfm2_train.stages.sft")),  # model -> stages -> model
    ("acyclic", ("lfm2_train.model.hf_io", "lfm2_train.model.lfm2")),  # the two-module cycle this layout removed
    ("library-not-jobs", ("lfm2_train.data.packed", "data_pipelines.tokenize")),
    ("jobs-use-the-library", ("data_pipelines.scoring", "lfm2_train.stages.pretrain")),
    ("stages-independent", ("lfm2_train.stages.plan", "lfm2_train.stages.eval")),
])
def test_a_back_import_breaks_its_contract(config, graph, contract_id, back_import):
    result = check(config, contract_id, graph, back_import)
    assert not result.kept
    assert back_import[0].rsplit(".", 1)[0] in repr(result.metadata)  # the report names where it came from


def test_a_new_subpackage_must_be_placed_in_a_layer(config, graph):
    """`exhaustive = true`: a child of lfm2_train that no layer names breaks the layers contract."""
    graph = copy.deepcopy(graph)
    graph.add_module("lfm2_train.unplaced")
    result = contract(config, "layers").check(graph, verbose=False)
    assert not result.kept and "lfm2_train.unplaced" in result.metadata["undeclared_modules"]


def test_the_independence_contract_covers_every_stage_the_dispatcher_runs(config):
    from lfm2_train.stages import STAGES

    (options,) = [c for c in config["contracts_options"] if c["id"] == "stages-independent"]
    assert set(options["modules"]) == set(STAGES.values())


def test_no_two_modules_import_each_other(graph):
    pairs = sorted({tuple(sorted((a, b))) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
                    if a in graph.find_modules_directly_imported_by(b)})
    assert pairs == []
