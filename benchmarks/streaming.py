"""Training memory against the size of the split: the train stage's fit of the default CNN, one epoch, on stored
Parquet tensor tables of 28x28 uint8 images (10 classes) of ``ROWS`` and ten times as many rows, each in a fresh
process, measured above its own baseline (the RSS after imports; the peak is reset there).

- ptqflow: both splits streamed from the stored Parquet, row group by row group (``tasks.models.streaming``);
- the way before it: each split read whole (``read_parquet``), converted to float32 and given to ``model.fit``.

Target: ptqflow's peak at 10x the rows within 1.2x its peak at 1x (the issue's figure for the way before was
1.7x on a whole run). Time per training row at both sizes is in the detail (target: flat within 20%).
Validation's memory is ``benchmarks/validation_memory.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np

from benchmarks.common import Result, json_from_fresh_process, rss_bytes

ROWS = 60_000
SCALE = 10
VALIDATION_SHARE = 0.1
MEMORY_TARGET = 1.2
TIME_FLATNESS = 0.2


def write_splits(folder: str, rows: int) -> None:
    """``train.parquet`` and ``validation.parquet``: noise with a class-specific bright square, as the sample
    stage writes them."""
    rng = np.random.default_rng(rows)
    for name, count in (("train", rows), ("validation", int(rows * VALIDATION_SHARE))):
        write_images_table(os.path.join(folder, f"{name}.parquet"), rng, count)


def write_images_table(path: str, rng: np.random.Generator, count: int) -> None:
    from ptqflow.storage.tables import TensorTable, write_parquet_bytes

    labels = rng.integers(0, 10, count)
    images = rng.integers(0, 100, (count, 28, 28, 1), dtype=np.uint8)
    for k in range(10):
        chosen = labels == k
        images[chosen, (k % 5) * 5 : (k % 5) * 5 + 5, (k // 5) * 10 : (k // 5) * 10 + 5] = 250
    table = TensorTable(images, labels, {"value_range": [0, 255]})
    with open(path, "wb") as f:
        f.write(write_parquet_bytes(table))


def peak_rss_bytes() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def train(folder: str, mode: str) -> dict:
    """In this process: one epoch of the default CNN on ``folder``'s splits, streamed or read whole."""
    import keras

    from ptqflow.storage.tables import ParquetRowGroups, read_parquet
    from ptqflow.tasks.core.parameters import TrainingParameters
    from ptqflow.tasks.models.training import build_default_cnn, fit_default_model, seeded

    spec = images_spec()
    params = TrainingParameters(epochs=1, batch_size=64)
    keras.Input((1,))  # Keras's own start-up allocations belong to the baseline
    baseline = rss_bytes()
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")
    started = time.perf_counter()
    train_path, validation_path = (os.path.join(folder, f"{n}.parquet") for n in ("train", "validation"))
    if mode == "streamed":
        with open(train_path, "rb") as train_file, open(validation_path, "rb") as validation_file:
            groups = ParquetRowGroups(train_file), ParquetRowGroups(validation_file)
            fit_default_model(spec, *groups, params, seed=0)
        rows = sum(groups[0].row_counts)
    else:  # the train stage before streaming: the splits whole, as float32 arrays, shuffled by Keras
        with open(train_path, "rb") as f:
            whole = read_parquet(f)
        with open(validation_path, "rb") as f:
            validation = read_parquet(f)
        with seeded(0):
            model = build_default_cnn(spec)
            model.compile(keras.optimizers.Adam(params.learning_rate), "sparse_categorical_crossentropy")
            validation_data = (validation.features.astype(np.float32), validation.labels)
            model.fit(whole.features.astype(np.float32), whole.labels, validation_data=validation_data, verbose=0,
                      batch_size=params.batch_size, epochs=1, shuffle=True)  # fmt: skip
        rows = len(whole)
    seconds = time.perf_counter() - started
    return {"mode": mode, "rows": rows, "above_baseline": peak_rss_bytes() - baseline, "seconds": seconds}


def images_spec():
    from ptqflow.tasks.core.artifacts import FeatureSpec

    return FeatureSpec(
        shape=(28, 28, 1), dtype="uint8", value_range=(0, 255), n_classes=10, class_names=tuple("0123456789")
    )


def both_ways_in_fresh_processes(
    module: str, option: str, sizes: tuple[int, ...], write: Callable[[str, int], None]
) -> dict[str, dict[int, dict]]:
    """``python -m module option FOLDER --mode MODE`` for each size (its data written by ``write``) and each way,
    streamed and whole: what each printed, by way and size."""
    measured: dict[str, dict[int, dict]] = {"streamed": {}, "whole": {}}
    with tempfile.TemporaryDirectory(prefix="ptqflow-bench-") as tmp:
        for rows in sizes:
            folder = os.path.join(tmp, str(rows))
            os.makedirs(folder)
            write(folder, rows)
            for mode in measured:
                measured[mode][rows] = json_from_fresh_process(module, option, folder, "--mode", mode)
    return measured


def run(repeats: int = 1) -> list[Result]:
    """One measurement per size and way (a fresh process each): peaks do not need a median."""
    measured = both_ways_in_fresh_processes("benchmarks.streaming", "--train", (ROWS, ROWS * SCALE), write_splits)
    small, large = (measured["streamed"][n] for n in (ROWS, ROWS * SCALE))
    before_small, before_large = (measured["whole"][n] for n in (ROWS, ROWS * SCALE))
    growth = large["above_baseline"] / small["above_baseline"]
    before_growth = before_large["above_baseline"] / before_small["above_baseline"]
    per_row = {mode: [m[n]["seconds"] / n for n in (ROWS, ROWS * SCALE)] for mode, m in measured.items()}
    mib = 2**20
    return [
        Result(
            name="training memory",
            metric=f"peak RSS of training at {SCALE}x the rows ({ROWS * SCALE:,} against {ROWS:,} 28x28 images), "
            "one epoch (against the same at 1x)",
            unit="x",
            ours=round(growth, 2),
            baseline=round(before_growth, 2),
            ratio=round(before_growth / growth, 2),
            target=f"<= {MEMORY_TARGET}x at {SCALE}x the rows",
            met=growth <= MEMORY_TARGET,
            ours_label=f"streamed ({large['above_baseline'] / mib:.0f} MiB at {SCALE}x)",
            baseline_label=f"splits read whole ({before_large['above_baseline'] / mib:.0f} MiB at {SCALE}x)",
            detail={
                "measured": measured,
                "seconds_per_1000_rows": {m: [round(s * 1000, 3) for s in v] for m, v in per_row.items()},
                "time_per_row_flat": abs(per_row["streamed"][1] / per_row["streamed"][0] - 1) <= TIME_FLATNESS,
            },
        )
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--train")
    parser.add_argument("--mode", choices=("streamed", "whole"))
    args = parser.parse_args()
    if args.train:
        print(json.dumps(train(args.train, args.mode)))
    else:
        print(json.dumps([r.as_dict() for r in run()], indent=2))
