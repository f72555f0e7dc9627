"""Cache keys for stages: what a stage reads, its parameters, its code and the libraries that shape its output.

Prefect's default policy includes the flow run id and so never hits across runs, and ``TASK_SOURCE`` sees only
the task function's own source, not the pure stage functions and helpers it calls. ``StageCachePolicy`` hashes:

* the task's inputs as JSON (artifact references carry their sha256, so a changed upstream artifact changes the
  key; parameters are pydantic models with a stable JSON form);
* the source of the task's module and every project module it imports, transitively (``tasks``, ``storage``);
* the versions of the libraries whose behaviour is baked into artifacts (TensorFlow, Keras, LiteRT, NumPy, ...).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.metadata
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.machinery import ModuleSpec
from typing import Any

from prefect.cache_policies import CachePolicy
from pydantic import BaseModel

from ptqflow.tasks.core.installation import tensorflow_distributions

PROJECT_PACKAGES = ("ptqflow.tasks", "ptqflow.storage")
# With whichever TensorFlow build provides the tensorflow package (tensorflow, tensorflow-cpu, tf-nightly, ...).
VERSIONED_DISTRIBUTIONS = ("keras", "ai-edge-litert", "numpy", "pyarrow", "scikit-learn")


def _in_project(name: str) -> bool:
    return any(name == package or name.startswith(package + ".") for package in PROJECT_PACKAGES)


@lru_cache(maxsize=None)
def _module_imports(module: str, source: str) -> frozenset[str]:
    """Project modules imported by ``module`` (absolute and relative imports). Cached by source: every stage's key
    walks the same modules, and a run computes seven."""
    found: set[str] = set()
    package = module.rsplit(".", 1)[0] if "." in module else module
    for node in _statements(ast.parse(source).body):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        found.update(name for name in names if _in_project(name) and _is_module(name))
    return frozenset(found)


def _statements(nodes: list[Any]) -> Iterator[ast.AST]:
    """Every statement, nested ones included (an import is a statement: no need to walk the expressions, which
    are nine nodes in ten)."""
    for node in nodes:
        yield node
        for block in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, block, None)
            if isinstance(children, list):
                yield from _statements(children)


def _module_spec(name: str) -> ModuleSpec | None:
    """Where module ``name`` is, found by the import system's finders without importing it or its packages
    (``importlib.util.find_spec`` imports the parents): a cache key must not load every module it names (the
    quantization methods, the sweep) into a run that uses none of them. None for a name that is not a module
    (``storage.store.ArtifactStore``)."""
    path: list[str] | None = None
    spec: ModuleSpec | None = None
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        if depth > 1:
            if spec is None or spec.submodule_search_locations is None:
                return None
            path = list(spec.submodule_search_locations)
        fullname = ".".join(parts[:depth])
        loaded = sys.modules.get(fullname)
        spec = getattr(loaded, "__spec__", None) if loaded is not None else None
        if spec is None:
            spec = next(
                (found for finder in sys.meta_path if (found := _finder_spec(finder, fullname, path)) is not None),
                None,
            )
    return spec


def _finder_spec(finder: Any, fullname: str, path: list[str] | None) -> ModuleSpec | None:
    find_spec = getattr(finder, "find_spec", None)
    return find_spec(fullname, path) if find_spec is not None else None


def _is_module(name: str) -> bool:
    """True for an importable module; False for a name inside one (``storage.store.ArtifactStore``)."""
    return _module_spec(name) is not None


def _source_digest(module: str) -> str:
    """sha256 of one module's source ("" when it cannot be found, so the key still changes if it appears)."""
    spec = _module_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return ""
    with open(spec.origin, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def module_source(name: str) -> str | None:
    """The source of a project module; None for a name that is not a module with a ``.py`` file."""
    spec = _module_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    with open(spec.origin, encoding="utf-8") as f:
        return f.read()


def code_closure(module: str) -> dict[str, str]:
    """``module`` and every project module it imports, transitively (imports inside functions too), each with the
    sha256 of its source ("" when it has none): what a stage's cache key covers."""
    seen: dict[str, str] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        source = module_source(name)
        seen[name] = "" if source is None else hashlib.sha256(source.encode()).hexdigest()
        if source is not None:
            pending.extend(_module_imports(name, source) - seen.keys())
    return seen


@lru_cache(maxsize=None)
def code_digest(module: str) -> str:
    """sha256 over the source of ``module`` and of every project module it imports, transitively."""
    return hashlib.sha256(json.dumps(sorted(code_closure(module).items())).encode()).hexdigest()


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    versions = {dist.name: dist.version for dist in tensorflow_distributions()}
    for dist in VERSIONED_DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TypeError(
        f"stage input of type {type(value).__name__} cannot be part of a cache key: pass artifact references "
        "and pydantic parameters between stages, not arrays or models"
    )


def stage_cache_key(module: str, inputs: dict[str, Any]) -> str:
    payload = {"code": code_digest(module), "inputs": _jsonable(inputs), "libraries": library_versions()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class StageCachePolicy(CachePolicy):
    """Cache policy for one stage; ``module`` is the stage's module (e.g. ``tasks.quantization.converter``)."""

    module: str = ""
    exclude: tuple[str, ...] = field(default_factory=tuple)
    # Modules outside the project whose code shapes the output (a user's model function), named by the inputs.
    extra_code: Callable[[dict[str, Any]], list[str]] | None = None

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        kept = {k: v for k, v in inputs.items() if k not in self.exclude}
        if self.extra_code is not None:
            kept["__user_code__"] = {name: _source_digest(name) for name in self.extra_code(inputs)}
        return f"{self.module}-{stage_cache_key(self.module, kept)}"
