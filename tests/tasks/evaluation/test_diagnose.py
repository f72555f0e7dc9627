"""Per-layer quantization error and repair by keeping layers in float: pure functions, no Prefect.

The "outlier" model is the trained CNN with one hidden unit of its ``dense`` layer turned into a huge constant that
nothing reads (see conftest.write_outlier_model): int8 collapses to chance, and that layer alone is the cause."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.storage.keras_models import keras_model_from_bytes
from ptqflow.tasks.core.parameters import ConversionParameters, GateParameters, TargetOps, TensorType
from ptqflow.tasks.core.validation_report import LayerError, ranking_margin
from ptqflow.tasks.evaluation.diagnose import keras_layer_of, layer_errors, quantize_keeping_float
from ptqflow.tasks.evaluation.interpreter import audit_tensor_types, predict_tflite
from ptqflow.tasks.evaluation.metrics import accuracy
from ptqflow.tasks.evaluation.repair import keep_worst_layers_float
from ptqflow.tasks.quantization.converter import quantize

pytestmark = pytest.mark.smoke  # also run on the oldest supported TensorFlow (.ci/run)

BUILTINS = ConversionParameters(ops=TargetOps.builtins)


@pytest.fixture(scope="module")
def outlier_model(trained_digits_model, tmp_path_factory):
    from conftest import write_outlier_model

    path = tmp_path_factory.mktemp("outlier") / "outlier.keras"
    write_outlier_model(trained_digits_model, path)
    return keras_model_from_bytes(path.read_bytes())


@pytest.fixture(scope="module")
def calibration(digits_splits):
    return digits_splits[1]["train"].features[:200]


def batches_of(features):
    return lambda: (features[i : i + 64] for i in range(0, len(features), 64))


def test_the_offending_layer_is_named_worst(outlier_model, calibration):
    errors = layer_errors(outlier_model, batches_of(calibration), calibration, BUILTINS)
    worst = errors[0]
    assert worst.layer == "dense" and worst.op == "FULLY_CONNECTED"
    assert worst.typical_steps < 1 and worst.badness > 10  # the outlier took the range: most activations round to 0
    assert [e.badness for e in errors] == sorted((e.badness for e in errors), reverse=True)
    margin = ranking_margin(errors)
    assert margin is not None and margin.ratio > 5, margin  # by construction: no processor can flip this order


def test_a_healthy_model_has_no_layer_far_from_rounding(trained_digits_model, calibration):
    errors = layer_errors(trained_digits_model, batches_of(calibration), calibration, BUILTINS)
    assert {e.layer for e in errors} >= {"dense", "probabilities", "relu1"}
    assert max(e.badness for e in errors) < 3


def test_keeping_the_worst_layer_float_repairs_the_model(outlier_model, calibration, digits_splits):
    splits = digits_splits[1]
    quantized = quantize(outlier_model, batches_of(calibration), BUILTINS)
    assert accuracy(predict_tflite(quantized, splits["test"].features), splits["test"].labels) < 0.5
    ranked = layer_errors(outlier_model, batches_of(calibration), calibration, BUILTINS)
    repaired, steps, message = keep_worst_layers_float(
        outlier_model,
        batches_of(calibration),
        calibration,
        BUILTINS,
        quantized,
        ranked,
        splits["validation"].features,
        splits["validation"].labels,
        gate=GateParameters(max_accuracy_drop=1.0),
        max_float_layers=4,
    )
    assert repaired is not None and len(steps) == 1
    # The outlier tensor must never be quantized: dense stays float and so does probabilities, which reads it.
    assert steps[0].float_layers == ("dense", "probabilities")
    assert message.startswith("repair kept dense (with probabilities, which read its output) in float: validation drop")
    assert steps[0].validation.startswith("drop ") and steps[0].validation_drop_pp <= 1.0
    float_accuracy = accuracy(
        outlier_model.predict(splits["test"].features.astype(np.float32), verbose=0), splits["test"].labels
    )
    repaired_accuracy = accuracy(predict_tflite(repaired, splits["test"].features), splits["test"].labels)
    assert (float_accuracy - repaired_accuracy) * 100 <= 1.0
    audit = audit_tensor_types(repaired)
    assert audit.input.dtype == "int8" and audit.output.dtype == "int8"  # the asked I/O survives repair
    assert not audit.full_integer and len(repaired) > len(quantized)


def test_repair_stops_at_the_limit_and_says_so(outlier_model, calibration, digits_splits):
    splits = digits_splits[1]
    quantized = quantize(outlier_model, batches_of(calibration), BUILTINS)
    ranked = layer_errors(outlier_model, batches_of(calibration), calibration, BUILTINS)
    repaired, steps, message = keep_worst_layers_float(
        outlier_model,
        batches_of(calibration),
        calibration,
        BUILTINS,
        quantized,
        ranked,
        splits["validation"].features,
        splits["validation"].labels,
        gate=GateParameters.model_construct(max_accuracy_drop=-1.0),  # a gate no model passes
        max_float_layers=2,
    )
    assert repaired is None and len(steps) <= 2 and "and the validation figure is still drop" in message


def test_float_io_is_kept_when_asked(outlier_model, calibration):
    options = ConversionParameters(
        ops=TargetOps.builtins, input_type=TensorType.float32, output_type=TensorType.float32
    )
    model = quantize_keeping_float(outlier_model, batches_of(calibration), calibration, options, [])
    audit = audit_tensor_types(model)
    assert audit.input.dtype == "float32" and audit.output.dtype == "float32"


@pytest.mark.parametrize(
    ("tensor", "layer"),
    [
        ("ptqflow_cnn_1/dense_1/MatMul;ptqflow_cnn_1/dense_1/Relu", "dense"),
        ("ptqflow_cnn_1/relu1_1/Relu;ptqflow_cnn_1/batch_norm1_1/batchnorm/add_1", "relu1"),
        ("StatefulPartitionedCall_1:0", "model output"),
        ("other/thing", "other/thing"),
    ],
)
def test_tensor_names_map_to_keras_layers(tensor, layer):
    assert keras_layer_of(tensor, ["dense", "relu1", "batch_norm1", "probabilities"]) == layer


def test_the_ranking_margin_says_when_another_processor_could_flip_the_order():
    def layer(name: str, badness: float) -> LayerError:
        return LayerError(
            layer=name,
            op="FULLY_CONNECTED",
            tensor=name,
            scale=1.0,
            rmse_over_scale=0.3,
            mean_abs_error=0.0,
            typical_steps=None,
            badness=badness,
        )

    clear = ranking_margin([layer("dense", 40.0), layer("probabilities", 2.0)])
    assert clear is not None and clear.ratio == 20.0 and not clear.close and "close call" not in str(clear)
    close = ranking_margin([layer("dense", 2.1), layer("probabilities", 2.0)])
    assert close is not None and close.close and "another processor can rank them the other way" in str(close)
    assert ranking_margin([layer("dense", 2.0)]) is None


def test_a_tensor_inside_a_nested_model_is_named_after_its_own_layer():
    names = ["raw_input", "input_normalisation", "inner", "c1", "d"]
    tensor = "functional_1/inner_1/c1_1/Relu;functional_1/inner_1/c1_1/convolution"
    assert keras_layer_of(tensor, names, nested={"inner"}) == "c1"
    assert keras_layer_of(tensor, names) == "inner"  # without knowing it is a model, the path stops there
