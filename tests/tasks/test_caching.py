"""Cache keys: code (with helpers), inputs (with artifact digests) and library versions."""

from __future__ import annotations

import numpy as np
import pytest

import ptqflow.tasks.calibrate
from ptqflow.storage.store import ArtifactRef
from ptqflow.tasks import caching
from ptqflow.tasks.caching import code_digest, stage_cache_key
from ptqflow.tasks.parameters import CalibrationParameters


def _ref(digest: str) -> ArtifactRef:
    return ArtifactRef(uri=f"file:///s/blobs/{digest[:2]}/{digest}", sha256=digest, bytes=10)


def test_calibration_stage_depends_on_the_helpers_it_calls():
    imported = caching._module_imports("ptqflow.tasks.calibrate", open(ptqflow.tasks.calibrate.__file__).read())
    assert {
        "ptqflow.tasks.stratify",
        "ptqflow.tasks.datasets",
        "ptqflow.storage.tables",
        "ptqflow.storage.store",
    } <= imported


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
    key = stage_cache_key("ptqflow.tasks.calibrate", inputs)
    assert key == stage_cache_key("ptqflow.tasks.calibrate", dict(inputs))
    assert key != stage_cache_key("ptqflow.tasks.calibrate", {**inputs, "dataset": _ref("b" * 64)})
    assert key != stage_cache_key(
        "ptqflow.tasks.calibrate", {**inputs, "params": CalibrationParameters(calibration_size=50)}
    )
    assert key != stage_cache_key("ptqflow.tasks.convert", inputs)


def test_library_versions_are_part_of_the_key(monkeypatch):
    inputs = {"seed": 0}
    key = stage_cache_key("ptqflow.tasks.sample", inputs)
    monkeypatch.setattr(caching, "library_versions", lambda: {"tensorflow": "0.0.0"})
    assert stage_cache_key("ptqflow.tasks.sample", inputs) != key


def test_arrays_are_refused_as_stage_inputs():
    with pytest.raises(TypeError, match="pass artifact references"):
        stage_cache_key("ptqflow.tasks.sample", {"features": np.zeros(3)})


STAGES = {
    "sample": "ptqflow.tasks.sample",
    "calibrate": "ptqflow.tasks.calibrate",
    "train": "ptqflow.tasks.train",
    "convert": "ptqflow.tasks.convert",
    "validate": "ptqflow.tasks.validate",
}
QUANTIZATION_METHODS = ("ptqflow.tasks.equalize", "ptqflow.tasks.bias_correction", "ptqflow.tasks.ranges")


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
    assert [stage for stage in STAGES if before[stage] != after[stage]] == ["convert", "validate"]


@pytest.mark.parametrize("stage", STAGES)
def test_editing_a_stages_own_code_changes_its_key(monkeypatch, stage):
    before = caching.code_digest.__wrapped__(STAGES[stage])
    assert _digests_with_edited(monkeypatch, STAGES[stage])[stage] != before
