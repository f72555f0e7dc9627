"""The gate by task (tasks.evaluation.fidelity, tasks.evaluation.gate.check_gate) and the figures behind it
(tasks.evaluation.metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.tasks.core.artifacts import ValidationFigures
from ptqflow.tasks.core.parameters import GateParameters, ModelTask
from ptqflow.tasks.evaluation.gate import GateStatus, check_gate
from ptqflow.tasks.evaluation.metrics import increase_pct, model_metrics


def figures(task: ModelTask, **values) -> ValidationFigures:
    return ValidationFigures(
        task=task,
        float_accuracy=None,
        tflite_float_accuracy=None,
        quantized_accuracy=None,
        accuracy_drop_pp=None,
        agreement=values.pop("agreement", None),
        float_bytes=100,
        quantized_bytes=30,
        full_integer=True,
        float_tensors=(),
        rerun_max_difference=0.0,
        **values,
    )


@pytest.mark.parametrize(("rise", "allowed", "passed"), [(4.99, 5.0, True), (5.0, 5.0, True), (5.01, 5.0, False)])
def test_regression_passes_while_the_mae_rises_at_most_the_allowed_percent(rise, allowed, passed):
    result = figures(ModelTask.regression, float_mae=0.1, quantized_mae=0.1 * (1 + rise / 100), mae_increase_pct=rise)
    verdict = check_gate(result, GateParameters(max_error_increase=allowed))
    assert verdict.passed is passed and verdict.name == "error_increase"
    assert f"{rise:.2f}% above float" in verdict.message
    if not passed:
        assert verdict.status is GateStatus.failed
        assert "--max-error-increase" in verdict.message and "--calibration-size" in verdict.message
        assert "--scheme int16x8" in verdict.message


@pytest.mark.parametrize(
    ("sqnr", "agreement", "passed", "option"),
    [
        (25.0, None, True, None),
        (None, None, True, None),  # outputs equal to the float model's: no noise at all
        (19.9, None, False, "--min-sqnr"),
        (30.0, 0.99, True, None),
        (30.0, 0.97, False, "--min-agreement"),
    ],
)
def test_unlabeled_data_is_judged_by_sqnr_and_top1_agreement_with_the_float_model(sqnr, agreement, passed, option):
    result = figures(ModelTask.unlabeled, sqnr_db=sqnr, agreement=agreement)
    verdict = check_gate(result, GateParameters(min_sqnr=20.0, min_agreement=0.98))
    assert verdict.passed is passed and verdict.name == "float_fidelity"
    if option:
        assert option in verdict.message and verdict.message.startswith("gate failed:")
    if agreement is not None:
        assert "top-1 agreement" in verdict.message


def test_a_model_not_validated_never_passes_whatever_its_task():
    for task in (ModelTask.regression, ModelTask.unlabeled):
        result = figures(task).model_copy(update={"validated": False, "not_validated_reason": "Flex ops"})
        verdict = check_gate(result, GateParameters())
        assert verdict.status is GateStatus.not_validated and "Flex ops" in verdict.message


def test_unrepeatable_outputs_fail_every_task():
    result = figures(ModelTask.regression, float_mae=0.1, quantized_mae=0.1, mae_increase_pct=0.0)
    verdict = check_gate(result.model_copy(update={"rerun_max_difference": 0.5}), GateParameters())
    assert not verdict.passed and verdict.name == "repeatable"


def test_regression_metrics_are_against_the_targets_and_the_float_outputs():
    targets = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    reference = targets + 0.5  # the float model: off by 0.5 everywhere
    outputs = reference + np.array([[0.1], [-0.1], [0.2], [0.0]], np.float32)
    m = model_metrics(outputs, reference, targets, [])
    assert m.accuracy is None and m.confusion_matrix == [] and m.agreement_with_float is None
    assert m.mae == pytest.approx(np.mean(np.abs(outputs - targets)), abs=1e-6)
    assert m.rmse == pytest.approx(np.sqrt(np.mean((outputs - targets) ** 2)), abs=1e-6)
    assert m.output_mae == pytest.approx(0.1, abs=1e-6) and m.output_max_abs_error == pytest.approx(0.2, abs=1e-6)


def test_unlabeled_class_scores_are_compared_top1_with_the_float_model():
    reference = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], np.float32)
    outputs = np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.3, 0.7]], np.float32)  # row 2 flips
    m = model_metrics(outputs, reference, np.zeros((4, 0), np.float32), [])
    assert m.agreement_with_float == 0.75 and m.mae is None and m.accuracy is None
    one_value = model_metrics(outputs[:, :1], reference[:, :1], np.zeros((4, 0), np.float32), [])
    assert one_value.agreement_with_float is None  # a single value per sample has no top-1


def test_the_error_increase_is_relative_to_the_float_error():
    assert increase_pct(0.2, 0.21) == pytest.approx(5.0)
    assert increase_pct(0.0, 0.0) == 0.0 and increase_pct(0.0, 0.1) == float("inf")


def test_a_failed_regression_gate_says_how_repair_and_int16_could_help():
    from ptqflow.storage.store import ArtifactRef
    from ptqflow.tasks.core.artifacts import RepairResult
    from ptqflow.tasks.core.parameters import TargetOps

    result = figures(ModelTask.regression, float_mae=0.1, quantized_mae=0.12, mae_increase_pct=20.0)
    plain = check_gate(result, GateParameters())
    assert "keep the worst layers in float (--ops builtins --repair)" in plain.message
    int8_only = check_gate(result, GateParameters(), ops=TargetOps.int8)
    assert "--ops int8 cannot keep a layer in float" in int8_only.message
    ref = ArtifactRef(uri="memory://m", sha256="0" * 64, bytes=1)
    repaired = RepairResult(
        repaired=ref, unrepaired=ref, succeeded=True, float_layers=("dense",), steps=(), message="repair kept dense"
    )
    after = check_gate(result.model_copy(update={"mae_increase_pct": 1.0}), GateParameters(), repair=repaired)
    assert (
        after.passed
        and after.message.startswith("gate passed after repair:")
        and "kept in float: dense" in (after.message)
    )


def test_repair_is_keyed_on_the_thresholds_alone():
    gate = GateParameters(max_error_increase=3.0, promotion_tolerance=2.0, min_comparison_rows=50)
    assert gate.thresholds_only() == GateParameters(max_error_increase=3.0)
