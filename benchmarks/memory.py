"""Peak RSS while calibrating from a 2 GB Parquet calibration source (``--calibration-source``): ptqflow's way
(draw the calibration set while reading the source by row groups, store it as Parquet, stream it into the
converter in batches) vs loading the source whole first. Each way runs in a fresh process; the figure is its peak
RSS above its own baseline (the RSS after imports, with the model built, just before calibration)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile

import numpy as np

from benchmarks.common import Result, json_from_fresh_process, rss_bytes

SOURCE_BYTES = 2 * 2**30
SHAPE = (256, 256, 3)  # large samples: 2 GB is ~11,000 of them, so calibration stays quick
BATCH = 64
CALIBRATION_SIZE = 1000
LIMIT_BYTES = 2**30


def write_source(path: str, total_bytes: int = SOURCE_BYTES) -> int:
    """Write the calibration source in pieces (the writer never holds it whole); returns the sample count."""
    import pyarrow.parquet as pq

    from ptqflow.storage.tables import TensorTable, rows_per_group, to_arrow

    sample_bytes = int(np.prod(SHAPE))
    count = total_bytes // sample_bytes
    rows = rows_per_group(sample_bytes)
    rng = np.random.default_rng(0)
    writer = None
    try:
        for start in range(0, count, rows):
            n = min(rows, count - start)
            piece = to_arrow(TensorTable(rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8), rng.integers(0, 10, n)))
            if writer is None:
                writer = pq.ParquetWriter(path, piece.schema, compression="zstd")
            writer.write_table(piece, row_group_size=rows)
    finally:
        if writer is not None:
            writer.close()
    return count


def _tiny_model():
    import keras

    inputs = keras.Input(SHAPE)
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 8, strides=8, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))


def calibrate(path: str, mode: str) -> dict:
    """In this process: build the model, note the baseline RSS, calibrate, report the peak."""
    from ptqflow.storage.tables import iter_feature_batches, read_parquet
    from ptqflow.tasks.core.parameters import ConversionParameters
    from ptqflow.tasks.quantization.converter import quantize

    model = _tiny_model()
    baseline = rss_bytes()
    if mode == "stream":
        from ptqflow.storage.tables import write_parquet_bytes
        from ptqflow.tasks.data.calibration import calibration_seed
        from ptqflow.tasks.data.datasets import Draw, load_dataset

        drawn = load_dataset(path, draw=Draw(CALIBRATION_SIZE, calibration_seed(0), what="calibration set"))
        stored = path + ".calibration.parquet"  # what the calibration stage writes to the store
        with open(stored, "wb") as f:
            f.write(write_parquet_bytes(drawn))
        del drawn

        def batches():
            with open(stored, "rb") as f:
                yield from iter_feature_batches(f, BATCH)
    else:
        from ptqflow.tasks.data.calibration import draw_calibration_set

        with open(path, "rb") as f:
            whole = read_parquet(f)
        drawn = draw_calibration_set(whole, CALIBRATION_SIZE, 0).features

        def batches():
            for start in range(0, len(drawn), BATCH):
                yield drawn[start : start + BATCH]

    quantize(model, batches, ConversionParameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "baseline_rss": baseline, "peak_rss": peak, "above_baseline": peak - baseline}


def run(repeats: int = 1) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="ptqflow-bench-") as tmp:
        path = os.path.join(tmp, "calibration-source.parquet")
        count = write_source(path)
        file_bytes = os.path.getsize(path)
        ours = json_from_fresh_process("benchmarks.memory", "--calibrate", path, "--mode", "stream")
        whole = json_from_fresh_process("benchmarks.memory", "--calibrate", path, "--mode", "whole")
    gib = 2**30
    return [
        Result(
            name="memory",
            metric=f"peak RSS above baseline, calibrating from a {file_bytes / gib:.1f} GiB Parquet source",
            unit="GiB",
            ours=ours["above_baseline"] / gib,
            baseline=whole["above_baseline"] / gib,
            ratio=whole["above_baseline"] / max(ours["above_baseline"], 1),
            target="within 1 GiB of the baseline; loading whole is not",
            met=ours["above_baseline"] <= LIMIT_BYTES < whole["above_baseline"],
            ours_label=f"{CALIBRATION_SIZE} drawn while reading by row groups, then streamed in batches of {BATCH}",
            baseline_label=f"source loaded whole, {CALIBRATION_SIZE} drawn, then batched",
            detail={
                "samples": count,
                "calibration_size": CALIBRATION_SIZE,
                "sample_shape": list(SHAPE),
                "ours": ours,
                "baseline": whole,
            },
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calibrate", required=True)
    parser.add_argument("--mode", choices=["stream", "whole"], required=True)
    args = parser.parse_args()
    print(json.dumps(calibrate(args.calibrate, args.mode)))


if __name__ == "__main__":
    main()
