"""The package's floors: each layer imports only the layers below it (docs/design.md draws them).

``storage`` is the floor (it imports nothing from ``tasks`` or ``flows``); inside ``tasks``, from the bottom:
``core``, ``data``, ``models``, ``quantization``, ``evaluation``, ``sweep``, ``release``, ``views``, then
``stages``, the Prefect tasks; ``flows`` wires the stages. Every import counts, also those inside functions and
under ``TYPE_CHECKING`` (``tests/test_imports.py`` reads them the same way)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from test_imports import imports_of, modules

# Bottom to top. A module may import its own layer and any layer below it.
LAYERS = (
    "ptqflow.storage",
    "ptqflow.tasks.core",
    "ptqflow.tasks.data",
    "ptqflow.tasks.models",
    "ptqflow.tasks.quantization",
    "ptqflow.tasks.evaluation",
    "ptqflow.tasks.sweep",
    "ptqflow.tasks.release",
    "ptqflow.tasks.views",
    "ptqflow.tasks.stages",
    "ptqflow.tasks",  # the package's __init__: the install check, before any stage imports TensorFlow
    "ptqflow.flows",
    "ptqflow",
)
STAGES = "ptqflow.tasks.stages"


def layer_of(module: str) -> str:
    """The most specific layer ``module`` belongs to."""
    return max((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), key=len)


def imports_against_the_layers(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a higher layer, as ``importer -> imported``."""
    rank = {layer: position for position, layer in enumerate(LAYERS)}
    return sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if rank[layer_of(target)] > rank[layer_of(module)]
    )


def prefect_tasks_in(path: Path) -> list[str]:
    """Functions decorated with Prefect's ``@task`` (called or not) in ``path``."""

    def is_task(decorator: ast.expr) -> bool:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        return (isinstance(target, ast.Name) and target.id == "task") or (
            isinstance(target, ast.Attribute) and target.attr == "task"
        )

    return [
        node.name
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(map(is_task, node.decorator_list))
    ]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, name, set(found)) for name, path in found.items()}


def test_every_module_imports_only_its_own_layer_and_those_below(graph):
    assert {layer_of(m) for m in graph} == set(LAYERS), "every layer holds modules, and every module has a layer"
    assert imports_against_the_layers(graph) == []


def test_storage_imports_nothing_from_tasks_or_flows(graph):
    storage = {m: targets for m, targets in graph.items() if layer_of(m) == "ptqflow.storage"}
    assert storage and all(t.startswith("ptqflow.storage") for targets in storage.values() for t in targets)


def test_the_five_stages_are_side_by_side_and_only_stages_define_prefect_tasks():
    found = modules()
    tasks_by_module = {name: prefect_tasks_in(path) for name, path in found.items() if name.startswith("ptqflow.tasks")}
    assert {m for m, defined in tasks_by_module.items() if defined} <= {m for m in found if m.startswith(STAGES)}
    stage_tasks = {name for m, defined in tasks_by_module.items() for name in defined}
    for stage in ("sample_dataset", "train_float_model", "materialize_calibration_set", "convert_to_tflite"):
        assert stage in stage_tasks
    assert "validate_with_interpreter" in stage_tasks
    assert {f"{STAGES}.{name}" for name in ("sample", "train", "calibrate", "convert", "validate")} <= set(found)


@pytest.mark.parametrize(
    "graph, against",
    [
        # The flat layout before the floors: a stage's module named a quantization method from a model helper.
        ({"ptqflow.tasks.models.feeds": {"ptqflow.tasks.quantization.converter"}}, 1),
        ({"ptqflow.storage.tables": {"ptqflow.tasks.core.limits"}}, 1),
        ({"ptqflow.tasks.stages.validate": {"ptqflow.tasks.views.render", "ptqflow.storage.store"}}, 0),
        ({"ptqflow.tasks.core.errors": {"ptqflow.flows.cli"}}, 1),
    ],
)
def test_the_layer_check_finds_imports_of_a_higher_layer(graph, against):
    assert len(imports_against_the_layers(graph)) == against


def test_a_function_level_import_of_a_higher_layer_is_found(tmp_path):
    (tmp_path / "feeds.py").write_text("def f():\n    from ptqflow.tasks.views.render import render_html\n")
    known = {"ptqflow.tasks.views.render", "ptqflow.tasks.models.feeds"}
    graph = {"ptqflow.tasks.models.feeds": imports_of(tmp_path / "feeds.py", "ptqflow.tasks.models.feeds", known)}
    assert imports_against_the_layers(graph) == ["ptqflow.tasks.models.feeds -> ptqflow.tasks.views.render"]
