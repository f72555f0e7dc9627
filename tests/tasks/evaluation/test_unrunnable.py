"""Samples a model cannot run are findings, not crashes: counted, named, left out of the figures, and gated."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.tasks.core.artifacts import UnrunnableSamples, ValidationFigures
from ptqflow.tasks.core.parameters import ConversionParameters, GateParameters, ValidationParameters
from ptqflow.tasks.evaluation.gate import check_gate
from ptqflow.tasks.evaluation.interpreter import RowFailure, predict_tflite, refused_rows
from ptqflow.tasks.evaluation.validation import evaluate_models
from ptqflow.tasks.quantization.converter import convert_float, quantize

SILENT = [3, 7]  # the test rows whose every value is below zero: a window of silence after the ReLU


@pytest.fixture(scope="module")
def silent_window_model():
    """Divides each window by its peak (plus an epsilon float keeps but int8 rounds to nothing): on a silent window
    the int8 divisor sits at its zero point, and LiteRT's int8 DIV kernel refuses to run."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,), name="window")
    level = keras.layers.ReLU()(inputs)
    peak = keras.ops.max(level, axis=-1, keepdims=True) + 1e-6
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.ops.divide(level, peak)))
    rng = np.random.default_rng(0)
    calibration = rng.normal(size=(100, 8)).astype(np.float32)
    test = rng.normal(size=(40, 8)).astype(np.float32)
    test[:, 0] = np.abs(test[:, 0]) + 0.5  # a clear peak in every window...
    test[SILENT] = -1.0  # ...but the silent ones
    return model, quantize(model, lambda: [calibration], ConversionParameters()), test


def test_a_refused_sample_is_recorded_and_the_others_still_run(silent_window_model):
    model, quantized, test = silent_window_model
    with pytest.raises(RuntimeError, match="DIV"):  # asked for no record, the interpreter's error stands
        predict_tflite(quantized, test)
    failures: list[RowFailure] = []
    outputs = predict_tflite(quantized, test, failures=failures)
    assert [f.start for f in failures] == SILENT and list(np.flatnonzero(refused_rows(outputs))) == SILENT
    # LiteRT's reporter repeats earlier messages in later errors: each record holds its own, once.
    assert all(f.message.count("failed to invoke") == 1 and "(DIV)" in f.message for f in failures)
    runnable = np.setdiff1d(np.arange(len(test)), SILENT)
    np.testing.assert_array_equal(outputs[runnable], predict_tflite(quantized, test[runnable]))


def test_validation_counts_refused_samples_and_judges_the_rest(silent_window_model):
    model, quantized, test = silent_window_model
    labels = np.arange(len(test)) % 3
    metrics = evaluate_models(
        model, convert_float(model), quantized, test, labels, ValidationParameters(), measure_speed=False
    )
    assert metrics.validated and metrics.samples == len(test) - len(SILENT)
    assert metrics.unrunnable_rows == len(SILENT)
    [refused] = metrics.unrunnable
    assert refused.model == "quantized_tflite" and refused.count == len(SILENT) and refused.of_rows == len(test)
    assert len(refused.operators) == 1 and refused.operators[0].startswith("DIV (node ")
    assert refused.examples[0].startswith(f"row {SILENT[0]}: ")
    runnable = np.setdiff1d(np.arange(len(test)), SILENT)
    expected = (model.predict(test[runnable], verbose=0).argmax(1) == labels[runnable]).mean()
    assert metrics.float_accuracy == pytest.approx(expected)


def _figures(refused_rows: int) -> ValidationFigures:
    refused = UnrunnableSamples(
        model="quantized_tflite",
        count=refused_rows,
        of_rows=100,
        operators=("DIV (node 3)",),
        examples=("row 3: tflite/kernels/div.cc:262 data[i] != zero_point was not true.",),
    )
    return ValidationFigures(
        float_accuracy=0.95,
        tflite_float_accuracy=0.95,
        quantized_accuracy=0.95,
        accuracy_drop_pp=0.0,
        agreement=1.0,
        rerun_max_difference=0.0,
        float_bytes=4_000,
        quantized_bytes=1_000,
        full_integer=True,
        float_tensors=(),
        unrunnable_rows=refused_rows,
        unrunnable=(refused,) if refused_rows else (),
    )


def test_the_gate_fails_on_refused_samples_unless_the_user_allows_them():
    failed = check_gate(_figures(2), GateParameters())
    assert not failed.passed and failed.name == "unrunnable_samples" and "\n" not in failed.message
    assert failed.message.startswith(
        "gate failed: the quantized .tflite refused 2 of 100 test samples in DIV (node 3) (row 3: "
    )
    assert "2.0% of the test split cannot run, over --max-unrunnable-fraction 0" in failed.message
    assert failed.message.endswith(
        "; accuracy gate passed: quantized accuracy 95.00% is 0.00 pp below float (95.00%), within 1.0 pp"
    )
    allowed = check_gate(_figures(2), GateParameters(max_unrunnable_fraction=0.02))
    assert allowed.passed and allowed.name == "accuracy_drop"
    assert check_gate(_figures(0), GateParameters()).passed


def test_a_sweep_row_is_judged_on_the_samples_it_ran_and_fails_for_the_others(silent_window_model):
    from ptqflow.storage.store import ArtifactRef
    from ptqflow.tasks.sweep.grid import sweep_grid
    from ptqflow.tasks.sweep.ranking import ConfigurationMetrics, configuration_metrics, configuration_row, judge

    model, quantized, test = silent_window_model
    labels = np.arange(len(test)) % 3
    figures = configuration_metrics(model.predict(test, verbose=0), quantized, test, labels, 64, 1, ["a", "b", "c"])
    assert figures["validated"] and figures["unrunnable_rows"] == len(SILENT)
    row = ConfigurationMetrics(
        model=ArtifactRef(uri="memory://x", sha256="0" * 64, bytes=len(quantized)),
        conversion_seconds=0.1,
        measured_on="test",
        **figures,
    )
    int8 = next(c for c in sweep_grid(100, (100,)) if c.name == "int8")
    verdict = judge(configuration_row(int8, row), GateParameters(max_accuracy_drop=100), False)
    assert not verdict.passed and verdict.verdict.startswith("refused 2 test samples (DIV (node ")
    allowed = GateParameters(max_accuracy_drop=100, max_unrunnable_fraction=0.1)
    assert judge(configuration_row(int8, row), allowed, False).passed
