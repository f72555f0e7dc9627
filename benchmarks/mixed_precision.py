"""Mixed int8/int16 activations (``--scheme mixed16``) against whole-model int16 and the best
all-int8 range method, on three models trained here, in the same run. A fidelity measurement: output SQNR against
the float Keras model (dB) and top-1 agreement on held-out samples, not times.

- a separable-convolution CNN and a small MobileNetV2-style network on generated images (``activation_ranges``'s);
- a small audio model whose front end int8 cannot hold: framing, a learned filterbank, its power (four decades
  between a quiet clip and a loud one) and a division by each channel's maximum over the clip, then a classifier.

Whole-model int16 is the quantizer's a16w8 recipe where LiteRT runs it, else the converter's int16x8 (which has no
int16 DIV); the detail has both where they exist. The target:
mixed within 0.5 dB of whole-model int16 with at most a third of the layers in int16. The ratio is the noise power
of whole-model int16 against mixed's (10^((mixed - int16) / 10)): 1 or more is as faithful.
"""

from __future__ import annotations

import numpy as np

from benchmarks.activation_ranges import images, separable_cnn, small_mobilenet
from benchmarks.common import Result

CALIBRATION = 200
TEST = 600
WITHIN_DB = 0.5
MAX_FRACTION = 1 / 3
CLIP, FRAME = 256, 32


def clips(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three tones at random phase, at levels from 0.01 to 1, with noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, count)
    frequency = np.array([0.05, 0.15, 0.3])[labels] * (1 + 0.1 * rng.normal(size=count))
    level = rng.uniform(0.01, 1.0, size=count)
    t = np.arange(CLIP)
    waves = np.sin(2 * np.pi * frequency[:, None] * t + rng.uniform(0, 6, size=(count, 1))) * level[:, None]
    return (waves + 0.01 * rng.normal(size=waves.shape)).astype(np.float32), labels


def audio_front_end(classes: int):
    import keras

    audio = keras.Input((CLIP,))
    frames = keras.layers.Reshape((CLIP // FRAME, FRAME, 1))(audio)
    bank = keras.layers.Conv2D(12, (1, FRAME), name="filterbank")(frames)
    power = keras.layers.Multiply(name="power")([bank, bank])
    peak = keras.layers.MaxPooling2D((CLIP // FRAME, 1), name="clip_max")(power)
    normalized = keras.ops.divide(power, keras.ops.maximum(peak, 1e-6))
    hidden = keras.layers.Dense(32, activation="relu")(keras.layers.Flatten()(normalized))
    return keras.Model(audio, keras.layers.Dense(classes, name="logits")(hidden), name="audio_front_end")


def measure(name: str, build, data, classes: int, epochs: int) -> dict:
    import keras

    from ptqflow.tasks.core.errors import ConversionFailed
    from ptqflow.tasks.core.parameters import (
        CalibrationMethod,
        ConversionParameters,
        QuantizationScheme,
        TensorType,
    )
    from ptqflow.tasks.evaluation.interpreter import predict_tflite
    from ptqflow.tasks.evaluation.metrics import sqnr_db
    from ptqflow.tasks.evaluation.mixed import quantization, quantize_int16
    from ptqflow.tasks.models.feeds import predict_keras
    from ptqflow.tasks.quantization.converter import convert_float

    keras.utils.set_random_seed(0)
    (train, train_labels), (test, _) = data(3000, 0), data(TEST, 1)
    model = build(classes)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(2e-3), loss)
    model.fit(train.astype(np.float32), train_labels, epochs=epochs, batch_size=64, verbose=0)
    reference = predict_keras(model, test)
    calibration = train[:CALIBRATION]

    def measured(quantized: bytes) -> dict:
        out = predict_tflite(quantized, test, failures=[])
        ran = np.isfinite(out).all(axis=1)  # a sample the integer kernels refuse is left out, and counted
        return {
            "sqnr_db": sqnr_db(reference[ran], out[ran]),
            "agreement": float((out[ran].argmax(1) == reference[ran].argmax(1)).mean()),
            "refused": int((~ran).sum()),
            "bytes": len(quantized),
        }

    def figures(options: ConversionParameters) -> dict:
        quantized, search = quantization(model, lambda: [calibration[:100], calibration[100:]], options)
        found = measured(quantized)
        if search is not None:
            found |= {"int16_layers": [label[0] for label in search.labels], "layers": search.layers}
        return found

    int8 = {m.value: figures(ConversionParameters(calibration_method=m)) for m in CalibrationMethod}
    best = max(int8, key=lambda m: (-int8[m]["refused"], int8[m]["sqnr_db"]))
    mixed_options = ConversionParameters(scheme=QuantizationScheme.mixed16, max_int16_fraction=MAX_FRACTION)
    mixed = figures(mixed_options)
    f32 = TensorType.float32
    try:  # the converter's whole-model int16, where it has the kernels
        int16x8: dict | str = figures(
            ConversionParameters(scheme=QuantizationScheme.int16x8, input_type=f32, output_type=f32)
        )
    except ConversionFailed as error:
        int16x8 = str(error)
    try:  # the quantizer's, where LiteRT's int16 kernels take its scales
        a16w8: dict | str = measured(quantize_int16(model, convert_float(model), lambda: [calibration], mixed_options))
    except RuntimeError as error:
        a16w8 = str(error).split("Node number")[0]
    int16 = a16w8 if isinstance(a16w8, dict) else int16x8
    if not isinstance(int16, dict):
        raise SystemExit(f"{name}: no whole-model int16 runs here ({a16w8}; {int16x8})")
    return {
        "model": name,
        "int8": int8[best] | {"method": best},
        "mixed": mixed,
        "int16": int16 | {"recipe": "a16w8" if int16 is a16w8 else "int16x8"},
        "a16w8": a16w8,
        "int16x8": int16x8,
    }


def row(measured: dict) -> Result:
    mixed, int16 = measured["mixed"], measured["int16"]
    fraction = len(mixed["int16_layers"]) / mixed["layers"]
    gap = int16["sqnr_db"] - mixed["sqnr_db"]
    return Result(
        name=f"mixed_precision_{measured['model'].split()[0].lower()}",
        metric=f"output SQNR of int8 with int16 where needed, {measured['model']} (against whole-model int16)",
        unit="dB",
        ours=round(mixed["sqnr_db"], 2),
        baseline=round(int16["sqnr_db"], 2),
        ratio=round(10 ** (-gap / 10), 3),
        target=f"within {WITHIN_DB:g} dB of whole-model int16, at most a third of the layers in int16",
        met=bool(gap <= WITHIN_DB and fraction <= MAX_FRACTION + 1e-9),
        ours_label=f"mixed16 ({len(mixed['int16_layers'])}/{mixed['layers']} layers int16)",
        baseline_label=f"whole-model int16 ({int16['recipe']})",
        detail=measured,
    )


def run(repeats: int = 1) -> list[Result]:
    """One measurement per model: the conversions are deterministic, so repeats would give the same figures."""
    return [
        row(measure("separable-conv CNN", separable_cnn, lambda n, s: images(n, s, 7, 1), classes=7, epochs=10)),
        row(measure("MobileNetV2-style", small_mobilenet, lambda n, s: images(n, s, 5, 3), classes=5, epochs=10)),
        row(measure("audio front end", audio_front_end, clips, classes=3, epochs=20)),
    ]


if __name__ == "__main__":
    import json

    for result in run():
        print(json.dumps(result.as_dict(), indent=2))
