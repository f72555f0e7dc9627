"""Where to fold a model's own input normalisation (``--input-scale`` / ``--input-offset``): a fidelity measurement,
not a speed benchmark (run it by hand: ``python -m benchmarks.input_normalisation``).

A model trained on ``x/127.5 - 1`` is quantized to full int8 with uint8 input, so that a device feeds camera bytes
directly, in the two ways the normalisation can be folded in:

* **rescaling layer**: a ``Rescaling(1/127.5, -1)`` layer in front of the model (what ptqflow does); the converter
  folds it into the first convolution, and the uint8 input's own scale and zero point come from calibration;
* **input quantization**: the bare model, its uint8 input tensor given the normalisation as its quantization
  (scale 1/127.5, zero point 127.5): a zero point must be an integer, so the byte ``r`` reaches the model as
  ``(r - 128) / 127.5``, half a step off. Simulated by feeding the bare quantized model that value.

Both are compared with the float model on the exact normalisation: top-1 agreement, output SQNR and the largest
output error, on the same 600 raw test images.
"""

from __future__ import annotations

import json
import sys

import numpy as np

SCALE, OFFSET = 1 / 127.5, -1.0


def images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB 32x32 images of 4 classes: a bright square in a class-specific corner, on textured noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, count)
    pictures = rng.integers(0, 160, (count, 32, 32, 3)).astype(np.float32)
    for i, label in enumerate(labels):
        y, x = [(4, 4), (4, 20), (20, 4), (20, 20)][label]
        pictures[i, y : y + 8, x : x + 8, label % 3] += rng.uniform(40, 95)
    return pictures, labels


def run() -> dict:
    import keras

    from ptqflow.tasks.core.parameters import ConversionParameters, TensorType
    from ptqflow.tasks.evaluation.interpreter import predict_tflite
    from ptqflow.tasks.evaluation.metrics import sqnr_db
    from ptqflow.tasks.models.training import with_input_normalisation
    from ptqflow.tasks.quantization.converter import quantize

    keras.utils.set_random_seed(0)
    train, train_labels = images(2000, 0)
    test, test_labels = images(600, 1)
    inputs = keras.Input((32, 32, 3))
    x = inputs
    for filters in (16, 32):
        x = keras.layers.MaxPooling2D()(keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x))
    x = keras.layers.Dense(32, activation="relu")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(train * SCALE + OFFSET, train_labels, epochs=4, batch_size=64, verbose=0)

    reference = model.predict(test * SCALE + OFFSET, verbose=0)
    options = ConversionParameters(input_type=TensorType.uint8)
    calibration = train[:200]
    layer = quantize(with_input_normalisation(model, SCALE, OFFSET), lambda: [calibration], options)
    bare = quantize(model, lambda: [calibration * SCALE + OFFSET], options)
    outputs = {
        "rescaling layer": predict_tflite(layer, test),
        "input quantization": predict_tflite(bare, (test - 128) * SCALE),
    }
    return {
        "float_accuracy": float((reference.argmax(1) == test_labels).mean()),
        **{
            name: {
                "accuracy": float((out.argmax(1) == test_labels).mean()),
                "agreement": float((out.argmax(1) == reference.argmax(1)).mean()),
                "sqnr_db": sqnr_db(reference, out),
                "max_abs_error": float(np.max(np.abs(out - reference))),
            }
            for name, out in outputs.items()
        },
    }


if __name__ == "__main__":
    json.dump(run(), sys.stdout, indent=2)
    print()
