"""Empirical bias correction (tasks.quantization.bias_correction, --bias-correction): int8 rounding simulated as the
converter does it, and the mean shift it gives each layer undone."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.tasks.core.parameters import ConversionParameters
from ptqflow.tasks.models.keras_graph import clone_with_weights, layer_graph
from ptqflow.tasks.quantization.bias_correction import channel_means, correct_biases, correctable_layers, round_weights

# The Keras internals these rely on (the layer graph, inlining nested models) are checked on the oldest Keras too.
pytestmark = pytest.mark.smoke


def small_cnn():
    import keras

    keras.utils.set_random_seed(5)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, use_bias=False)(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, activation="relu")(x)
    x = keras.layers.SeparableConv2D(6, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4)(x))


def _pictures(seed: int, count: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 12, 12, 3)).astype(np.float32)


def _tflite_weights(model_bytes: bytes) -> list[np.ndarray]:
    """The quantized model's int8 tensors of rank 2 or more (its weights, and activations that hold data), dequantized
    with their own scales."""
    from ptqflow.tasks.evaluation.interpreter import make_interpreter

    interpreter = make_interpreter(model_bytes, 1)
    found = []
    for detail in interpreter.get_tensor_details():
        scales = detail["quantization_parameters"]["scales"]
        if detail["dtype"] != np.int8 or len(detail["shape"]) < 2 or "serving" in detail["name"]:
            continue
        try:
            values = interpreter.get_tensor(detail["index"]).astype(np.float64)
        except ValueError:  # an activation: no data before the model runs
            continue
        axis = detail["quantization_parameters"]["quantized_dimension"]
        shape = [1] * values.ndim
        shape[axis] = -1
        found.append(values * scales.reshape(shape))
    return found


@pytest.mark.parametrize("per_channel", [True, False])
def test_weights_are_rounded_exactly_as_the_converter_rounds_them(per_channel):
    """Every kernel of the simulated model, laid out as TensorFlow Lite lays it out, equals the converted model's
    dequantized weights: the correction measures the rounding the device will run."""
    import keras

    from ptqflow.tasks.quantization.converter import quantize

    keras.utils.set_random_seed(6)
    inputs = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu")(inputs)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(x)))
    rounded = clone_with_weights(model)
    round_weights(rounded, correctable_layers(layer_graph(rounded)), per_channel)
    converted = quantize(model, lambda: [_pictures(7)[:, :10, :10]], ConversionParameters(per_channel=per_channel))
    conv, depthwise, dense = (
        np.asarray(layer.kernel, np.float64) for layer in rounded.layers if hasattr(layer, "kernel")
    )
    expected = [
        np.transpose(conv, (3, 0, 1, 2)),  # (out, h, w, in)
        depthwise.reshape(1, 3, 3, -1),  # (1, h, w, in * multiplier)
        dense.T,  # (out, in)
    ]
    found = _tflite_weights(converted)
    for kernel in expected:
        match = [w for w in found if w.shape == kernel.shape]
        assert match, (kernel.shape, [w.shape for w in found])
        np.testing.assert_allclose(match[0], kernel, rtol=1e-5, atol=1e-7)


def test_the_corrected_copy_keeps_each_layers_float_mean_under_rounding():
    model = small_cnn()
    pictures = _pictures(8, 128)

    def batches():
        return [pictures[:64], pictures[64:]]

    corrected, count = correct_biases(model, batches, per_channel=False)
    assert count == 4  # the conv (through its batch normalization), the depthwise, the separable and the dense

    def rounded(weights_from):
        copy = clone_with_weights(weights_from)
        round_weights(copy, correctable_layers(layer_graph(copy)), False)
        return copy

    reference = channel_means(model, [model.output], batches())[0]
    uncorrected, corrected_rounded = rounded(model), rounded(corrected)
    shift_before = np.abs(channel_means(uncorrected, [uncorrected.output], batches())[0] - reference).max()
    shift_after = np.abs(channel_means(corrected_rounded, [corrected_rounded.output], batches())[0] - reference).max()
    assert shift_before > 1e-4 and shift_after < shift_before / 5
    np.testing.assert_array_equal(channel_means(model, [model.output], batches())[0], reference)  # original untouched


def test_equalized_and_corrected_models_stay_full_integer_within_the_gate(trained_digits_model, digits_splits):
    from ptqflow.tasks.evaluation.interpreter import audit_tensor_types, predict_tflite
    from ptqflow.tasks.evaluation.metrics import accuracy
    from ptqflow.tasks.models.feeds import predict_keras
    from ptqflow.tasks.quantization.converter import quantize

    _, splits = digits_splits
    calibration, test = splits["train"].features[:200], splits["test"]
    float_accuracy = accuracy(predict_keras(trained_digits_model, test.features), test.labels)
    for options in (
        ConversionParameters(equalize=True),
        ConversionParameters(bias_correction=True),
        ConversionParameters(equalize=True, bias_correction=True, calibration_method="mse"),
    ):
        model = quantize(trained_digits_model, lambda: [calibration[:100], calibration[100:]], options)
        assert audit_tensor_types(model).full_integer
        drop = float_accuracy - accuracy(predict_tflite(model, test.features), test.labels)
        assert drop * 100 <= 1.0, options
        assert quantize(trained_digits_model, lambda: [calibration[:100], calibration[100:]], options) == model


def test_layers_inside_a_nested_model_are_corrected():
    import keras

    base = small_cnn()
    inputs = keras.Input((12, 12, 3))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(base(inputs)))
    pictures = _pictures(9, 64)
    corrected, count = correct_biases(model, lambda: [pictures], per_channel=True)
    assert count == 5  # the base's four and the head
    changed = {
        layer.name
        for layer in corrected.layers
        if getattr(layer, "use_bias", False)
        and not np.array_equal(np.asarray(layer.bias), np.asarray(base_or_head(model, layer.name).bias))
    }
    assert "head" in changed and len(changed) >= 3


def base_or_head(model, name):
    """A layer of ``model`` by name, looking inside the model nested in it."""
    for layer in model.layers:
        if layer.name == name:
            return layer
        if hasattr(layer, "layers"):
            for inner in layer.layers:
                if inner.name == name:
                    return inner
    raise KeyError(name)
