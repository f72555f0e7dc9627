"""Which Parquet layout for tensor tables: fixed_size_binary + shape metadata vs Arrow's fixed_shape_tensor.

Writes and reads N uint8 samples of shape 28x28x1 (MNIST-sized) in memory, several times each, and reports
the median seconds and the ratio. ``python -m benchmarks.tensor_layout [--samples N] [--repeats R]``
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ptqflow.storage.tables import TensorTable, read_parquet, write_parquet_bytes


def _fixed_shape_tensor_bytes(table: TensorTable) -> bytes:
    arrow = pa.table(
        {"features": pa.FixedShapeTensorArray.from_numpy_ndarray(table.features), "label": pa.array(table.labels)}
    )
    sink = io.BytesIO()
    pq.write_table(arrow, sink, compression="zstd")
    return sink.getvalue()


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(samples: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    table = TensorTable(rng.integers(0, 256, (samples, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, samples))
    ours, canonical = write_parquet_bytes(table), _fixed_shape_tensor_bytes(table)
    np.testing.assert_array_equal(read_parquet(ours).features, read_parquet(canonical).features)
    result = {
        "samples": samples,
        "repeats": repeats,
        "write_s": {
            "fixed_size_binary": _median_seconds(lambda: write_parquet_bytes(table), repeats),
            "fixed_shape_tensor": _median_seconds(lambda: _fixed_shape_tensor_bytes(table), repeats),
        },
        "read_s": {
            "fixed_size_binary": _median_seconds(lambda: read_parquet(ours), repeats),
            "fixed_shape_tensor": _median_seconds(lambda: read_parquet(canonical), repeats),
        },
        "bytes": {"fixed_size_binary": len(ours), "fixed_shape_tensor": len(canonical)},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "pyarrow": pa.__version__,
        },
    }
    for kind in ("write_s", "read_s"):
        result[kind]["ratio"] = result[kind]["fixed_shape_tensor"] / result[kind]["fixed_size_binary"]
    return result


def run(repeats: int = 5) -> list:
    from benchmarks.common import Result

    result = measure(60_000, repeats)
    common = dict(
        ours_label="fixed_size_binary + shape metadata",
        baseline_label="Arrow fixed_shape_tensor",
        target="reported (chooses the layout)",
        met=None,
        unit="s",
    )
    return [
        Result(
            name="tensor_layout_write",
            metric="write 60,000 uint8 28x28x1 samples as Parquet",
            ours=result["write_s"]["fixed_size_binary"],
            baseline=result["write_s"]["fixed_shape_tensor"],
            ratio=result["write_s"]["ratio"],
            detail={"bytes": result["bytes"]},
            **common,
        ),
        Result(
            name="tensor_layout_read",
            metric="read 60,000 uint8 28x28x1 samples from Parquet",
            ours=result["read_s"]["fixed_size_binary"],
            baseline=result["read_s"]["fixed_shape_tensor"],
            ratio=result["read_s"]["ratio"],
            **common,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    result = measure(args.samples, args.repeats)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
