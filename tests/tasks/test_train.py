from __future__ import annotations

import numpy as np

from tasks.parameters import TrainingParameters
from tasks.train import build_default_cnn, seed_everything, train_model


def test_default_cnn_takes_raw_values_and_scales_them_itself(digits_splits):
    spec, _ = digits_splits
    model = build_default_cnn(spec)
    assert model.input_shape == (None, 8, 8, 1)
    assert model.output_shape == (None, 10)
    scaling = model.layers[1]
    assert type(scaling).__name__ == "Rescaling"
    np.testing.assert_allclose(scaling(np.array([[0.0, 8.0, 16.0]], np.float32)), [[0.0, 0.5, 1.0]])
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("Conv2D") == 3 and kinds.count("BatchNormalization") == 3
    assert kinds.count("MaxPooling2D") == 2 and kinds.count("Dense") == 2


def test_trained_model_classifies_digits(trained_digits_model, digits_splits):
    _, splits = digits_splits
    test = splits["test"]
    predictions = trained_digits_model.predict(test.features.astype(np.float32), verbose=0).argmax(1)
    assert (predictions == test.labels).mean() > 0.9


def test_same_seed_same_weights(digits_splits):
    spec, splits = digits_splits
    train = (splits["train"].features[:300], splits["train"].labels[:300])
    validation = (splits["validation"].features, splits["validation"].labels)
    weights = []
    for _ in range(2):
        seed_everything(3)
        model = build_default_cnn(spec)
        outcome = train_model(model, train, validation, TrainingParameters(epochs=2))
        weights.append(model.get_weights())
    assert outcome.epochs_run == 2
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)
