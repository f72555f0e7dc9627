"""The sweep's pure parts: the grid, one configuration's metrics, the gate per configuration, the ranking, the
table and the plot. No Prefect, no Dask."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.storage.store import ArtifactRef
from ptqflow.tasks.core.artifacts import ValidationFigures
from ptqflow.tasks.core.errors import PtqflowError
from ptqflow.tasks.core.parameters import GateParameters, ModelTask, QuantizationScheme, RankBy
from ptqflow.tasks.evaluation.device import device_footprint
from ptqflow.tasks.evaluation.fidelity import Figures, TaskFigures, judge_fidelity
from ptqflow.tasks.evaluation.interpreter import predict_tflite
from ptqflow.tasks.evaluation.metrics import accuracy
from ptqflow.tasks.quantization.converter import convert_float, quantize
from ptqflow.tasks.sweep.grid import SweepConfiguration, select_configurations, sweep_grid
from ptqflow.tasks.sweep.ranking import (
    ConfigurationMetrics,
    configuration_metrics,
    configuration_row,
    judge,
    rank,
    reference_row,
)
from ptqflow.tasks.views.render import sweep_header, sweep_markdown, sweep_rows
from ptqflow.tasks.views.sweep_plot import render_sweep_plot


def test_the_default_grid_covers_every_option_the_issue_names():
    grid = sweep_grid(200, (50, 200, 1000))
    names = [c.name for c in grid]
    assert len(grid) >= 12 and len(set(names)) == len(names)
    assert {c.conversion.scheme for c in grid} == set(QuantizationScheme)
    int8 = [c for c in grid if c.conversion.scheme is QuantizationScheme.full_integer]
    assert {c.conversion.input_type.value for c in int8} == {"int8", "uint8", "float32"}
    assert {c.calibration_size for c in int8} == {50, 200, 1000}
    assert {c.conversion.ops.value for c in int8} == {"int8", "builtins"}
    assert any(not c.conversion.per_channel for c in int8)
    # Schemes without calibration take no calibration set (so their cache key does not depend on one).
    assert all((c.calibration_size is None) == (not c.conversion.scheme.calibrated) for c in grid)


def test_selecting_an_unknown_configuration_names_the_choices():
    grid = sweep_grid(200, (50, 200))
    assert [c.name for c in select_configurations(grid, ["float16", "int8"])] == ["int8", "float16"]
    with pytest.raises(PtqflowError, match=r"unknown sweep configuration 'int4'.*choose from .*int8-cal50"):
        select_configurations(grid, ["int8", "int4"])


def test_configuration_metrics_measure_the_model_against_float(trained_digits_model, digits_splits):
    spec, splits = digits_splits
    test = splits["test"]
    calibration = splits["train"].features[:200]
    grid = {c.name: c for c in sweep_grid(200, (200,))}
    model = quantize(trained_digits_model, lambda: [calibration], grid["int8"].conversion)
    float_outputs = trained_digits_model.predict(test.features.astype(np.float32), verbose=0)
    metrics = configuration_metrics(float_outputs, model, test.features, test.labels, 128, 1, list(spec.class_names))
    float_accuracy = accuracy(float_outputs, test.labels)
    quantized_outputs = predict_tflite(model, test.features)
    assert metrics["quantized_accuracy"] == accuracy(quantized_outputs, test.labels)
    assert metrics["agreement"] == pytest.approx(float((quantized_outputs.argmax(1) == float_outputs.argmax(1)).mean()))
    assert metrics["float_accuracy"] == pytest.approx(float_accuracy)
    assert metrics["accuracy_drop_pp"] == pytest.approx(
        (float_accuracy - metrics["quantized_accuracy"]) * 100, abs=1e-4
    )
    assert metrics["full_integer"] and metrics["bytes"] == len(model)
    assert metrics["arena_bytes"] == device_footprint(model).arena_bytes > 0
    assert metrics["rerun_max_difference"] == 0.0  # int8 kernels give the same outputs every run
    assert 0 < metrics["latency_p50_ms"] <= metrics["latency_p95_ms"]

    reference = configuration_metrics(
        float_outputs, convert_float(trained_digits_model), test.features, test.labels, 128, 1, list(spec.class_names)
    )
    assert reference["accuracy_drop_pp"] == pytest.approx(0.0, abs=1e-6) and not reference["full_integer"]


GATE = GateParameters(max_accuracy_drop=1.0)


def _metrics(
    bytes_: int, drop: float, latency: float, full_integer: bool = True, rerun_max_difference: float = 0.0
) -> ConfigurationMetrics:
    ref = ArtifactRef(uri="memory://x", sha256="0" * 64, bytes=bytes_)
    return ConfigurationMetrics(
        model=ref,
        conversion_seconds=0.5,
        bytes=bytes_,
        validated=True,
        float_accuracy=0.95,
        quantized_accuracy=0.95 - drop / 100,
        accuracy_drop_pp=drop,
        agreement=0.99,
        sqnr_db=30.0,
        latency_p50_ms=latency,
        latency_p95_ms=latency * 1.2,
        throughput_per_s=1000.0,
        num_threads=1,
        measured_on="test",
        full_integer=full_integer,
        float_tensors=0 if full_integer else 2,
        input_type="int8",
        output_type="int8",
        ops=("FULLY_CONNECTED",),
        rerun_max_difference=rerun_max_difference,
    )


def test_a_configuration_names_each_figure_as_a_run_does():
    """One name per figure: the gate reads a sweep row and a run's figures through the same protocol, and the
    sweep's JSON uses the names of the run's."""
    figures = {name for name in dir(Figures) if not name.startswith("_")}
    assert figures <= set(ValidationFigures.model_fields) and figures <= set(ConfigurationMetrics.model_fields)
    row = _metrics(80_000, 0.5, 0.006)
    assert judge_fidelity(row, GATE) == judge_fidelity(
        TaskFigures(**{name: getattr(row, name) for name in figures}), GATE
    )


def test_sweep_rows_written_under_the_old_names_still_read():
    written = _metrics(80_000, 0.5, 0.006).model_dump(mode="json")
    assert {"quantized_accuracy", "sqnr_db"} <= set(written) and not {"accuracy", "output_sqnr_db"} & set(written)
    renamed = {"quantized_accuracy": "accuracy", "quantized_mae": "mae", "sqnr_db": "output_sqnr_db"}
    old = {renamed.get(k, k): v for k, v in written.items() if k != "outputs"} | {"mae": 0.25}
    read = ConfigurationMetrics.model_validate(old)
    assert (read.quantized_accuracy, read.sqnr_db, read.quantized_mae) == (written["quantized_accuracy"], 30.0, 0.25)


@pytest.fixture
def rows():
    grid = {c.name: c for c in sweep_grid(200, (50, 200))}
    return [
        reference_row(_metrics(300_000, 0.0, 0.011, full_integer=False)),
        configuration_row(grid["int8"], _metrics(85_000, 0.5, 0.006)),
        configuration_row(grid["int8-per-tensor"], _metrics(79_000, 0.9, 0.006)),
        configuration_row(grid["int8-cal50"], _metrics(85_000, 2.5, 0.006)),  # fails a 1 pp gate
        configuration_row(grid["int16x8"], _metrics(88_000, 0.0, 0.140, full_integer=False)),
        configuration_row(grid["float16"], _metrics(150_000, 0.0, 0.010, full_integer=False)),
        configuration_row(grid["int8-uint8-io"], None, error="conversion failed under --ops int8: ..."),
        # Smallest and within the gate, but its outputs change from one run to the next.
        configuration_row(
            grid["dynamic-range-per-tensor"],
            _metrics(70_000, 0.1, 0.020, full_integer=False, rerun_max_difference=0.42),
        ),
    ]


def test_the_gate_is_judged_per_configuration(rows):
    judged = {r.name: judge(r, GATE, require_full_integer=False) for r in rows}
    assert [n for n, r in judged.items() if r.passed] == ["int8", "int8-per-tensor", "int16x8", "float16"]
    assert judged["int8-cal50"].verdict == "drop 2.50 pp > 1.0 pp"
    assert judged["float32"].verdict == "reference" and not judged["float32"].passed
    assert judged["int8-uint8-io"].verdict.startswith("no model: conversion failed")
    assert judged["dynamic-range-per-tensor"].verdict == (
        "not repeatable: outputs differ by up to 0.42 between two runs on the same input"
    )
    strict = {r.name: judge(r, GATE, require_full_integer=True) for r in rows}
    assert [n for n, r in strict.items() if r.passed] == ["int8", "int8-per-tensor"]
    assert strict["int16x8"].verdict == "not full integer (2 float tensors)"


def test_a_configuration_over_a_device_budget_does_not_pass(rows):
    arenas = {"int8": 40_000, "int8-per-tensor": 40_000, "int16x8": 80_000, "float16": 160_000}
    rows = [
        r.model_copy(update={"metrics": r.metrics.model_copy(update={"arena_bytes": arenas.get(r.name, 160_000)})})
        if r.metrics
        else r
        for r in rows
    ]
    budget = GateParameters(max_accuracy_drop=1.0, ram_budget="64KiB", flash_budget=86_000)
    judged = {r.name: judge(r, budget, require_full_integer=False) for r in rows}
    assert [n for n, r in judged.items() if r.passed] == ["int8", "int8-per-tensor"]
    header = sweep_header(ModelTask.classification)
    table = {line[1]: dict(zip(header, line)) for line in sweep_rows(rank(list(judged.values()), RankBy.size))}
    assert table["int16x8"]["arena"] == "78.1 KiB"
    assert judged["int16x8"].verdict == (
        "does not fit: its tensor arena needs 78.1 KiB (80,000 B), over --ram-budget 64.0 KiB (65,536 B); its .tflite "
        "is 85.9 KiB (88,000 B), over --flash-budget 84.0 KiB (86,000 B)"
    )
    assert judged["float32"].verdict == "reference"  # the float reference is shown, never judged by the budgets


@pytest.mark.parametrize(
    ("rank_by", "order"),
    [
        (RankBy.size, ["int8-per-tensor", "int8", "int16x8", "float16"]),
        (RankBy.latency, ["int8-per-tensor", "int8", "float16", "int16x8"]),  # equal latency: the smaller first
        (RankBy.accuracy, ["int16x8", "float16", "int8", "int8-per-tensor"]),  # equal drop: the smaller first
    ],
)
def test_passing_configurations_come_first_ranked_then_the_rest(rows, rank_by, order):
    ranked = rank([judge(r, GATE, False) for r in rows], rank_by)
    assert [r.name for r in ranked[: len(order)]] == order
    assert [r.rank for r in ranked[: len(order)]] == list(range(1, len(order) + 1))
    rest = ranked[len(order) :]
    assert rest[0].reference and all(r.rank is None for r in rest)
    # The smallest, dynamic-range-per-tensor, is not repeatable: never ranked, whatever rank_by says.
    assert [r.name for r in rest] == ["float32", "dynamic-range-per-tensor", "int8-cal50", "int8-uint8-io"]


def test_table_markdown_and_plot(rows):
    ranked = rank([judge(r, GATE, False) for r in rows], RankBy.size)
    first = dict(zip(sweep_header(ModelTask.classification), sweep_rows(ranked)[0]))
    assert (first["rank"], first["configuration"], first["x smaller"]) == (
        "1",
        "int8-per-tensor",
        f"{300_000 / 79_000:.2f}",
    )
    # Fidelity beside the task's figure: top-1 agreement and output SQNR against the float model.
    reference = next(r for r in rows if r.name == "int8-per-tensor").metrics
    assert first["agreement"] == f"{reference.agreement:.2%}" and first["SQNR dB"] == f"{reference.sqnr_db:.1f}"
    markdown = sweep_markdown(ranked, RankBy.size, GATE, ModelTask.classification, "int8-per-tensor")
    assert "**Best: int8-per-tensor**" in markdown and all(r.name in markdown for r in rows)
    assert (
        sweep_markdown(ranked, RankBy.size, GATE, ModelTask.classification, None).count("No configuration passed") == 1
    )
    png = render_sweep_plot(ranked)
    assert png.startswith(b"\x89PNG") and png == render_sweep_plot(ranked)  # same figures, same bytes


def test_full_integer_candidates_are_ranked_by_fidelity_unless_asked_otherwise():
    from ptqflow.tasks.core.parameters import SweepParameters

    assert SweepParameters().ranking is RankBy.size
    assert SweepParameters(require_full_integer=True).ranking is RankBy.accuracy
    assert SweepParameters(require_full_integer=True, rank_by="latency").ranking is RankBy.latency


def test_the_grid_compares_every_fidelity_method_with_min_max():
    grid = {c.name: c.conversion for c in sweep_grid(200, (200,))}
    assert grid["int8-equalize"].equalize and not grid["int8-equalize"].bias_correction
    assert grid["int8-bias-correction"].bias_correction and not grid["int8-bias-correction"].equalize
    both = grid["int8-equalize-bias-correction"]
    assert both.equalize and both.bias_correction
    assert not grid["int8"].equalize and not grid["int8"].bias_correction


def test_a_sweep_configuration_is_plain_json():
    configuration = sweep_grid(200, (200,))[0]
    assert SweepConfiguration.model_validate_json(configuration.model_dump_json()) == configuration


def _regression_metrics(bytes_: int, rise: float) -> ConfigurationMetrics:
    return _metrics(bytes_, 0.0, 0.01).model_copy(
        update={
            "task": ModelTask.regression,
            "float_accuracy": None,
            "quantized_accuracy": None,
            "accuracy_drop_pp": None,
            "agreement": None,
            "float_mae": 0.1,
            "quantized_mae": 0.1 * (1 + rise / 100),
            "mae_increase_pct": rise,
        }
    )


def test_regression_configurations_are_judged_and_ranked_by_their_mae_rise():
    grid = {c.name: c for c in sweep_grid(200, (50, 200))}
    rows = [
        configuration_row(grid["int8"], _regression_metrics(10_000, 3.0)),
        configuration_row(grid["int8-cal50"], _regression_metrics(10_000, 7.0)),
        configuration_row(grid["int16x8"], _regression_metrics(14_000, 0.5)),
    ]
    judged = [judge(r, GateParameters(max_error_increase=5.0), False) for r in rows]
    assert [r.passed for r in judged] == [True, False, True]
    assert judged[1].verdict == "MAE +7.00% > 5.0%"
    ranked = rank(judged, RankBy.accuracy)
    assert [r.name for r in ranked] == ["int16x8", "int8", "int8-cal50"]  # the least MAE rise first
    first = dict(zip(sweep_header(ModelTask.regression), sweep_rows(ranked)[0]))
    assert (first["MAE"], first["MAE rise %"]) == ("0.10050", "0.50")
    markdown = sweep_markdown(ranked, RankBy.accuracy, GateParameters(), ModelTask.regression, "int16x8")
    assert "| MAE | MAE rise % | SQNR dB |" in markdown and "a quantized MAE at most 5.0% above float" in markdown
    assert render_sweep_plot(ranked).startswith(b"\x89PNG")


def test_a_sweep_measures_and_judges_each_configuration_on_its_device_targets(trained_digits_model, digits_splits):
    from ptqflow.tasks.core.parameters import DeviceTarget, ValidationParameters

    spec, splits = digits_splits
    test = splits["test"]
    grid = {c.name: c for c in sweep_grid(200, (200,))}
    model = quantize(trained_digits_model, lambda: [splits["train"].features[:200]], grid["int8"].conversion)
    float_outputs = trained_digits_model.predict(test.features.astype(np.float32), verbose=0)
    devices = ValidationParameters(targets="tflm,ethos-u55-128", tflm_samples=50)
    measured = configuration_metrics(
        float_outputs, model, test.features, test.labels, 128, 1, list(spec.class_names), devices=devices
    )
    ref = ArtifactRef(uri="memory://x", sha256="0" * 64, bytes=len(model))
    metrics = ConfigurationMetrics(model=ref, conversion_seconds=1.0, measured_on="test", **measured)
    assert metrics.tflm is not None and metrics.tflm.ran and metrics.tflm.samples == 50
    assert [n.target for n in metrics.npu] == [DeviceTarget.ethos_u55_128] and metrics.npu[0].compiled
    row = configuration_row(grid["int8"], metrics)
    assert judge(row, GateParameters(max_accuracy_drop=100.0), False).passed
    # The RAM budget judges TFLM's arena and Vela's SRAM, not LiteRT's plan (LiteRT is not a target here).
    tight = GateParameters(max_accuracy_drop=100.0, ram_budget=metrics.tflm.arena_bytes - 1)
    verdict = judge(row, tight, False)
    assert not verdict.passed and "on TFLite Micro, its tensor arena" in verdict.verdict
    header = sweep_header(ModelTask.classification, (DeviceTarget.tflm, DeviceTarget.ethos_u55_128))
    cells = dict(zip(header, sweep_rows([reference_row(metrics), verdict])[1]))
    assert cells["TFLM"].endswith("pp") and "arena" in cells["TFLM"] and cells["ethos-u55-128"].startswith("100% NPU")
