"""convert_to_tflite's pure functions: quantize() and convert_float(), without Prefect."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.tasks.core.errors import ConversionFailed
from ptqflow.tasks.core.parameters import ConversionParameters, QuantizationScheme, TargetOps, TensorType
from ptqflow.tasks.evaluation.interpreter import audit_tensor_types, make_interpreter
from ptqflow.tasks.quantization.converter import convert_float, quantize

pytestmark = pytest.mark.smoke  # also run on the oldest supported TensorFlow (.ci/run)


@pytest.fixture(scope="module")
def calibration(digits_splits):
    _, splits = digits_splits
    return splits["train"].features[:200]


def _batches(features, size):
    return lambda: (features[i : i + size] for i in range(0, len(features), size))


@pytest.fixture(scope="module")
def int8_model(trained_digits_model, calibration) -> bytes:
    return quantize(trained_digits_model, _batches(calibration, 64), ConversionParameters())


def test_default_conversion_is_full_integer_with_int8_io(int8_model):
    audit = audit_tensor_types(int8_model)
    assert audit.full_integer, audit.float_tensors
    assert audit.input.dtype == "int8" and audit.output.dtype == "int8"
    assert set(audit.dtypes) <= {"int8", "int32"}


def test_input_scale_comes_from_the_raw_value_range(int8_model):
    # digits' raw values span 0..16: the input scale is ~16/255, nowhere near the 1/255 of the tutorial's mapping.
    quantization = audit_tensor_types(int8_model).input
    scale, zero_point = quantization.scale, quantization.zero_point
    assert scale == pytest.approx(16 / 255, rel=0.01)
    assert zero_point == -128


DYNAMIC_SHAPE_OPS = {"SHAPE", "STRIDED_SLICE", "PACK"}  # what a dynamic batch adds before a Flatten's RESHAPE


@pytest.mark.parametrize("kind", ["quantized", "float"])
def test_shipped_files_have_static_batch_one_shapes(trained_digits_model, int8_model, kind):
    model = int8_model if kind == "quantized" else convert_float(trained_digits_model)
    interpreter = make_interpreter(model)
    for detail in [*interpreter.get_input_details(), *interpreter.get_output_details()]:
        assert list(detail["shape_signature"]) == list(detail["shape"]) and detail["shape"][0] == 1, detail["name"]
    for tensor in interpreter.get_tensor_details():
        assert -1 not in list(tensor["shape_signature"]), tensor["name"]
    audit = audit_tensor_types(model)
    assert not DYNAMIC_SHAPE_OPS & set(audit.ops) and audit.dynamic_tensors == []
    # The serving signature keeps the Keras model's names: the input by name, the outputs in order.
    assert interpreter.get_signature_list() == {"serving_default": {"inputs": ["raw_input"], "outputs": ["output_0"]}}


@pytest.mark.parametrize("io_type", [TensorType.uint8, TensorType.float32])
def test_other_io_types(trained_digits_model, calibration, io_type):
    options = ConversionParameters(input_type=io_type, output_type=io_type)
    audit = audit_tensor_types(quantize(trained_digits_model, _batches(calibration, 100), options))
    assert audit.input.dtype == audit.output.dtype == io_type.value
    if io_type is TensorType.float32:
        # float I/O: QUANTIZE/DEQUANTIZE at the edges, so the model is not full-integer.
        assert not audit.full_integer and {"QUANTIZE", "DEQUANTIZE"} <= set(audit.ops)
    else:
        assert audit.full_integer


def test_conversion_is_deterministic(trained_digits_model, calibration, int8_model):
    assert quantize(trained_digits_model, _batches(calibration, 64), ConversionParameters()) == int8_model


def test_a_saved_model_is_converted_with_static_shapes_too(tmp_path, trained_digits_model, digits_splits, calibration):
    # A SavedModel's serving function was traced for any batch; called on one sample, its shapes fold all the same.
    from ptqflow.tasks.evaluation.interpreter import predict_tflite
    from ptqflow.tasks.models.training import load_trained_model

    spec, splits = digits_splits
    trained_digits_model.export(str(tmp_path / "saved"), verbose=False)
    _, saved = load_trained_model(str(tmp_path / "saved"), spec)
    quantized = quantize(saved, _batches(calibration, 64), ConversionParameters())
    audit = audit_tensor_types(quantized)
    assert audit.full_integer and audit.dynamic_tensors == [] and not DYNAMIC_SHAPE_OPS & set(audit.ops)
    test = splits["test"].features[:100]
    agreement = predict_tflite(quantized, test).argmax(1) == trained_digits_model.predict(test, verbose=0).argmax(1)
    assert agreement.mean() > 0.95


def test_a_model_of_fixed_batch_is_converted_for_one_sample():
    import keras

    inputs = keras.Input(batch_shape=(32, 4), name="x")
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    rows = np.random.default_rng(0).random((32, 4), np.float32)
    interpreter = make_interpreter(quantize(model, lambda: [rows], ConversionParameters()))
    assert list(interpreter.get_input_details()[0]["shape_signature"]) == [1, 4]


def test_a_model_that_cannot_take_one_sample_says_so_in_one_line():
    import keras

    inputs = keras.Input(batch_shape=(32, 4), name="x")
    hard_coded = keras.layers.Lambda(lambda t: keras.ops.reshape(t, (32, 2, 2)))(inputs)  # its batch written in
    model = keras.Model(inputs, keras.layers.Flatten()(hard_coded))
    with pytest.raises(ConversionFailed) as error:
        quantize(model, lambda: [np.zeros((32, 4), np.float32)], ConversionParameters())
    message = str(error.value)
    assert message.startswith("the model cannot be called on one sample (") and "\n" not in message
    assert "\x1b" not in message and "batch dimension is free or 1" in message


def test_the_calibration_batch_size_does_not_change_the_model(trained_digits_model, calibration, int8_model):
    # The batch-1 model is calibrated one row at a time, however the stored set is streamed.
    assert quantize(trained_digits_model, _batches(calibration, 1), ConversionParameters()) == int8_model


def test_float_model_has_float_io_and_no_quantization(trained_digits_model):
    audit = audit_tensor_types(convert_float(trained_digits_model))
    assert audit.input.dtype == "float32" and "int8" not in audit.dtypes


def test_an_op_without_a_builtin_kernel_names_the_op_and_the_fix():
    import keras

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.ops.erf(inputs)))
    with pytest.raises(ConversionFailed) as error:
        quantize(model, lambda: [np.random.default_rng(0).random((8, 4), np.float32)], ConversionParameters())
    message = str(error.value)
    assert "Erf has no TensorFlow Lite builtin kernel" in message
    assert "--ops select" in message and "\n" not in message


def test_select_ops_are_accepted_for_a_model_that_needs_none(trained_digits_model, calibration):
    options = ConversionParameters(ops=TargetOps.select)
    audit = audit_tensor_types(quantize(trained_digits_model, _batches(calibration, 64), options))
    assert audit.full_integer


def test_a_model_that_needs_flex_ops_cannot_be_calibrated_and_says_so():
    import keras
    import tensorflow as tf
    from packaging.version import Version

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.ops.erf(inputs)))
    options = ConversionParameters(ops=TargetOps.select)
    batches = lambda: [np.random.default_rng(0).random((8, 4), np.float32)]  # noqa: E731
    if Version(tf.__version__) < Version("2.20"):
        # The calibrator of TensorFlow 2.18 and 2.19 still links the Flex delegate: the model calibrates and keeps
        # its Flex op (validation then says it cannot run it: tests/tasks/evaluation/test_validate.py).
        assert audit_tensor_types(quantize(model, batches, options)).flex_ops == ["FlexErf"]
        return
    with pytest.raises(ConversionFailed, match="needs TensorFlow \\(Flex\\) ops, which calibration cannot run"):
        quantize(model, batches, options)


F32 = TensorType.float32


def test_int16x8_keeps_int16_activations_and_int8_weights(trained_digits_model, calibration):
    options = ConversionParameters(
        scheme=QuantizationScheme.int16x8, input_type=TensorType.int16, output_type=TensorType.int16
    )
    audit = audit_tensor_types(quantize(trained_digits_model, _batches(calibration, 64), options))
    assert audit.full_integer and audit.input.dtype == audit.output.dtype == "int16"
    assert {"int16", "int8"} <= set(audit.dtypes)


def test_dynamic_range_needs_no_calibration_and_keeps_float_activations(trained_digits_model):
    def no_calibration():
        raise AssertionError("dynamic range quantization must not calibrate")

    options = ConversionParameters(
        scheme=QuantizationScheme.dynamic_range, ops=TargetOps.builtins, input_type=F32, output_type=F32
    )
    audit = audit_tensor_types(quantize(trained_digits_model, no_calibration, options))
    assert audit.input.dtype == "float32" and "int8" in audit.dtypes and not audit.full_integer


def test_float16_stores_float16_weights(trained_digits_model):
    options = ConversionParameters(
        scheme=QuantizationScheme.float16, ops=TargetOps.builtins, input_type=F32, output_type=F32
    )
    model = quantize(trained_digits_model, lambda: iter(()), options)
    assert "float16" in audit_tensor_types(model).dtypes
    assert len(model) < len(convert_float(trained_digits_model)) * 0.6


def test_per_tensor_weights_give_a_smaller_model(trained_digits_model, calibration, int8_model):
    per_tensor = quantize(trained_digits_model, _batches(calibration, 64), ConversionParameters(per_channel=False))
    assert audit_tensor_types(per_tensor).full_integer
    assert len(per_tensor) < len(int8_model)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"input_type": TensorType.int16}, "need scheme int16x8"),
        ({"scheme": QuantizationScheme.int16x8, "input_type": TensorType.int8}, "float32 or int16"),
        ({"scheme": QuantizationScheme.float16, "ops": TargetOps.builtins}, "--input-type float32"),
        ({"scheme": QuantizationScheme.dynamic_range, "input_type": F32, "output_type": F32}, "--ops builtins"),
        (
            {
                "scheme": QuantizationScheme.float16,
                "ops": TargetOps.builtins,
                "input_type": F32,
                "output_type": F32,
                "per_channel": False,
            },
            "float16 has none",
        ),
    ],
)
def test_inconsistent_scheme_options_are_refused_with_the_fix(options, fragment):
    with pytest.raises(ValueError, match=fragment):
        ConversionParameters(**options)


def test_a_small_calibration_set_is_read_once_for_the_weight_methods_and_a_large_one_streamed():
    from ptqflow.tasks.quantization.converter import held_if_small

    reads = []
    batches = [np.zeros((4, 8), np.uint8), np.ones((2, 8), np.uint8)]

    def source():
        reads.append(1)
        return iter(batches)

    held = held_if_small(source, limit=48)
    for _ in range(5):  # bias correction's passes, one per layer
        assert [b.tolist() for b in held()] == [b.tolist() for b in batches]
    assert len(reads) == 1
    reads.clear()
    streamed = held_if_small(source, limit=47)  # one byte short of the set: not held
    assert streamed is source and len(reads) == 1
