"""Quantized vs float .tflite: size, latency at batch 1 (p50, p95) and throughput (64 samples, one per invoke, as
the batch-1 files run), with the LiteRT Interpreter, on the default CNN and on a MobileNetV2-sized model built with
random weights (nothing downloaded).

Do not assume int8 is faster: on CPUs without int8 dot-product instructions it often is not. The CPU flags that
matter (avx512_vnni, avx_vnni, amx_int8) are recorded with the machine."""

from __future__ import annotations

import os
import time

import numpy as np

from benchmarks.common import Result, digits_model_and_splits, quantize_in_batches

LATENCY_RUNS = 100
THROUGHPUT_RUNS = 5
BATCH = 64


def mobilenet_v2_sized(classifier_activation: str | None = "softmax"):
    """MobileNetV2 (224x224x3, 1000 classes, ~3.5 M parameters) with random weights, taking raw 0..255 pixels."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((224, 224, 3), name="raw_input")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    backbone = keras.applications.MobileNetV2(
        input_shape=(224, 224, 3), weights=None, classes=1000, classifier_activation=classifier_activation
    )
    return keras.Model(inputs, backbone(x), name="mobilenet_v2_random")


def _timings(model_bytes: bytes, sample: np.ndarray, threads: int) -> dict:
    """Latency at batch 1 (p50, p95), and throughput: ``BATCH`` samples back to back, each set and invoked (the
    files take one sample per call, as a device runs them)."""
    from ptqflow.tasks.evaluation.interpreter import make_interpreter
    from ptqflow.tasks.models.feeds import quantize_input

    interpreter = make_interpreter(model_bytes, threads)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    rows = quantize_input(np.repeat(sample[:1], BATCH, axis=0).astype(np.float32), inp)
    interpreter.set_tensor(inp["index"], rows[:1])
    for _ in range(5):
        interpreter.invoke()
    latencies = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        interpreter.invoke()
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(THROUGHPUT_RUNS):
        for row in range(BATCH):
            interpreter.set_tensor(inp["index"], rows[row : row + 1])
            interpreter.invoke()
    elapsed = time.perf_counter() - start
    return {
        "p50_ms": float(np.percentile(latencies, 50) * 1000),
        "p95_ms": float(np.percentile(latencies, 95) * 1000),
        "throughput_per_s": BATCH * THROUGHPUT_RUNS / elapsed,
    }


def composition(model_bytes: bytes) -> dict:
    """Where a .tflite's bytes go: weight buffers vs per-channel quantization parameters (a float32 scale and an
    int64 zero point per channel, for weights and for biases)."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model_bytes, 0))
    tensors = [t for graph in model.subgraphs for t in graph.tensors]
    scales = sum(
        len(t.quantization.scale) for t in tensors if t.quantization is not None and t.quantization.scale is not None
    )
    return {
        "bytes": len(model_bytes),
        "buffer_bytes": sum(len(b.data) for b in model.buffers if b.data is not None),
        "quantization_scales": scales,
        "tensors": len(tensors),
    }


def _compare(label: str, model, calibration: np.ndarray, sample: np.ndarray, size_target: float | None) -> list[Result]:
    from ptqflow.tasks.quantization.converter import convert_float

    threads = os.cpu_count() or 1
    quantized = quantize_in_batches(model, calibration)
    float_model = convert_float(model)
    q, f = _timings(quantized, sample, threads), _timings(float_model, sample, threads)
    common = dict(ours_label="int8 .tflite", baseline_label="float32 .tflite")
    size_ratio = len(float_model) / len(quantized)
    key = label.lower().replace(" ", "_").replace("-", "_")
    return [
        Result(
            name=f"size_{key}",
            metric=f"model size, {label}",
            unit="MB",
            ours=len(quantized) / 1e6,
            baseline=len(float_model) / 1e6,
            ratio=size_ratio,
            target=f">= {size_target}x smaller" if size_target else "reported",
            met=(size_ratio >= size_target) if size_target else None,
            detail={"quantized": composition(quantized), "float": composition(float_model)},
            **common,
        ),
        Result(
            name=f"latency_{key}",
            metric=f"latency at batch 1 (p50), {label}, {threads} threads",
            unit="ms",
            ours=q["p50_ms"],
            baseline=f["p50_ms"],
            ratio=f["p50_ms"] / q["p50_ms"],
            target="reported",
            met=None,
            detail={"quantized": q, "float": f},
            **common,
        ),
        Result(
            name=f"throughput_{key}",
            metric=f"throughput, {BATCH} samples one per invoke, {label}, {threads} threads",
            unit="samples/s",
            ours=q["throughput_per_s"],
            baseline=f["throughput_per_s"],
            ratio=q["throughput_per_s"] / f["throughput_per_s"],
            target="reported",
            met=None,
            **common,
        ),
    ]


def run(repeats: int = 1) -> list[Result]:
    cnn, splits = digits_model_and_splits()
    results = _compare("default CNN", cnn, splits["train"].features[:200], splits["test"].features, None)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 224, 224, 3), dtype=np.uint8)
    results += _compare("MobileNetV2-sized", mobilenet_v2_sized(), images[:16], images[16:], 3.8)
    return results
