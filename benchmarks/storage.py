"""Writing and reading a 500 MB tensor table: Parquet through the artifact store (ptqflow) vs np.save / np.load
of the same arrays (a common ad-hoc way). Reported, no target: Parquet buys verification, schema, streaming and
readability by pandas / polars / DuckDB; the figure says what that costs."""

from __future__ import annotations

import os
import tempfile

import numpy as np

from benchmarks.common import Result, median_seconds

TARGET_BYTES = 500 * 2**20
SHAPE = (28, 28, 1)


def synthetic_images(count: int, seed: int = 0) -> np.ndarray:
    """MNIST-sized uint8 images with structure (blurred blobs and noise), so compression behaves as on images."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:28, 0:28]
    images = np.empty((count, 28, 28, 1), np.uint8)
    chunk = 10_000
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        cy, cx = rng.uniform(6, 22, (2, n, 1, 1))
        radius = rng.uniform(3, 8, (n, 1, 1))
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * radius**2)) * 255
        noise = rng.integers(0, 24, (n, 28, 28))
        images[start : start + n, ..., 0] = np.clip(blob + noise, 0, 255).astype(np.uint8)
    return images


def run(repeats: int = 3) -> list[Result]:
    from ptqflow.storage.store import ArtifactStore
    from ptqflow.storage.tables import TensorTable, read_parquet, write_parquet_bytes

    count = TARGET_BYTES // int(np.prod(SHAPE))
    table = TensorTable(synthetic_images(count), np.random.default_rng(1).integers(0, 10, count))
    with tempfile.TemporaryDirectory(prefix="ptqflow-bench-") as tmp:
        npy = os.path.join(tmp, "features.npy")
        refs = []

        def ours_write():
            # A fresh store each time, so the content-addressed put really writes.
            fresh = ArtifactStore(os.path.join(tmp, f"store-{len(refs)}"))
            refs.append((fresh, fresh.put_bytes(write_parquet_bytes(table), ".parquet")))

        def ours_read():
            fresh, ref = refs[-1]
            with fresh.open(ref) as f:
                return read_parquet(f)

        def baseline_write():
            np.save(npy, table.features)
            np.save(npy.replace("features", "labels"), table.labels)

        def baseline_read():
            return np.load(npy), np.load(npy.replace("features", "labels"))

        write_s, write_all = median_seconds(ours_write, repeats)
        read_s, read_all = median_seconds(ours_read, repeats)
        np_write_s, np_write_all = median_seconds(baseline_write, repeats)
        np_read_s, np_read_all = median_seconds(baseline_read, repeats)
        assert np.array_equal(ours_read().features, baseline_read()[0])
        parquet_bytes, npy_bytes = refs[-1][1].bytes, os.path.getsize(npy)
    common = dict(ours_label="Parquet via the store (sha256-verified)", baseline_label="np.save / np.load")
    size_mb = table.features.nbytes / 2**20
    return [
        Result(
            name="storage_write",
            metric=f"write a {size_mb:.0f} MB tensor table",
            unit="s",
            ours=write_s,
            baseline=np_write_s,
            ratio=np_write_s / write_s,
            target="reported",
            met=None,
            detail={
                "ours_runs_s": write_all,
                "baseline_runs_s": np_write_all,
                "parquet_bytes": parquet_bytes,
                "npy_bytes": npy_bytes,
            },
            **common,
        ),
        Result(
            name="storage_read",
            metric=f"read a {size_mb:.0f} MB tensor table",
            unit="s",
            ours=read_s,
            baseline=np_read_s,
            ratio=np_read_s / read_s,
            target="reported",
            met=None,
            detail={"ours_runs_s": read_all, "baseline_runs_s": np_read_all},
            **common,
        ),
    ]
