"""A model's outputs by name (tasks.models.outputs): what each is, and the .tflite's outputs in the Keras model's
order."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.tasks.core.artifacts import ModelOutput
from ptqflow.tasks.models.outputs import model_outputs, split_outputs


@pytest.fixture(scope="module")
def three_heads():
    """Three outputs whose order the converter does not keep: a value, class scores, a box."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), name="raw")
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    value = keras.layers.Dense(1, name="value")(hidden)
    scores = keras.layers.Dense(3, activation="softmax", name="scores")(hidden)
    box = keras.layers.Dense(2, name="box")(hidden)
    return keras.Model(inputs, [value, scores, box])


def test_each_output_is_named_after_its_layer_with_its_shape_and_kind(three_heads):
    from ptqflow.tasks.models.training import with_input_normalisation

    expected = (
        ModelOutput(name="value", shape=(1,), class_scores=False),
        ModelOutput(name="scores", shape=(3,), class_scores=True),
        ModelOutput(name="box", shape=(2,), class_scores=False),
    )
    assert model_outputs(three_heads) == expected
    assert model_outputs(with_input_normalisation(three_heads, 0.5, -1.0)) == expected  # seen through the wrapper


def test_the_tflite_outputs_come_in_the_keras_models_order(three_heads):
    from ptqflow.tasks.core.parameters import ConversionParameters
    from ptqflow.tasks.evaluation.interpreter import make_interpreter, predict_tflite
    from ptqflow.tasks.models.feeds import predict_keras
    from ptqflow.tasks.quantization.converter import convert_float, quantize

    features = np.random.default_rng(0).uniform(-1, 1, (64, 4)).astype(np.float32)
    keras_outputs = predict_keras(three_heads, features)
    assert keras_outputs.shape == (64, 6)
    float_model = convert_float(three_heads)
    order = [d["shape"][-1] for d in make_interpreter(float_model).get_output_details()]
    assert order != [1, 3, 2]  # the converter's own order differs: the test would prove nothing otherwise
    np.testing.assert_allclose(predict_tflite(float_model, features), keras_outputs, atol=1e-5)
    quantized = quantize(three_heads, lambda: [features], ConversionParameters())
    parts = split_outputs(predict_tflite(quantized, features), model_outputs(three_heads))
    reference = split_outputs(keras_outputs, model_outputs(three_heads))
    for name in ("value", "scores", "box"):
        assert np.abs(parts[name] - reference[name]).max() < 0.1, name


def test_split_outputs_gives_each_output_its_columns():
    layout = (
        ModelOutput(name="a", shape=(2, 2), class_scores=False),
        ModelOutput(name="b", shape=(3,), class_scores=True),
    )
    rows = np.arange(14, dtype=np.float32).reshape(2, 7)
    parts = split_outputs(rows, layout)
    np.testing.assert_array_equal(parts["a"], rows[:, :4])
    np.testing.assert_array_equal(parts["b"], rows[:, 4:])
    with pytest.raises(ValueError, match="do not fit the model's outputs"):
        split_outputs(rows[:, :6], layout)
