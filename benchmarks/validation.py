"""Validation through the shipped quantized model, which takes one sample per call (a device's shape):

- ``validation``: 10,000 samples on the default CNN, ptqflow's evaluation (inputs quantized once for all rows, one
  invoke per sample) vs the seed tutorial's loop (quantize, set_tensor, invoke, get_tensor per sample). Same
  predictions required.
- ``validation_batch_one_*``: what judging the batch-1 file itself costs, against the same model converted with a
  dynamic batch and run in batches of 256 (how ptqflow validated before it shipped batch-1 files), on the default
  CNN and on a MobileNetV2-sized model. Same predictions required.
"""

from __future__ import annotations

import os

import numpy as np

from benchmarks.common import Result, digits_model_and_splits, median_seconds, quantize_in_batches

SAMPLES = 10_000
MOBILENET_SAMPLES = 64


def batch_dynamic_twin(model, calibration: np.ndarray) -> bytes:
    """``model`` quantized by the converter as the tutorial does (its batch dimension left dynamic), calibrated on
    the same rows one at a time, as the batch-1 file is: the same quantization, another shape."""
    import tensorflow as tf

    def representative_dataset():
        for row in range(len(calibration)):
            yield [calibration[row : row + 1].astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def _seed_way(model_bytes: bytes, features: np.ndarray) -> np.ndarray:
    # The tutorial: an Interpreter with default settings, one sample per invoke; int8 input mapped with the tensor's
    # parameters (its hard-coded x*255-128 would not even give the same predictions).
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_bytes)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    scale, zero_point = inp["quantization"]
    predictions = np.empty(len(features), np.int64)
    for i, sample in enumerate(features):
        q = np.clip(np.round(sample[np.newaxis].astype(np.float32) / scale + zero_point), -128, 127)
        interpreter.set_tensor(inp["index"], q.astype(np.int8))
        interpreter.invoke()
        predictions[i] = interpreter.get_tensor(out["index"]).argmax()
    return predictions


def _batch_one_cost(label: str, model, calibration: np.ndarray, features: np.ndarray, repeats: int) -> Result:
    from ptqflow.tasks.evaluation.interpreter import predict_tflite

    threads = os.cpu_count() or 1
    shipped, twin = quantize_in_batches(model, calibration), batch_dynamic_twin(model, calibration)

    def batch_one() -> np.ndarray:
        return predict_tflite(shipped, features).argmax(1)

    def batched() -> np.ndarray:
        return predict_tflite(twin, features, batch_size=256, num_threads=threads).argmax(1)

    same = bool(np.array_equal(batch_one(), batched()))
    ours_s, ours_all = median_seconds(batch_one, repeats, warmup=1)
    twin_s, twin_all = median_seconds(batched, repeats, warmup=1)
    key = label.lower().replace(" ", "_").replace("-", "_")
    return Result(
        name=f"validation_batch_one_{key}",
        metric=f"{len(features):,} samples through the quantized model, {label}, {threads} threads",
        unit="s",
        ours=ours_s,
        baseline=twin_s,
        ratio=twin_s / ours_s,
        target="reported (below 1: judging the file that ships costs that much more)",
        met=None,
        ours_label="the shipped batch-1 file, one invoke per sample (threads as ptqflow chooses)",
        baseline_label="a batch-dynamic twin, batches of 256",
        detail={"same_predictions": same, "ours_runs_s": ours_all, "baseline_runs_s": twin_all},
    )


def run(repeats: int = 3) -> list[Result]:
    from benchmarks.inference import mobilenet_v2_sized
    from ptqflow.tasks.evaluation.interpreter import predict_tflite

    model, splits = digits_model_and_splits()
    calibration = splits["train"].features[:200]
    quantized = quantize_in_batches(model, calibration)
    # 10,000 samples: the test split repeated (the predictions are compared one by one, so repeats are fine).
    test = splits["test"].features
    features = np.concatenate([test] * (SAMPLES // len(test) + 1))[:SAMPLES]
    threads = os.cpu_count() or 1

    def ours() -> np.ndarray:
        return predict_tflite(quantized, features).argmax(1)  # ptqflow's default: the faster thread count

    same = bool(np.array_equal(ours(), _seed_way(quantized, features)))
    repeats = max(repeats, 5)  # a fraction of a second each: more runs, steadier medians
    ours_s, ours_all = median_seconds(ours, repeats, warmup=1)
    seed_s, seed_all = median_seconds(lambda: _seed_way(quantized, features), repeats, warmup=1)
    ratio = seed_s / ours_s
    images = np.random.default_rng(0).integers(0, 256, (16 + MOBILENET_SAMPLES, 224, 224, 3)).astype(np.float32)
    return [
        Result(
            name="validation",
            metric=f"{SAMPLES:,} samples through the shipped (batch-1) quantized model (default CNN)",
            unit="s",
            ours=ours_s,
            baseline=seed_s,
            ratio=ratio,
            target=">= 5x faster, same predictions",
            met=ratio >= 5 and same,
            ours_label=f"inputs quantized once, one invoke per sample, the faster of 1 and {threads} threads",
            baseline_label="the tutorial's loop: quantize, set_tensor, invoke, get_tensor per sample",
            detail={"same_predictions": same, "ours_runs_s": ours_all, "baseline_runs_s": seed_all},
        ),
        _batch_one_cost("default CNN", model, calibration, features, repeats),
        _batch_one_cost("MobileNetV2-sized", mobilenet_v2_sized(), images[:16], images[16:], 3),
    ]
