"""Validation memory against the size of the test split: the validate stage's figures of the Keras model, its float
``.tflite`` and its int8 ``.tflite`` (the default CNN, untrained: memory does not depend on the weights) on stored
Parquet tensor tables of 28x28 uint8 images (10 classes) of ``TEST_ROWS`` and ten times as many rows, each size and
way in a fresh process, measured above its own baseline (the RSS after imports; the peak is reset there).

- ptqflow: the split read, predicted and summed window by window (``tasks.evaluation.validation.Evaluation``);
- the way before it: the split read whole, predicted whole by each model, and the figures computed from the three
  whole outputs.

Both ways' figures must be equal. Target: ptqflow's peak at 10x the rows within 1.2x its peak at 1x. Time per row
at both sizes is in the detail (target: flat within 20%).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from benchmarks.common import Result, rss_bytes
from benchmarks.streaming import (
    MEMORY_TARGET,
    SCALE,
    TIME_FLATNESS,
    both_ways_in_fresh_processes,
    images_spec,
    peak_rss_bytes,
    write_images_table,
)

TEST_ROWS = 50_000  # the fixed costs (interpreters, the thread trial, the audit) stay small beside the rows


def write_test_split(folder: str, rows: int) -> None:
    """``test.parquet`` of ``rows`` rows, and the untrained default CNN as ``model.keras``, ``float.tflite`` and
    ``int8.tflite`` (calibrated on the first 200 rows)."""
    from ptqflow.storage.keras_models import keras_model_to_bytes
    from ptqflow.storage.tables import read_parquet
    from ptqflow.tasks.core.parameters import ConversionParameters
    from ptqflow.tasks.models.training import build_default_cnn, seeded
    from ptqflow.tasks.quantization.converter import convert_float, quantize

    write_images_table(os.path.join(folder, "test.parquet"), np.random.default_rng(rows), rows)
    with open(os.path.join(folder, "test.parquet"), "rb") as f:
        calibration = read_parquet(f).features[:200]
    with seeded(0):
        model = build_default_cnn(images_spec())
    files = {
        "model.keras": keras_model_to_bytes(model),
        "float.tflite": convert_float(model),
        "int8.tflite": quantize(model, lambda: [calibration], ConversionParameters()),
    }
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


def validate(folder: str, mode: str) -> dict:
    """In this process: the three models' figures on ``folder``'s test split, window by window or whole."""
    import keras

    from ptqflow.storage.keras_models import keras_model_from_bytes
    from ptqflow.storage.tables import ParquetRowGroups, read_parquet
    from ptqflow.tasks.core.parameters import ValidationParameters
    from ptqflow.tasks.evaluation.interpreter import predict_tflite
    from ptqflow.tasks.evaluation.metrics import model_metrics
    from ptqflow.tasks.evaluation.validation import Evaluation, window_rows
    from ptqflow.tasks.models.feeds import predict_keras

    def read(name: str) -> bytes:
        with open(os.path.join(folder, name), "rb") as f:
            return f.read()

    model = keras_model_from_bytes(read("model.keras"))
    float_tflite, quantized = read("float.tflite"), read("int8.tflite")
    params = ValidationParameters()
    names = list(images_spec().class_names)
    keras.Input((1,))
    baseline = rss_bytes()
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")
    started = time.perf_counter()
    path = os.path.join(folder, "test.parquet")
    if mode == "streamed":
        with open(path, "rb") as f:
            groups = ParquetRowGroups(f)
            rows = sum(groups.row_counts)
            evaluation = Evaluation(model, float_tflite, quantized, params, rows, names)
            start = 0
            for window in groups.iter_rows(window_rows(28 * 28, params.batch_size)):
                evaluation.add(start, window.features, window.labels)
                start += len(window)
        metrics = evaluation.metrics(measure_speed=False).models
    else:  # the validate stage before windows: the split whole, each model's outputs whole
        with open(path, "rb") as f:
            test = read_parquet(f)
        rows = len(test)
        keras_out = predict_keras(model, test.features, params.batch_size)
        outputs = {
            "float_keras": keras_out,
            "float_tflite": predict_tflite(float_tflite, test.features, params.batch_size, failures=[]),
            "quantized_tflite": predict_tflite(quantized, test.features, params.batch_size, failures=[]),
        }
        metrics = {kind: model_metrics(out, keras_out, test.labels, names) for kind, out in outputs.items()}
    seconds = time.perf_counter() - started
    accuracy = {str(getattr(kind, "value", kind)): m.accuracy for kind, m in metrics.items()}
    return {"mode": mode, "rows": rows, "above_baseline": peak_rss_bytes() - baseline, "seconds": seconds,
            "accuracy": accuracy}  # fmt: skip


def validation_memory() -> Result:
    sizes = (TEST_ROWS, TEST_ROWS * SCALE)
    measured = both_ways_in_fresh_processes("benchmarks.validation_memory", "--validate", sizes, write_test_split)
    growth = measured["streamed"][sizes[1]]["above_baseline"] / measured["streamed"][sizes[0]]["above_baseline"]
    before = measured["whole"][sizes[1]]["above_baseline"] / measured["whole"][sizes[0]]["above_baseline"]
    per_row = {mode: [m[n]["seconds"] / n for n in sizes] for mode, m in measured.items()}
    same = all(measured["streamed"][n]["accuracy"] == measured["whole"][n]["accuracy"] for n in sizes)
    mib = 2**20
    return Result(
        name="validation memory",
        metric=f"peak RSS of validation (Keras, float and int8 .tflite figures) at {SCALE}x the test rows "
        f"({sizes[1]:,} against {sizes[0]:,} 28x28 images), against the same at 1x",
        unit="x",
        ours=round(growth, 2),
        baseline=round(before, 2),
        ratio=round(before / growth, 2),
        target=f"<= {MEMORY_TARGET}x at {SCALE}x the rows, same figures",
        met=growth <= MEMORY_TARGET and same,
        ours_label=f"window by window ({measured['streamed'][sizes[1]]['above_baseline'] / mib:.0f} MiB at {SCALE}x)",
        baseline_label=f"split read whole ({measured['whole'][sizes[1]]['above_baseline'] / mib:.0f} MiB at {SCALE}x)",
        detail={
            "measured": measured,
            "same_figures": same,
            "seconds_per_1000_rows": {m: [round(s * 1000, 3) for s in v] for m, v in per_row.items()},
            "time_per_row_flat": abs(per_row["streamed"][1] / per_row["streamed"][0] - 1) <= TIME_FLATNESS,
        },
    )


def run(repeats: int = 1) -> list[Result]:
    """One measurement per size and way (a fresh process each): peaks do not need a median."""
    return [validation_memory()]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--validate")
    parser.add_argument("--mode", choices=("streamed", "whole"))
    args = parser.parse_args()
    if args.validate:
        print(json.dumps(validate(args.validate, args.mode)))
    else:
        print(json.dumps([r.as_dict() for r in run()], indent=2))
