"""The ptq-pipeline flow end to end on digits, against the session's Prefect test server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_outlier_model
from ptqflow.storage.store import ArtifactStore
from ptqflow.tasks.core.parameters import CalibrationParameters, TrainingParameters
from ptqflow.tasks.evaluation.interpreter import audit_tensor_types

pytestmark = pytest.mark.slow

TRAINING = TrainingParameters(epochs=10)
STAGES = (
    "sample_dataset",
    "materialize_calibration_set",
    "train_float_model",
    "convert_to_tflite",
    "validate_with_interpreter",
)


def run_pipeline(store: str, **overrides):
    from ptqflow.flows.pipeline import ptq_pipeline

    return ptq_pipeline(store=store, training=overrides.pop("training", TRAINING), **overrides)


@pytest.fixture(scope="module")
def store_a(prefect_server, tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("store-a"))


@pytest.fixture(scope="module")
def cold_run(store_a):
    return run_pipeline(store_a)


@pytest.mark.smoke
def test_cold_run_gives_a_full_integer_int8_model_within_the_gate(cold_run, store_a):
    assert cold_run.status == "passed" and cold_run.gate.passed
    assert not any(record.cached for record in cold_run.tasks.values())
    assert tuple(cold_run.tasks) == STAGES
    store = ArtifactStore(store_a)
    audit = audit_tensor_types(store.read_bytes(cold_run.artifacts["tflite"]))
    assert audit.full_integer and audit.input.dtype == "int8" and audit.output.dtype == "int8"
    assert cold_run.metrics.accuracy_drop_pp <= 1.0
    assert cold_run.metrics.float_accuracy > 0.95
    for ref in cold_run.artifacts.values():
        store.verify(ref)


@pytest.mark.smoke
def test_report_and_dataset_manifest_are_stored(cold_run, store_a):
    store = ArtifactStore(store_a)
    report = store.read_json(cold_run.artifacts["report"])
    assert report["metrics"]["quantized_accuracy"] == cold_run.metrics.quantized_accuracy
    assert report["quantized_model"] == cold_run.artifacts["tflite"].model_dump()
    manifest = store.read_json(cold_run.artifacts["dataset"])
    assert set(manifest["splits"]) == {"train", "validation", "test"}
    assert manifest["spec"]["shape"] == [8, 8, 1]


def test_io_is_quantized_with_the_tensor_parameters(cold_run, store_a):
    report = ArtifactStore(store_a).read_json(cold_run.artifacts["report"])
    # Raw digits span 0..16, so the input scale is ~16/255, far from the 1/255 a hard-coded mapping assumes.
    assert report["metrics"]["audit"]["input"]["scale"] == pytest.approx(16 / 255, rel=0.01)


def test_summary_artifact_is_attached_to_the_flow_run(cold_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[cold_run.run_id]))
        )
    summary = next(a for a in artifacts if a.key == "ptq-summary")
    assert "quantized .tflite" in summary.data and "accuracy gate passed" in summary.data


def test_second_identical_run_recomputes_nothing(cold_run, store_a):
    warm = run_pipeline(store_a)
    assert all(record.cached for record in warm.tasks.values()), warm.tasks
    assert warm.artifacts == cold_run.artifacts
    assert warm.run_id != cold_run.run_id


def test_calibration_size_change_reruns_only_the_three_later_stages(cold_run, store_a):
    changed = run_pipeline(store_a, calibration=CalibrationParameters(calibration_size=100))
    cached = {name: record.cached for name, record in changed.tasks.items()}
    assert cached == {
        "sample_dataset": True,
        "materialize_calibration_set": False,
        "train_float_model": True,
        "convert_to_tflite": False,
        "validate_with_interpreter": False,
    }
    assert changed.artifacts["model"] == cold_run.artifacts["model"]
    assert changed.artifacts["calibration"] != cold_run.artifacts["calibration"]


def test_a_deleted_blob_behind_a_cache_hit_is_recomputed(cold_run, store_a):
    store = ArtifactStore(store_a)
    tflite = cold_run.artifacts["tflite"]
    store.fs.rm(store.fs._strip_protocol(tflite.uri))
    rerun = run_pipeline(store_a)
    assert not rerun.tasks["convert_to_tflite"].cached
    assert rerun.tasks["train_float_model"].cached
    assert rerun.artifacts["tflite"] == tflite  # deterministic: the same bytes again
    store.verify(tflite)


@pytest.mark.smoke
def test_two_cold_runs_give_a_byte_identical_tflite(cold_run, tmp_path):
    other = run_pipeline(str(tmp_path / "store-b"))
    assert not any(record.cached for record in other.tasks.values())
    assert other.artifacts["tflite"].sha256 == cold_run.artifacts["tflite"].sha256
    assert other.artifacts["model"].sha256 == cold_run.artifacts["model"].sha256


def test_conversion_runs_in_a_separate_process_from_references_alone(cold_run, store_a, prefect_server, tmp_path):
    """Only references cross the process boundary: the conversion stage runs in a fresh interpreter (as it would
    on another machine) and its output is read back here by reference."""
    from ptqflow.tasks.core.artifacts import ConvertedModels

    store = ArtifactStore(store_a)
    script = f"""
