"""Every fidelity method (--calibration-method, --equalize, --bias-correction) on the two architectures they are
for, trained here on generated images: a separable-convolution CNN and a MobileNetV2-style network (the
benchmark's models, smaller and trained briefly). Each gives a full-integer model within the accuracy gate."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.activation_ranges import images, separable_cnn, small_mobilenet
from ptqflow.tasks.core.parameters import CalibrationMethod, ConversionParameters

METHODS = {
    "percentile": ConversionParameters(calibration_method=CalibrationMethod.percentile),
    "mse": ConversionParameters(calibration_method=CalibrationMethod.mse),
    "kl": ConversionParameters(calibration_method=CalibrationMethod.kl),
    "equalize": ConversionParameters(equalize=True),
    "bias-correction": ConversionParameters(bias_correction=True),
    "equalize-bias-correction": ConversionParameters(equalize=True, bias_correction=True),
}
MAX_ACCURACY_DROP_PP = 1.0  # the default gate


@pytest.fixture(scope="module", params=["separable-conv", "mobilenet-v2-style"])
def trained(request):
    import keras

    build, classes, channels = {
        "separable-conv": (separable_cnn, 7, 1),
        "mobilenet-v2-style": (small_mobilenet, 5, 3),
    }[request.param]
    keras.utils.set_random_seed(0)
    train, train_labels = images(1500, 0, classes, channels)
    test, test_labels = images(400, 1, classes, channels)
    model = build(classes)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(2e-3), loss, metrics=["accuracy"])
    model.fit(train.astype(np.float32), train_labels, epochs=4, batch_size=64, verbose=0)
    return model, train[:200], test, test_labels


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_gives_a_full_integer_model_within_the_gate(trained, method):
    from ptqflow.tasks.evaluation.interpreter import audit_tensor_types, predict_tflite
    from ptqflow.tasks.models.feeds import predict_keras
    from ptqflow.tasks.quantization.converter import quantize

    model, calibration, test, labels = trained
    quantized = quantize(model, lambda: [calibration[:100], calibration[100:]], METHODS[method])
    audit = audit_tensor_types(quantized)
    assert audit.full_integer and audit.input.dtype == "int8" and audit.output.dtype == "int8"
    float_accuracy = float((predict_keras(model, test).argmax(1) == labels).mean())
    quantized_accuracy = float((predict_tflite(quantized, test).argmax(1) == labels).mean())
    assert (float_accuracy - quantized_accuracy) * 100 <= MAX_ACCURACY_DROP_PP, (float_accuracy, quantized_accuracy)
