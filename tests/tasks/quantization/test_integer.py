"""The full-integer promise: under --ops int8 every conversion path gives a model with no float tensor but the
float I/O asked for, or fails in one line naming the operators that stayed float."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.tasks.core.errors import ConversionFailed
from ptqflow.tasks.core.parameters import CalibrationMethod, ConversionParameters, TargetOps, TensorType
from ptqflow.tasks.evaluation.interpreter import audit_tensor_types
from ptqflow.tasks.quantization.converter import quantize
from ptqflow.tasks.quantization.integer import floats_not_asked_for


@pytest.fixture(scope="module")
def squaring_model():
    """SQUARE and NEG have no int8 kernel: the converter keeps them in float even under TFLITE_BUILTINS_INT8."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,), name="x")
    hidden = keras.layers.Dense(8)(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.ops.negative(keras.ops.square(hidden))))


ROWS = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)

PATHS = {
    "minmax": ConversionParameters(),
    "percentile": ConversionParameters(calibration_method=CalibrationMethod.percentile),
    "mse": ConversionParameters(calibration_method=CalibrationMethod.mse),
    "kl": ConversionParameters(calibration_method=CalibrationMethod.kl),
    "equalize": ConversionParameters(equalize=True),
    "bias_correction": ConversionParameters(bias_correction=True),
}


@pytest.mark.parametrize("path", PATHS)
def test_every_path_refuses_to_leave_an_op_in_float_under_int8_ops(squaring_model, path):
    with pytest.raises(ConversionFailed) as error:
        quantize(squaring_model, lambda: [ROWS], PATHS[path])
    message = str(error.value)
    assert message.startswith("conversion under --ops int8 left NEG, SQUARE in float (") and "\n" not in message
    assert "--ops builtins" in message


def test_builtins_ops_allow_the_float_operators(squaring_model):
    options = ConversionParameters(ops=TargetOps.builtins)
    quantized = quantize(squaring_model, lambda: [ROWS], options)
    assert {"SQUARE", "NEG"} <= {op.op for op in audit_tensor_types(quantized).float_ops}


@pytest.mark.smoke
def test_float_io_asked_for_is_the_only_float_allowed(trained_digits_model, digits_splits):
    _, splits = digits_splits
    calibration = splits["train"].features[:100]
    options = ConversionParameters(input_type=TensorType.float32, output_type=TensorType.float32)
    quantized = quantize(trained_digits_model, lambda: [calibration], options)
    audit = audit_tensor_types(quantized)
    assert not audit.full_integer and {"QUANTIZE", "DEQUANTIZE"} <= set(audit.ops)  # the float edges
    assert floats_not_asked_for(quantized, options) == []
    # The same file judged as if int8 I/O had been asked: its edges are floats nobody asked for.
    assert {op.op for op in floats_not_asked_for(quantized, ConversionParameters())} == {"QUANTIZE", "DEQUANTIZE"}
