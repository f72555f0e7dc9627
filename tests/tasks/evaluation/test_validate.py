"""validate_with_interpreter's pure functions: batched LiteRT evaluation, I/O mapping, the audit and the gate."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.storage.store import ArtifactRef
from ptqflow.tasks.core.artifacts import ValidationResult
from ptqflow.tasks.core.parameters import (
    ConversionParameters,
    QuantizationScheme,
    TargetOps,
    TensorType,
    ValidationParameters,
)
from ptqflow.tasks.core.validation_report import ModelKind
from ptqflow.tasks.evaluation.gate import GateStatus, check_accuracy_gate
from ptqflow.tasks.evaluation.interpreter import audit_tensor_types, dequantize_output, make_interpreter, predict_tflite
from ptqflow.tasks.evaluation.validation import evaluate_models
from ptqflow.tasks.models.feeds import predict_keras, quantize_input
from ptqflow.tasks.quantization.converter import convert_float, quantize

pytestmark = pytest.mark.smoke  # also run on the oldest supported TensorFlow (.ci/run)


@pytest.fixture(scope="module")
def models(trained_digits_model, digits_splits):
    _, splits = digits_splits
    calibration = splits["train"].features[:200]
    quantized = quantize(trained_digits_model, lambda: [calibration], ConversionParameters())
    return quantized, convert_float(trained_digits_model)


@pytest.fixture(scope="module")
def test_split(digits_splits):
    return digits_splits[1]["test"]


def test_io_mapping_uses_the_tensor_scale_and_zero_point():
    detail = {"name": "x", "dtype": np.int8, "quantization": (16 / 255, -128)}
    np.testing.assert_array_equal(quantize_input(np.array([0.0, 4.0, 16.0, 99.0]), detail), [-128, -64, 127, 127])
    np.testing.assert_allclose(dequantize_output(np.array([-128, 127], np.int8), detail), [0.0, 16.0], atol=1e-6)
    assert quantize_input(np.array([1.5]), {"dtype": np.float32, "quantization": (0.0, 0)}).dtype == np.float32


def test_quantized_model_agrees_with_keras(models, trained_digits_model, test_split):
    quantized, _ = models
    keras_top1 = trained_digits_model.predict(test_split.features.astype(np.float32), verbose=0).argmax(1)
    tflite_top1 = predict_tflite(quantized, test_split.features).argmax(1)
    assert (keras_top1 == tflite_top1).mean() > 0.97


def test_the_tutorials_hard_coded_mapping_is_wrong_for_raw_inputs(models, test_split):
    """The seed fed int8 inputs as x*255-128 (for data in [0, 1]); on raw 0..16 digits that saturates every non-zero
    pixel. The tensor's own scale gets it right; the hard-coded mapping loses over 10 points of accuracy."""
    quantized, _ = models
    interpreter = make_interpreter(quantized)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.allocate_tensors()
    predictions = []
    for sample in test_split.features.astype(np.float32):  # the shipped file takes one sample per call
        interpreter.set_tensor(inp["index"], np.clip(sample[np.newaxis] * 255 - 128, -128, 127).astype(np.int8))
        interpreter.invoke()
        predictions.append(interpreter.get_tensor(out["index"])[0].argmax())
    hard_coded = (np.array(predictions) == test_split.labels).mean()
    ours = (predict_tflite(quantized, test_split.features).argmax(1) == test_split.labels).mean()
    assert ours > 0.9 and hard_coded < ours - 0.1


