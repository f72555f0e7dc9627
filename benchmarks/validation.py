"""10,000 samples through the quantized model: batched, multi-threaded LiteRT evaluation (ptqflow) vs the seed
tutorial's loop of one set_tensor / invoke per sample. Same predictions required."""

from __future__ import annotations

import os

import numpy as np

from benchmarks.common import Result, digits_model_and_splits, median_seconds

SAMPLES = 10_000


def run(repeats: int = 3) -> list[Result]:
    from ptqflow.tasks.core.parameters import ConversionParameters
    from ptqflow.tasks.evaluation.interpreter import predict_tflite
    from ptqflow.tasks.quantization.converter import quantize

    model, splits = digits_model_and_splits()
    calibration = splits["train"].features[:200]
    quantized = quantize(model, lambda: [calibration], ConversionParameters())
    # 10,000 samples: the test split repeated (the predictions are compared one by one, so repeats are fine).
    test = splits["test"].features
    features = np.concatenate([test] * (SAMPLES // len(test) + 1))[:SAMPLES]
    threads = os.cpu_count() or 1

    def ours() -> np.ndarray:
        return predict_tflite(quantized, features, batch_size=256, num_threads=threads).argmax(1)

    def seed_way() -> np.ndarray:
        # The tutorial: an Interpreter with default settings, one sample per invoke; int8 input mapped with the
        # tensor's parameters (its hard-coded x*255-128 would not even give the same predictions).
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_content=quantized)
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

    same = bool(np.array_equal(ours(), seed_way()))
    repeats = max(repeats, 5)  # a fraction of a second each: more runs, steadier medians
    ours_s, ours_all = median_seconds(ours, repeats, warmup=1)
    seed_s, seed_all = median_seconds(seed_way, repeats, warmup=1)
    ratio = seed_s / ours_s
    return [
        Result(
            name="validation",
            metric=f"{SAMPLES:,} samples through the quantized model (default CNN)",
            unit="s",
            ours=ours_s,
            baseline=seed_s,
            ratio=ratio,
            target=">= 5x faster, same predictions",
            met=ratio >= 5 and same,
            ours_label=f"batches of 256, {threads} threads",
            baseline_label="one sample per invoke",
            detail={"same_predictions": same, "ours_runs_s": ours_all, "baseline_runs_s": seed_all},
        )
    ]
