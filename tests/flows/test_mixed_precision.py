"""Scheme mixed16 from the CLI, on a model whose front end int8 cannot hold: integer-only, its int16 layers and
their cost in the report, its refused samples counted."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_outlier_model

pytestmark = pytest.mark.slow


def test_mixed16_ships_an_integer_model_and_reports_its_int16_layers_and_their_cost(
    cli, tmp_path, front_end_model, audio_clips
):
    clips, labels = audio_clips
    front_end_model.save(tmp_path / "front_end.keras")
    table = pa.table({"audio": pa.array(list(clips), type=pa.list_(pa.float32(), clips.shape[1])), "label": labels})
    pq.write_table(table, tmp_path / "clips.parquet")
    args = ["--dataset", str(tmp_path / "clips.parquet"), "--feature-column", "audio", "--label-column", "label"]
    args += ["--model-url", str(tmp_path / "front_end.keras"), "--store", str(tmp_path / "store"), "--json"]
    args += ["--scheme", "mixed16", "--max-int16-fraction", "1", "--calibration-size", "100"]
    # the clips int8 cannot divide are counted (the gate's business, tested elsewhere), not judged here
    args += ["--max-unrunnable-fraction", "1", "--max-accuracy-drop", "100"]

    done = cli("run", *args)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    result = json.loads(done.stdout)
    assert result["metrics"]["full_integer"] and result["metrics"]["int16_layers"]
    report = json.loads(open(result["artifacts"]["report"]["uri"].removeprefix("file://")).read())
    mixed = report["metrics"]["mixed"]
    raised = [layer["layer"] for layer in mixed["choice"]["int16_layers"]]
    assert raised == result["metrics"]["int16_layers"]
    assert mixed["mixed_bytes"] == report["metrics"]["quantized_bytes"] and mixed["int8_bytes"] > 0
    # TFLM's own allocator, on both files; or why not (TFLM has no int16 kernel for some operators, e.g. DIV)
    measured = mixed["int8_arena_bytes"] and mixed["mixed_arena_bytes"]
    assert measured or "TFLM cannot allocate" in mixed["arena_unavailable"]
    assert report["metrics"]["unrunnable_rows"] == result["metrics"]["unrunnable_rows"]
    assert report["metrics"]["audit"]["full_integer"] and report["conversion"]["scheme"] == "mixed16"
    markdown = open(result["artifacts"]["report_md"]["uri"].removeprefix("file://")).read()
    assert "## Mixed precision (int8, int16 where needed)" in markdown
    assert f"int16 activations in {len(raised)} of {mixed['choice']['layers']} layers" in markdown


def test_repair_under_int8_ops_raises_the_collapsed_layer_to_int16_and_stays_integer(
    prefect_server, tmp_path, trained_digits_model
):
    """The outlier model's dense layer collapses in int8 (its range is taken by a constant of 2000: a step of 8
    for activations in single digits) but not in int16 (a step of 0.06): --repair under --ops int8 raises it
    instead of keeping it in float."""
    from ptqflow.flows.pipeline import ptq_pipeline
    from ptqflow.storage.store import ArtifactStore
    from ptqflow.tasks.core.parameters import RepairParameters, TrainingParameters
    from ptqflow.tasks.evaluation.interpreter import audit_tensor_types

    model_file = tmp_path / "outlier.keras"
    write_outlier_model(trained_digits_model, model_file, value=2000.0)
    store = str(tmp_path / "store")
    summary = ptq_pipeline(
        store=store, training=TrainingParameters(model_url=str(model_file)), repair=RepairParameters(enabled=True)
    )
    assert list(summary.tasks)[-2:] == ["repair_quantization", "validate_repaired_model"]
    assert summary.repair is not None and summary.repair.succeeded and summary.repair.mixed is not None
    raised = [layer.layer for layer in summary.repair.mixed.int16_layers]
    assert "dense" in raised and summary.repair.float_layers == ()
    assert summary.gate.passed and f"raised to int16: {', '.join(raised)}" in summary.gate.message
    artifacts = ArtifactStore(store)
    repaired = audit_tensor_types(artifacts.read_bytes(summary.artifacts["tflite"]))
    unrepaired = audit_tensor_types(artifacts.read_bytes(summary.artifacts["tflite_unrepaired"]))
    assert repaired.full_integer and not repaired.float_ops and unrepaired.full_integer
    assert summary.metrics.int16_layers == tuple(raised)
