from __future__ import annotations

import time

import numpy as np

from storage.keras_models import keras_model_from_bytes, keras_model_to_bytes


def _model():
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(3)(inputs))


def test_same_weights_give_the_same_bytes_at_any_time():
    model = _model()
    first = keras_model_to_bytes(model)
    time.sleep(1.1)  # the .keras archive records its save time; the store must not see it
    assert keras_model_to_bytes(model) == first


def test_round_trip_predicts_the_same():
    model = _model()
    loaded = keras_model_from_bytes(keras_model_to_bytes(model))
    x = np.random.default_rng(0).random((5, 4), dtype=np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