import json, sys
from ptqflow.storage.store import ArtifactRef
from ptqflow.tasks.core.artifacts import CalibrationSet, TrainedModel
from ptqflow.tasks.stages.convert import convert_to_tflite
from ptqflow.tasks.core.parameters import ConversionParameters
trained = TrainedModel(model=ArtifactRef.model_validate_json(sys.argv[1]), epochs_run=0, best_epoch=0,
                       validation_accuracy=0.0)
calibration = CalibrationSet(table=ArtifactRef.model_validate_json(sys.argv[2]), samples=200)
params = ConversionParameters(input_type="uint8", output_type="uint8")
result = convert_to_tflite(store_url={store.url!r}, trained=trained, calibration=calibration, params=params)
print("RESULT " + result.model_dump_json())
"""
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            cold_run.artifacts["model"].model_dump_json(),
            cold_run.artifacts["calibration"].model_dump_json(),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))
    converted = ConvertedModels.model_validate_json(line.removeprefix("RESULT "))
    audit = audit_tensor_types(store.read_bytes(converted.quantized))
    assert audit.input.dtype == "uint8" and audit.full_integer
    assert converted.quantized.sha256 != cold_run.artifacts["tflite"].sha256


def test_gate_failure_fails_the_run_with_the_summary(prefect_server, tmp_path, trained_digits_model):
    from ptqflow.flows.pipeline import ptq_pipeline
    from ptqflow.tasks.core.errors import AccuracyGateFailed

    model_file = tmp_path / "outlier.keras"
    write_outlier_model(trained_digits_model, model_file)  # only its dense layer collapses under int8
    state = ptq_pipeline(
        store=str(tmp_path / "store"), training=TrainingParameters(model_url=str(model_file)), return_state=True
    )
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, AccuracyGateFailed), error
    summary = error.summary
    assert summary.metrics.float_accuracy > 0.9 and summary.metrics.accuracy_drop_pp > 1.0
    assert summary.status == "failed" and not summary.gate.passed
    assert "accuracy gate failed" in str(error) and "--calibration-size" in str(error)


def test_a_failed_runs_exception_is_persisted_as_json_not_pickle(prefect_server, tmp_path):
    """Prefect persists a failed flow run's exception in its default result storage; it must not be a pickle."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    from ptqflow.flows.pipeline import ptq_pipeline
    from ptqflow.tasks.core.parameters import SamplingParameters

    storage = Path(PREFECT_LOCAL_STORAGE_PATH.value())
    before = set(storage.iterdir()) if storage.exists() else set()
    state = ptq_pipeline(store=str(tmp_path / "store"), sampling=SamplingParameters(dataset="nope"), return_state=True)
    assert state.is_failed()
    written = set(storage.iterdir()) - before
    assert written, "expected Prefect to persist the failure"
    for path in written:
        record = json.loads(path.read_bytes())
        # InvalidDataset is defined with storage, which raises it too.
        assert record["__exc_type__"] == "ptqflow.storage.errors.InvalidDataset"


def test_unknown_dataset_fails_before_anything_is_written(prefect_server, tmp_path):
    from ptqflow.flows.pipeline import ptq_pipeline
    from ptqflow.tasks.core.errors import InvalidDataset
    from ptqflow.tasks.core.parameters import SamplingParameters

    store = tmp_path / "store"
    state = ptq_pipeline(store=str(store), sampling=SamplingParameters(dataset="imagenet"), return_state=True)
    assert isinstance(state.result(raise_on_failure=False), InvalidDataset)
    assert not (store / "blobs").exists()
