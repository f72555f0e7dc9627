"""TensorFlow Lite Micro against what ptqflow planned before it asked TFLM: the tensor arena TFLM's own allocator
needs against the arena ptqflow plans from the execution plan (LiteRT's planner), and what running the test split
on TFLM costs against LiteRT, per 1,000 samples. On the default CNN (trained on digits) and on a MobileNetV2-sized
model with random weights (nothing downloaded; its logits, since TFLM's softmax refuses the scale of random
logits). Both rows are reported, not targets: they say how far a figure
that is not the device's own can be off, and what the device's own costs."""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common import Result, digits_model_and_splits, quantize_in_batches
from benchmarks.inference import mobilenet_v2_sized

TFLM_SAMPLES = {"default CNN": 200, "MobileNetV2-sized": 4}  # TFLM's reference kernels take seconds per MobileNet


def _compare(label: str, model, calibration: np.ndarray, samples: np.ndarray) -> list[Result]:
    from ptqflow.tasks.core.parameters import ConversionParameters
    from ptqflow.tasks.evaluation.device import device_footprint
    from ptqflow.tasks.evaluation.interpreter import predict_tflite
    from ptqflow.tasks.evaluation.tflm import run_isolated

    quantized = quantize_in_batches(model, calibration, ConversionParameters())
    planned = device_footprint(quantized).arena_bytes
    rows = samples[: TFLM_SAMPLES[label]]
    start = time.perf_counter()
    arena = run_isolated(quantized, rows).arena  # as validation runs it: a child process, allocation included
    tflm_seconds = (time.perf_counter() - start) / len(rows) * 1000
    predict_tflite(quantized, rows, num_threads=1)  # warm
    start = time.perf_counter()
    predict_tflite(quantized, rows, num_threads=1)
    litert_seconds = (time.perf_counter() - start) / len(rows) * 1000
    key = label.lower().replace(" ", "_").replace("-", "_")
    return [
        Result(
            name=f"tflm_arena_{key}",
            metric=f"tensor arena, {label} (int8, batch 1)",
            unit="KiB",
            ours=arena.total_bytes / 1024,
            baseline=planned / 1024,
            ratio=planned / arena.total_bytes,
            target="reported",
            met=None,
            ours_label="TFLM's allocator",
            baseline_label="ptqflow's plan (before --target tflm)",
            detail={"head_bytes": arena.head_bytes, "tail_bytes": arena.tail_bytes, "planned_bytes": planned},
        ),
        Result(
            name=f"tflm_validation_{key}",
            metric=f"validation time per 1,000 samples, {label}, 1 thread ({len(rows)} samples timed)",
            unit="s",
            ours=tflm_seconds,
            baseline=litert_seconds,
            ratio=litert_seconds / tflm_seconds,
            target="reported",
            met=None,
            ours_label="TFLite Micro (one sample at a time)",
            baseline_label="LiteRT (the same batch-1 file)",
        ),
    ]


def run(repeats: int = 1) -> list[Result]:
    cnn, splits = digits_model_and_splits()
    results = _compare("default CNN", cnn, splits["train"].features[:200], splits["test"].features)
    images = np.random.default_rng(0).integers(0, 256, (24, 224, 224, 3), dtype=np.uint8)
    results += _compare("MobileNetV2-sized", mobilenet_v2_sized(classifier_activation=None), images[:16], images[16:])
    return results
