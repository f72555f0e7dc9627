"""Fidelity methods (``--calibration-method``, ``--equalize``, ``--bias-correction``): how much fidelity each keeps
against plain min/max, on two models trained here on generated images, in the same run. A fidelity measurement:
the figures are output SQNR against the float model (dB) and top-1 agreement, not times.

- a separable-convolution CNN (the mobile building block whose activations min/max serves worst), 32x32
  grayscale, 7 classes;
- a small MobileNetV2-style network (inverted residual blocks with ReLU6 and residual adds), 32x32 RGB, 5 classes.

Both end in logits (a softmax's saturated probabilities would hide the differences). Each is converted to full
int8 (int8 I/O, per-channel weights, 200 calibration samples) with min/max and with each method; and with dynamic
range (float activations) for the fidelity a model keeps when activations are not quantized at all. The ratio is
the noise power against min/max's (10^(dB gained / 10)): 6 dB is about 4x.
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import Result

CALIBRATION = 200
TEST = 600
TARGET_DB = 6.0
METHODS = {
    "percentile": "percentile ranges",
    "mse": "mse ranges",
    "kl": "kl ranges",
    "equalize": "--equalize",
    "bias_correction": "--bias-correction",
    "equalize_bias_correction": "--equalize --bias-correction",
}


def images(count: int, seed: int, classes: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images: a bright bar whose position and orientation give the class, on textured noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, count)
    pictures = rng.integers(0, 200, (count, 32, 32, channels)).astype(np.float32)
    for i, label in enumerate(labels):
        offset = 4 + 3 * (label % 7)
        brightness = rng.uniform(10, 70)  # faint on strong noise: the models stay unsure of some images
        if label % 2:
            pictures[i, offset : offset + 3, 4:28, :] += brightness
        else:
            pictures[i, 4:28, offset : offset + 3, :] += brightness
    return np.clip(pictures, 0, 255).astype(np.uint8), labels


def separable_cnn(classes: int):
    import keras

    inputs = keras.Input((32, 32, 1))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=0.9)(x))
    for filters in (32, 64, 96):
        x = keras.layers.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=0.9)(x))
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(classes, name="logits")(x), name="separable_cnn")


def small_mobilenet(classes: int):
    """MobileNetV2's inverted residual blocks (expand 1x1, depthwise 3x3, project 1x1, ReLU6, residual adds), at a
    size trained here in seconds; BatchNormalization's momentum is 0.9 so its statistics settle in a few epochs."""
    import keras

    def block(x, filters: int, stride: int):
        h = keras.layers.Conv2D(x.shape[-1] * 6, 1, use_bias=False)(x)
        h = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization(momentum=0.9)(h))
        h = keras.layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False)(h)
        h = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization(momentum=0.9)(h))
        h = keras.layers.BatchNormalization(momentum=0.9)(keras.layers.Conv2D(filters, 1, use_bias=False)(h))
        return keras.layers.Add()([x, h]) if stride == 1 and x.shape[-1] == filters else h

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization(momentum=0.9)(x))
    for filters, stride in ((16, 1), (24, 2), (24, 1), (32, 2), (32, 1)):
        x = block(x, filters, stride)
    x = keras.layers.Conv2D(128, 1, use_bias=False)(x)
    x = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization(momentum=0.9)(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(classes, name="logits")(x), name="mobilenet_v2_style")


def measure(name: str, build, classes: int, channels: int, epochs: int) -> dict:
    import keras

    from ptqflow.tasks.core.parameters import (
        CalibrationMethod,
        ConversionParameters,
        QuantizationScheme,
        TargetOps,
        TensorType,
    )
    from ptqflow.tasks.evaluation.interpreter import predict_tflite
    from ptqflow.tasks.evaluation.metrics import sqnr_db
    from ptqflow.tasks.models.feeds import predict_keras
    from ptqflow.tasks.quantization.converter import quantize

    keras.utils.set_random_seed(0)
    train, train_labels = images(3000, 0, classes, channels)
    test, test_labels = images(TEST, 1, classes, channels)
    model = build(classes)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(2e-3), loss, metrics=["accuracy"])
    model.fit(train.astype(np.float32), train_labels, epochs=epochs, batch_size=64, verbose=0)
    reference = predict_keras(model, test)
    calibration = train[:CALIBRATION]

    def figures(options: ConversionParameters) -> dict:
        out = predict_tflite(quantize(model, lambda: [calibration[:100], calibration[100:]], options), test)
        return {
            "sqnr_db": sqnr_db(reference, out),
            "agreement": float((out.argmax(1) == reference.argmax(1)).mean()),
            "accuracy": float((out.argmax(1) == test_labels).mean()),
        }

    methods = {m.value: figures(ConversionParameters(calibration_method=m)) for m in CalibrationMethod}
    methods["equalize"] = figures(ConversionParameters(equalize=True))
    methods["bias_correction"] = figures(ConversionParameters(bias_correction=True))
    methods["equalize_bias_correction"] = figures(ConversionParameters(equalize=True, bias_correction=True))
    float_activations = figures(
        ConversionParameters(
            scheme=QuantizationScheme.dynamic_range,
            ops=TargetOps.builtins,
            input_type=TensorType.float32,
            output_type=TensorType.float32,
        )
    )
    return {
        "model": name,
        "float_accuracy": float((reference.argmax(1) == test_labels).mean()),
        "methods": methods,
        "dynamic_range": float_activations,
    }


def rows(measured: dict) -> list[Result]:
    minmax = measured["methods"]["minmax"]
    gap = measured["dynamic_range"]["agreement"] - minmax["agreement"]
    results = []
    for method in ("percentile", "mse", "kl", "equalize", "bias_correction", "equalize_bias_correction"):
        figures = measured["methods"][method]
        gained = figures["sqnr_db"] - minmax["sqnr_db"]
        closed = (figures["agreement"] - minmax["agreement"]) / gap if gap > 0 else None
        results.append(
            Result(
                name=f"activation_ranges_{method}_{measured['model']}",
                metric=f"output SQNR of full int8, {METHODS[method]}, {measured['model']} (against min/max)",
                unit="dB",
                ours=round(figures["sqnr_db"], 2),
                baseline=round(minmax["sqnr_db"], 2),
                ratio=round(10 ** (gained / 10), 3),
                target=f">= {TARGET_DB:g} dB over min/max (~{10 ** (TARGET_DB / 10):.1f}x less noise)",
                met=bool(gained >= TARGET_DB),
                ours_label=method,
                baseline_label="min/max",
                detail={**measured, "agreement_gap_closed": closed},
            )
        )
    return results


def run(repeats: int = 1) -> list[Result]:
    """One measurement per model: the conversions are deterministic, so repeats would give the same figures."""
    separable = measure("separable-conv CNN", separable_cnn, classes=7, channels=1, epochs=10)
    mobilenet = measure("MobileNetV2-style", small_mobilenet, classes=5, channels=3, epochs=10)
    return rows(separable) + rows(mobilenet)


if __name__ == "__main__":
    import json

    for result in run():
        print(json.dumps(result.as_dict(), indent=2))
