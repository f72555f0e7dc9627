"""Cross-layer equalization (tasks.quantization.equalize, --equalize) over the layer graph (tasks.models.keras_graph):
exact in float, channels made equal where per-channel weights absorb the scales, layers it cannot scale left alone."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.tasks.core.errors import ConversionFailed
from ptqflow.tasks.models.keras_graph import layer_graph
from ptqflow.tasks.quantization.equalize import channel_magnitudes, equalizable_pairs, equalize

# The Keras internals these rely on (the layer graph, inlining nested models) are checked on the oldest Keras too.
pytestmark = pytest.mark.smoke


def _uneven_batch_norms(model, seed: int = 0) -> None:
    """Batch normalizations whose channels differ 30-fold in scale, as a trained mobile network's often do."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.gamma.shape[0]
            layer.gamma.assign(np.exp(rng.uniform(np.log(0.1), np.log(3.0), channels)).astype(np.float32))
            layer.beta.assign(rng.normal(0.2, 0.3, channels).astype(np.float32))
            layer.moving_mean.assign(rng.normal(0, 0.5, channels).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels).astype(np.float32))


def separable_model():
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.SeparableConv2D(16, 3, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.SeparableConv2D(16, 3, padding="same", depth_multiplier=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(5)(x))
    _uneven_batch_norms(model)
    return model


def _batches(count: int = 96, seed: int = 1, shape=(16, 16, 1)):
    pictures = np.random.default_rng(seed).integers(0, 256, (count, *shape)).astype(np.float32)
    return lambda: [pictures[:48], pictures[48:]]


def test_equalization_leaves_the_float_models_outputs_unchanged():
    model = separable_model()
    batches = _batches()
    equalized, count = equalize(model, batches)
    # BN -> separable (x2: into each depthwise), each separable's depthwise -> pointwise (x2), separable -> Dense.
    assert count == 5
    test = _batches(seed=2)()[0]
    before, after = model(test, training=False).numpy(), equalized(test, training=False).numpy()
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-4 * np.abs(before).max())
    assert not np.allclose(equalized.get_weights()[1], model.get_weights()[1])  # the weights did change
    assert np.array_equal(model(test, training=False).numpy(), before)  # and the original did not


def test_channels_read_by_a_depthwise_kernel_come_out_equal():
    model = separable_model()
    batches = _batches()
    equalized, _ = equalize(model, batches)
    pairs = equalizable_pairs(layer_graph(equalized))
    into_depthwise = [i for i, pair in enumerate(pairs) if pair.reader_kind == "separable"]
    before = channel_magnitudes(model, equalizable_pairs(layer_graph(model)), batches())
    after = channel_magnitudes(equalized, pairs, batches())
    for index in into_depthwise:
        spread_before = before[index].max() / before[index][before[index] > 0].min()
        spread_after = after[index].max() / after[index][after[index] > 0].min()
        assert spread_before > 3.0 and spread_after == pytest.approx(1.0, rel=1e-3)


def test_layers_joined_by_relu6_or_a_residual_add_are_left_alone():
    import keras

    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(4, 1)(inputs)
    x = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization()(x))
    x = keras.layers.Conv2D(4, 1)(x)  # reads a ReLU6: not homogeneous
    y = keras.layers.BatchNormalization()(x)
    y = keras.layers.Add()([y, keras.layers.Conv2D(4, 1)(y)])  # y feeds the Add too: two readers
    model = keras.Model(inputs, keras.layers.Dense(3)(y))
    assert equalizable_pairs(layer_graph(model)) == []
    equalized, count = equalize(model, _batches(shape=(8, 8, 4)))
    assert count == 0
    for a, b in zip(equalized.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_sequential_model_is_equalized_too():
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(12, activation="relu"), keras.layers.Dropout(0.2), keras.layers.Dense(2)]
    )
    model.layers[0].kernel.assign(model.layers[0].kernel * np.geomspace(0.05, 5, 12).astype(np.float32))
    batch = np.random.default_rng(4).normal(size=(64, 6)).astype(np.float32)
    equalized, count = equalize(model, lambda: [batch])
    assert count == 1
    np.testing.assert_allclose(equalized(batch).numpy(), model(batch).numpy(), atol=1e-5)


def test_a_subclassed_model_is_refused_with_the_fix():
    import keras

    class Custom(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Custom()
    model(np.zeros((1, 3), np.float32))
    with pytest.raises(ConversionFailed, match="functional or Sequential"):
        equalize(model, lambda: [np.zeros((4, 3), np.float32)])


def test_a_base_network_nested_in_the_model_is_reached():
    """Transfer learning nests a base network in the model, and ptqflow's own input normalisation nests the user's
    model: both are inlined, so their layers are equalized too."""
    import keras

    from ptqflow.tasks.models.training import with_input_normalisation

    base = separable_model()
    inputs = keras.Input((16, 16, 1))
    head = keras.layers.Dense(3, name="head")(keras.layers.ReLU(name="head_relu")(base(inputs)))
    model = with_input_normalisation(keras.Model(inputs, head), 2.0, -1.0)
    batches = _batches()
    equalized, count = equalize(model, batches)
    assert count == 6  # the base's five, and its Dense into the head through a ReLU
    test = _batches(seed=2)()[0]
    before = model(test, training=False).numpy()
    np.testing.assert_allclose(equalized(test, training=False).numpy(), before, atol=1e-4 * np.abs(before).max())