def _batch_dynamic_twin(model, calibration: np.ndarray) -> bytes:
    """``model`` quantized by the converter directly (its batch dimension left dynamic), on the same rows."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([calibration[i : i + 1]] for i in range(len(calibration)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def test_the_batch_one_file_gives_a_batch_dynamic_twins_outputs(models, trained_digits_model, digits_splits):
    # Both ways predict_tflite runs a model: the shipped batch-1 file one call per sample, a batch-dynamic one (an
    # export from before ptqflow shipped batch-1 files) in batches, here of 16 over 37 rows (a short last batch).
    quantized, _ = models
    _, splits = digits_splits
    twin = _batch_dynamic_twin(trained_digits_model, splits["train"].features[:200].astype(np.float32))
    assert "serving_default_raw_input:0" in audit_tensor_types(twin).dynamic_tensors  # the audit tells them apart
    features = splits["test"].features[:37]
    shipped = predict_tflite(quantized, features)
    np.testing.assert_array_equal(shipped, predict_tflite(twin, features, batch_size=16))
    assert shipped.shape == (37, 10)


def test_evaluation_reports_every_metric(models, trained_digits_model, test_split):
    quantized, float_model = models
    metrics = evaluate_models(
        trained_digits_model, float_model, quantized, test_split.features, test_split.labels, ValidationParameters()
    )
    assert metrics.samples == len(test_split)
    assert metrics.tflite_float_accuracy == pytest.approx(metrics.float_accuracy, abs=0.01)
    assert metrics.accuracy_drop_pp == pytest.approx(
        (metrics.float_accuracy - metrics.quantized_accuracy) * 100, abs=1e-6
    )
    assert metrics.quantized_bytes < metrics.float_bytes / 3
    assert metrics.audit.full_integer and metrics.audit.input.dtype == "int8"
    assert "CONV_2D" in metrics.audit.ops
    assert metrics.audit.float_ops == [] and metrics.audit.flex_ops == []
    assert metrics.validated and metrics.num_threads >= 1
    assert metrics.rerun_max_difference == 0.0  # int8 kernels: the same outputs on every run

    n = len(test_split)
    for model in metrics.models.values():
        matrix = np.array(model.confusion_matrix)
        assert matrix.shape == (10, 10) and matrix.sum() == n
        assert model.accuracy == pytest.approx(np.trace(matrix) / n)
        row = matrix[3] / matrix[3].sum()
        assert model.per_class_accuracy["3"] == pytest.approx(row[3], abs=1e-6)
        speed = model.speed
        assert 0 < speed.latency_ms.p50 <= speed.latency_ms.p95 and speed.latency_ms.runs >= 10
        assert speed.throughput_per_s > 0
    keras_model, quantized_model = metrics.models["float_keras"], metrics.models["quantized_tflite"]
    assert keras_model.agreement_with_float == 1.0 and keras_model.output_sqnr_db is None
    assert quantized_model.agreement_with_float == metrics.agreement
    # int8 outputs of a softmax: errors of about one step (1/256), so tens of dB, not a perfect copy.
    assert 15 < quantized_model.output_sqnr_db < 80 and 0 < quantized_model.output_mae < 0.01
    assert metrics.models["float_tflite"].output_sqnr_db > quantized_model.output_sqnr_db


def test_known_float_outputs_give_the_same_metrics_as_predicting_them(models, trained_digits_model, test_split):
    quantized, float_model = models
    args = (
        trained_digits_model,
        float_model,
        quantized,
        test_split.features,
        test_split.labels,
        ValidationParameters(),
    )
    predicted = evaluate_models(*args, measure_speed=False)
    float_outputs = predict_keras(trained_digits_model, test_split.features, ValidationParameters().batch_size)
    given = evaluate_models(*args, measure_speed=False, keras_outputs=float_outputs)
    assert given == predicted
    shuffled = evaluate_models(*args, measure_speed=False, keras_outputs=float_outputs[::-1])
    assert shuffled.float_accuracy != predicted.float_accuracy  # the given outputs are what is used


def test_a_split_evaluated_window_by_window_is_judged_as_the_whole_split(
    models, trained_digits_model, test_split, monkeypatch
):
    """Windows of 96 rows (the last 72): counts are the whole split's, float sums equal but for their last bits."""
    from ptqflow.tasks.evaluation import validation

    quantized, float_model = models
    params = ValidationParameters(batch_size=32)
    args = (trained_digits_model, float_model, quantized, test_split.features, test_split.labels, params)
    whole = evaluate_models(*args, measure_speed=False).model_dump()
    monkeypatch.setattr(validation, "WINDOW_BYTES", 100 * test_split.features[:1].nbytes)
    assert validation.window_rows(test_split.features[:1].nbytes, 32) == 96
    windowed = evaluate_models(*args, measure_speed=False).model_dump()
    assert windowed.keys() == whole.keys()
    for name in ("samples", "float_accuracy", "quantized_accuracy", "agreement", "audit", "rerun_max_difference"):
        assert windowed[name] == whole[name], name
    for kind, metrics in whole["models"].items():
        for name, value in metrics.items():
            if isinstance(value, float):
                assert windowed["models"][kind][name] == pytest.approx(value, rel=1e-9, abs=1e-9), (kind, name)
            elif name != "outputs":
                assert windowed["models"][kind][name] == value, (kind, name)


