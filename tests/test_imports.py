"""The package's modules form layers: no module imports one that imports it back, directly or through others.

Every import counts, also those inside functions and under ``TYPE_CHECKING``: a cycle hidden in a function is a
cycle still, one refactoring away from an import error."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each installed package's source lives (pyproject.toml's package-dir mapping).
PACKAGES = {"ptqflow": ROOT / "ptqflow", **{f"ptqflow.{name}": ROOT / name for name in ("flows", "tasks", "storage")}}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join([package, *parts])
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules ``path`` names in its import statements (a ``from package import module`` names the
    module)."""
    is_package = path.name == "__init__.py"
    base = name if is_package else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                source = ".".join([*base.split(".")[: len(base.split(".")) - node.level + 1], *filter(None, [source])])
            targets |= {f"{source}.{alias.name}" for alias in node.names} | {source}
    resolved = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    # A package's __init__ is imported on the way to any of its modules: those edges are not choices to check.
    return {t for t in resolved if not name.startswith(t + ".")}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_one_that_imports_it_back():
    found = modules()
    graph = {name: imports_of(path, name, set(found)) for name, path in found.items()}
    assert len(found) > 40 and graph["ptqflow.tasks.stages.validate"], "the scan found the package's modules"
    assert cycles(graph) == []


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set()}, []),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert cycles(graph) == expected


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    (tmp_path / "one.py").write_text("from pkg.two import f\n")
    (tmp_path / "two.py").write_text("def f():\n    from pkg.one import g\n")
    known = {"pkg.one", "pkg.two"}
    graph = {name: imports_of(tmp_path / f"{name[4:]}.py", name, known) for name in known}
    assert cycles(graph) == [["pkg.one", "pkg.two"]]
