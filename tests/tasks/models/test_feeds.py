"""Packed samples fed to models with several inputs: split by the layout, matched by name in Keras and LiteRT."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.storage.tables import InputSlot

pytestmark = pytest.mark.smoke  # also run on the oldest supported TensorFlow (.ci/run)

# Named so that the alphabetical order (the signature's), the Keras order and the columns' order all differ.
SLOTS = (InputSlot("zeta", (2, 2, 1)), InputSlot("alpha", (3,)))


@pytest.fixture(scope="module")
def two_input_model():
    import keras

    keras.utils.set_random_seed(0)
    alpha, zeta = keras.Input((3,), name="alpha"), keras.Input((2, 2, 1), name="zeta")
    # Each input through its own layer first: a concatenation shares one scale among its inputs, which would
    # then reach back to an input joined as it is.
    joined = keras.layers.Concatenate()(
        [keras.layers.Dense(4)(alpha), keras.layers.Dense(4)(keras.layers.Flatten()(zeta))]
    )
    return keras.Model([alpha, zeta], keras.layers.Dense(2)(joined))


def packed(rows: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.random((rows, 4)) * 16, rng.random((rows, 3)) * 100 - 50], axis=1).astype(np.float32)


def test_keras_gets_each_input_by_name_from_packed_samples(two_input_model):
    from ptqflow.tasks.models.feeds import keras_feed, predict_keras

    features = packed()
    feed = keras_feed(features, SLOTS)
    assert isinstance(feed, dict) and feed["zeta"].shape == (40, 2, 2, 1) and feed["alpha"].shape == (40, 3)
    expected = two_input_model.predict([features[:, 4:], features[:, :4].reshape(40, 2, 2, 1)], verbose=0)
    np.testing.assert_allclose(predict_keras(two_input_model, features, inputs=SLOTS), expected, rtol=1e-6)


def test_a_tflite_model_is_fed_by_signature_name_and_quantized_per_input(two_input_model):
    """Float .tflite: the same outputs as Keras whatever the interpreter's input order. Int8 with int8 inputs: each
    input has its own scale, and the outputs follow the float ones."""
    import tensorflow as tf

    from ptqflow.tasks.evaluation.interpreter import make_interpreter, predict_tflite
    from ptqflow.tasks.models.feeds import predict_keras
    from ptqflow.tasks.quantization.converter import native_output_silenced

    features = packed()
    expected = predict_keras(two_input_model, features, inputs=SLOTS)
    with native_output_silenced():
        float_model = tf.lite.TFLiteConverter.from_keras_model(two_input_model).convert()
    np.testing.assert_allclose(predict_tflite(float_model, features, 16, inputs=SLOTS), expected, atol=1e-4)

    def representative():
        for batch in np.array_split(packed(200, seed=1), 10):
            yield {"zeta": batch[:, :4].reshape(-1, 2, 2, 1), "alpha": batch[:, 4:]}

    converter = tf.lite.TFLiteConverter.from_keras_model(two_input_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    with native_output_silenced():
        int8_model = converter.convert()
    scales = {
        name: detail["quantization"][0]
        for name, detail in make_interpreter(int8_model).get_signature_runner().get_input_details().items()
    }
    assert scales["zeta"] == pytest.approx(16 / 255, rel=0.05)  # each input over its own range: 0..16
    assert scales["alpha"] == pytest.approx(100 / 255, rel=0.05)  # and -50..50
    quantized = predict_tflite(int8_model, features, 16, inputs=SLOTS)
    assert np.abs(quantized - expected).max() < 0.05 * np.abs(expected).max()


def test_a_tflite_model_whose_inputs_are_not_the_columns_is_named_in_the_error(two_input_model):
    import tensorflow as tf

    from ptqflow.tasks.evaluation.interpreter import make_interpreter
    from ptqflow.tasks.models.feeds import signature_input_name, tflite_input_indices
    from ptqflow.tasks.quantization.converter import native_output_silenced

    with native_output_silenced():
        interpreter = make_interpreter(tf.lite.TFLiteConverter.from_keras_model(two_input_model).convert())
    with pytest.raises(ValueError, match="inputs are alpha, zeta, and the samples feed zeta, beta"):
        tflite_input_indices(interpreter, (SLOTS[0], InputSlot("beta", (3,))))
    with pytest.raises(ValueError, match="has 2 inputs, and the samples feed one"):
        tflite_input_indices(interpreter)
    names = {signature_input_name(d["name"]) for d in interpreter.get_input_details()}
    assert names == {"alpha", "zeta"}