def test_a_model_with_flex_ops_is_not_validated_and_never_passes(trained_digits_model, models, test_split):
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32)])
    def needs_flex(x):
        return tf.nn.softmax(tf.math.cumprod(tf.reshape(x, [-1, 64])[:, :10], axis=1))  # Cumprod: no builtin

    converter = tf.lite.TFLiteConverter.from_concrete_functions([needs_flex.get_concrete_function()], needs_flex)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    flex_model = converter.convert()
    metrics = evaluate_models(
        trained_digits_model, models[1], flex_model, test_split.features, test_split.labels, ValidationParameters()
    )
    assert not metrics.validated and metrics.quantized_accuracy is None
    assert metrics.audit.flex_ops == ["FlexCumprod"]
    assert "cannot run" in metrics.not_validated_reason and "FlexCumprod" in metrics.not_validated_reason
    # Still planned from the model's file. LiteRT 2.3 cannot allocate it (its Flex op is unresolved), and the report
    # says so; LiteRT 2.0 allocates it all the same, and then it is checked like any other model.
    flex_footprint = metrics.device[ModelKind.quantized_tflite]
    assert "FlexCumprod" in flex_footprint.ops and flex_footprint.arena_bytes > 0
    if flex_footprint.interpreter is None:
        assert flex_footprint.note and flex_footprint.note.startswith(
            "the LiteRT Interpreter cannot allocate this model"
        )
    else:
        assert flex_footprint.interpreter.arena_bytes > 0 and flex_footprint.note is None
    ref = ArtifactRef(uri="memory://x/r.json", sha256="0" * 64, bytes=1)
    result = ValidationResult(
        report=ref,
        validated=False,
        not_validated_reason=metrics.not_validated_reason,
        **{
            k: getattr(metrics, k)
            for k in (
                "float_accuracy",
                "tflite_float_accuracy",
                "quantized_accuracy",
                "accuracy_drop_pp",
                "agreement",
                "float_bytes",
                "quantized_bytes",
            )
        },
        full_integer=False,
        float_tensors=(),
    )
    verdict = check_accuracy_gate(result, max_accuracy_drop=100.0)
    assert verdict.status is GateStatus.not_validated and not verdict.passed
    assert verdict.message.startswith("not validated: the model uses TensorFlow (Flex) ops")


def _result(float_accuracy: float, quantized_accuracy: float) -> ValidationResult:
    ref = ArtifactRef(uri="memory://x/r.json", sha256="0" * 64, bytes=1)
    return ValidationResult(
        report=ref,
        float_accuracy=float_accuracy,
        tflite_float_accuracy=float_accuracy,
        quantized_accuracy=quantized_accuracy,
        accuracy_drop_pp=(float_accuracy - quantized_accuracy) * 100,
        agreement=1.0,
        float_bytes=4,
        quantized_bytes=1,
        full_integer=True,
        float_tensors=(),
    )


def test_gate_passes_within_the_allowed_drop():
    verdict = check_accuracy_gate(_result(0.99, 0.985), max_accuracy_drop=1.0)
    assert verdict.passed and verdict.name == "accuracy_drop" and "passed" in verdict.message


def test_gate_fails_beyond_the_allowed_drop_and_says_what_to_try():
    verdict = check_accuracy_gate(_result(0.99, 0.95), max_accuracy_drop=1.0)
    assert not verdict.passed and verdict.status is GateStatus.failed
    assert verdict.observed_drop_pp == pytest.approx(4.0)
    assert "--calibration-size" in verdict.message and "--max-accuracy-drop" in verdict.message
    assert "--ops builtins --repair" in verdict.message


