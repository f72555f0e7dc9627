"""How ptqflow's MLP joins several inputs (``--feature-column a,b``): a fidelity measurement, not a speed benchmark
(run it by hand: ``python -m benchmarks.multi_input``).

Digits as two inputs whose raw ranges differ by two orders of magnitude: the 8x8x1 image (0..16) and its eight row
sums scaled to hundreds (``sum * 10 + 5``). The same MLP (Dense64-Dense64-softmax, trained the same way) takes them
in the two ways they can be joined:

* **joined raw**: the inputs concatenated as they are, then one standardisation over the joined features;
* **standardised per input**: each input standardised on its own, then concatenated (``tasks.models.training``'s MLP).

Both are quantized to full int8 with the same calibration samples and compared with their own float model on the
same test rows: the accuracy drop in percentage points and the output SQNR.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def run(epochs: int = 30) -> dict:
    import keras

    from ptqflow.storage.tables import InputSlot, TensorTable, split_inputs
    from ptqflow.tasks.core.artifacts import FeatureSpec
    from ptqflow.tasks.core.parameters import ConversionParameters, TrainingParameters
    from ptqflow.tasks.data.datasets import load_dataset
    from ptqflow.tasks.evaluation.interpreter import predict_tflite
    from ptqflow.tasks.evaluation.metrics import sqnr_db
    from ptqflow.tasks.models.feeds import predict_keras
    from ptqflow.tasks.models.streaming import Moments
    from ptqflow.tasks.models.training import _standardisation, build_default_mlp, output_head, seeded, train_model
    from ptqflow.tasks.quantization.converter import quantize

    digits = load_dataset("digits")
    images = digits.features.astype(np.float32)
    packed = np.concatenate([images.reshape(len(images), -1), images.sum(axis=(2, 3)) * 10 + 5], axis=1)
    order = np.random.default_rng(0).permutation(len(packed))
    train, test = order[:1300], order[1300:]
    slots = (InputSlot("image", (8, 8, 1), "uint8"), InputSlot("rowsums", (8,)))
    spec = FeatureSpec(
        shape=(72,),
        dtype="float32",
        value_range=(0.0, float(packed.max())),
        n_classes=10,
        class_names=tuple("0123456789"),
        inputs=slots,
    )

    def joined_raw() -> keras.Model:
        inputs = [keras.Input(slot.shape, name=slot.name) for slot in slots]
        x = keras.layers.Concatenate()([keras.layers.Flatten()(raw) for raw in inputs])
        x = _standardisation(Moments.of(packed[train]), "standardise")(x)
        x = keras.layers.Dense(64, activation="relu")(keras.layers.Dense(64, activation="relu")(x))
        return keras.Model(inputs, output_head(spec, x))

    results: dict = {}
    for name, build in (
        ("joined raw", joined_raw),
        ("standardised per input", lambda: build_default_mlp(spec, packed[train])),
    ):
        with seeded(0):
            model = build()
            table = TensorTable(packed[train], digits.labels[train])
            params = TrainingParameters(epochs=epochs, early_stopping_patience=epochs)
            train_model(model, table, table, params, inputs=slots)
        reference = predict_keras(model, packed[test], inputs=slots)
        calibration = [packed[train][:200]]
        quantized_model = quantize(model, lambda batches=calibration: batches, ConversionParameters())
        quantized = predict_tflite(quantized_model, packed[test], inputs=slots)
        float_accuracy = float((reference.argmax(1) == digits.labels[test]).mean())
        results[name] = {
            "float_accuracy": float_accuracy,
            "drop_pp": round((float_accuracy - float((quantized.argmax(1) == digits.labels[test]).mean())) * 100, 2),
            "sqnr_db": round(sqnr_db(reference, quantized), 1),
        }
    assert split_inputs(packed[:1], slots)[1].shape == (1, 8)  # the layout the models were fed by
    return results


if __name__ == "__main__":
    json.dump(run(), sys.stdout, indent=2)
    print()
