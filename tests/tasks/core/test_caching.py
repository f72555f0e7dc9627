"""Cache keys: code (with helpers), inputs (with artifact digests) and library versions."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import numpy as np
import pytest

import ptqflow.tasks.stages.calibrate
from ptqflow.storage.store import ArtifactRef
from ptqflow.tasks.core import caching
from ptqflow.tasks.core.caching import code_digest, stage_cache_key
from ptqflow.tasks.core.parameters import CalibrationParameters


def _ref(digest: str) -> ArtifactRef:
    return ArtifactRef(uri=f"file:///s/blobs/{digest[:2]}/{digest}", sha256=digest, bytes=10)


def test_calibration_stage_depends_on_the_helpers_it_calls():
    imported = caching._module_imports(
        "ptqflow.tasks.stages.calibrate", open(ptqflow.tasks.stages.calibrate.__file__).read()
    )
    assert {"ptqflow.tasks.data.calibration", "ptqflow.storage.store", "ptqflow.storage.tables"} <= imported
    assert {
        "ptqflow.tasks.data.stratify",
        "ptqflow.tasks.data.datasets",
    } <= set(caching.code_closure("ptqflow.tasks.stages.calibrate"))


def test_a_stage_digest_finds_its_modules_without_importing_them():
    """A key names every module a stage could run (the quantization methods, the sweep's helpers); computing it must
    not load them all into a run that uses none of them. A fresh process: this one has imported most of them."""
    probe = (
        "import sys; from ptqflow.tasks.core import caching; before = set(sys.modules); "
        "closure = caching.code_closure('ptqflow.tasks.stages.convert'); "
        "assert 'ptqflow.tasks.quantization.equalize' in closure and all(closure.values()), closure; "
        "print(sorted(set(sys.modules) - before))"
    )
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip() == "[]"


def test_a_change_in_a_helper_module_changes_the_stage_digest(tmp_path, monkeypatch):
    package = tmp_path / "fakeproj"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "stage.py").write_text("from fakeproj.helper import scale\n\ndef run(x):\n    return scale(x)\n")
    (package / "helper.py").write_text("def scale(x):\n    return x * 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(caching, "PROJECT_PACKAGES", ("fakeproj",))
    code_digest.cache_clear()
    before = code_digest("fakeproj.stage")
    (package / "helper.py").write_text("def scale(x):\n    return x * 3\n")
    code_digest.cache_clear()
    after = code_digest("fakeproj.stage")
    code_digest.cache_clear()
    assert before != after


def test_key_changes_with_upstream_digest_and_parameters_only():
    inputs = {"store_url": "file:///s", "dataset": _ref("a" * 64), "params": CalibrationParameters(), "seed": 0}
    key = stage_cache_key("ptqflow.tasks.data.calibration", inputs)
    assert key == stage_cache_key("ptqflow.tasks.data.calibration", dict(inputs))
    assert key != stage_cache_key("ptqflow.tasks.data.calibration", {**inputs, "dataset": _ref("b" * 64)})
    assert key != stage_cache_key(
        "ptqflow.tasks.data.calibration", {**inputs, "params": CalibrationParameters(calibration_size=50)}
    )
    assert key != stage_cache_key("ptqflow.tasks.quantization.converter", inputs)


def test_library_versions_are_part_of_the_key(monkeypatch):
    inputs = {"seed": 0}
    key = stage_cache_key("ptqflow.tasks.data.sampling", inputs)
    monkeypatch.setattr(caching, "library_versions", lambda: {"tensorflow": "0.0.0"})
    assert stage_cache_key("ptqflow.tasks.data.sampling", inputs) != key


def test_arrays_are_refused_as_stage_inputs():
    with pytest.raises(TypeError, match="pass artifact references"):
        stage_cache_key("ptqflow.tasks.data.sampling", {"features": np.zeros(3)})


# Every cached stage, by its module (the sweep's cached tasks share one).
STAGES = {
    "sample": "ptqflow.tasks.stages.sample",
    "calibrate": "ptqflow.tasks.stages.calibrate",
    "train": "ptqflow.tasks.stages.train",
    "convert": "ptqflow.tasks.stages.convert",
    "validate": "ptqflow.tasks.stages.validate",
    "repair": "ptqflow.tasks.stages.repair",
    "sweep": "ptqflow.tasks.stages.sweep",
}
UPSTREAM_OF_CONVERSION = ("sample", "calibrate", "train")
VIEWS = tuple(
    f"ptqflow.tasks.views.{m.name}"
    for m in pkgutil.iter_modules(importlib.import_module("ptqflow.tasks.views").__path__)
)
QUANTIZATION_METHODS = (
    "ptqflow.tasks.quantization.equalize",
    "ptqflow.tasks.quantization.bias_correction",
    "ptqflow.tasks.quantization.ranges",
)


def _digests_with_edited(monkeypatch, module: str) -> dict[str, str]:
    """Each stage's code digest as it is, and with ``module``'s source edited (a comment added)."""
    real = caching.module_source

    def edited(name: str) -> str | None:
        source = real(name)
        return source + "\n# edited\n" if name == module and source is not None else source

    monkeypatch.setattr(caching, "module_source", edited)
    try:
        return {stage: caching.code_digest.__wrapped__(module) for stage, module in STAGES.items()}
    finally:
        monkeypatch.setattr(caching, "module_source", real)


@pytest.mark.parametrize("method", QUANTIZATION_METHODS)
def test_editing_a_quantization_method_leaves_sampling_and_training_cached(monkeypatch, method):
    """A stage's key covers what it runs: equalization or a range method is not part of training, so changing one
    must not retrain the float model (it reconverts, and revalidates)."""
    before = {stage: caching.code_digest.__wrapped__(module) for stage, module in STAGES.items()}
    after = _digests_with_edited(monkeypatch, method)
    changed = {stage for stage in STAGES if before[stage] != after[stage]}
    assert "convert" in changed and "validate" in changed
    assert changed.isdisjoint(UPSTREAM_OF_CONVERSION)


@pytest.mark.parametrize("view", VIEWS)
def test_editing_a_view_changes_no_stage_key(monkeypatch, view):
    """How a report looks is not part of any stage: the report step renders it on every run."""
    before = {stage: caching.code_digest.__wrapped__(module) for stage, module in STAGES.items()}
    assert _digests_with_edited(monkeypatch, view) == before


def test_the_views_are_the_renderers():
    assert {"ptqflow.tasks.views.render", "ptqflow.tasks.views.sweep_plot"} <= set(VIEWS)


@pytest.mark.parametrize("stage", STAGES)
def test_editing_a_stages_own_code_changes_its_key(monkeypatch, stage):
    before = caching.code_digest.__wrapped__(STAGES[stage])
    assert _digests_with_edited(monkeypatch, STAGES[stage])[stage] != before