def test_a_model_whose_outputs_change_between_runs_fails_whatever_its_accuracy():
    result = _result(0.99, 0.99).model_copy(update={"rerun_max_difference": 0.42})
    verdict = check_accuracy_gate(result, max_accuracy_drop=100.0)
    assert not verdict.passed and verdict.status is GateStatus.failed and verdict.name == "repeatable"
    assert verdict.message.startswith(
        "gate failed: the quantized model's outputs differ by up to 0.42 between two runs on the same input"
    )
    assert check_accuracy_gate(_result(0.99, 0.99).model_copy(update={"rerun_max_difference": 0.0}), 1.0).passed


def test_with_int8_only_ops_the_gate_names_the_worst_layers_and_the_options_that_allow_repair():
    from ptqflow.tasks.core.artifacts import WorstLayer
    from ptqflow.tasks.core.parameters import TargetOps

    result = _result(0.99, 0.10).model_copy(
        update={
            "worst_layers": (
                WorstLayer(layer="dense", op="FULLY_CONNECTED", tensor="m/dense/MatMul", badness=21.8),
                WorstLayer(layer="probabilities", op="FULLY_CONNECTED", tensor="m/probabilities/MatMul", badness=21.6),
            )
        }
    )
    verdict = check_accuracy_gate(result, max_accuracy_drop=1.0, ops=TargetOps.int8)
    assert "worst layers: dense (FULLY_CONNECTED, badness 21.8), probabilities" in verdict.message
    assert (
        "--ops int8 cannot keep a layer in float, so it cannot be repaired in float: raise the worst layers to int16 "
        "instead (--repair, with int8 I/O: the model stays integer-only), rerun with --ops builtins" in verdict.message
    )


def test_an_int16_repair_that_did_not_help_says_so_and_offers_more_int16_layers():
    from ptqflow.tasks.core.artifacts import RepairResult
    from ptqflow.tasks.core.parameters import TargetOps

    ref = ArtifactRef(uri="memory://x/q.tflite", sha256="0" * 64, bytes=1)
    repair = RepairResult(
        unrepaired=ref,
        succeeded=False,
        float_layers=(),
        steps=(),
        message="no layer's int16 activations brought the model closer to float",
    )
    verdict = check_accuracy_gate(_result(0.99, 0.10), max_accuracy_drop=1.0, ops=TargetOps.int8, repair=repair)
    assert f"; {repair.message}: allow more int16 layers (--max-int16-fraction)" in verdict.message
    assert "(--repair" not in verdict.message and "\n" not in verdict.message


def test_a_real_model_with_unrepeatable_outputs_is_caught_by_the_gate(test_split):
    """MobileNetV2 (untrained, 32x32) under dynamic range with per-tensor weights: with the LiteRT of this
    project, two runs on the same input give different outputs (every op resolver, one thread)."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    backbone = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10)
    model = keras.Model(inputs, backbone(keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)))
    options = ConversionParameters(
        scheme=QuantizationScheme.dynamic_range,
        ops=TargetOps.builtins,
        input_type=TensorType.float32,
        output_type=TensorType.float32,
        per_channel=False,
    )
    quantized = quantize(model, lambda: iter(()), options)
    images = np.random.default_rng(0).uniform(0, 255, (64, 32, 32, 3)).astype(np.float32)
    first, second = predict_tflite(quantized, images, 64, 1), predict_tflite(quantized, images, 64, 1)
    if np.array_equal(first, second):
        pytest.skip("this LiteRT gives repeatable outputs for this model: nothing to catch")
    labels = np.arange(64) % 10
    metrics = evaluate_models(
        model, convert_float(model), quantized, images, labels, ValidationParameters(), measure_speed=False
    )
    assert metrics.rerun_max_difference > 0
    ref = ArtifactRef(uri="memory://x/r.json", sha256="0" * 64, bytes=1)
    result = ValidationResult(
        report=ref,
        full_integer=False,
        float_tensors=(),
        **{
            k: getattr(metrics, k)
            for k in (
                "float_accuracy",
                "tflite_float_accuracy",
                "quantized_accuracy",
                "accuracy_drop_pp",
                "agreement",
                "float_bytes",
                "quantized_bytes",
                "rerun_max_difference",
            )
        },
    )
    verdict = check_accuracy_gate(result, max_accuracy_drop=100.0)
    assert not verdict.passed and verdict.name == "repeatable"
