"""Past one process: validation sharded on Dask against one process, and a whole run on 1,000,000 rows.

- **Sharded validation.** A generated table of 28x28 uint8 images (10 classes) with a test split of
  ``TEST_ROWS`` rows. The upstream stages run once, untimed; then validation alone (every upstream stage a cache
  hit), timed as the wall time of ``ptqflow.run``: in one process (one shard), shard by shard on the flow's
  threads, and shard by shard on a LocalCluster of two single-threaded worker processes, started beforehand (an
  existing cluster, as ``--dask-address`` reaches). The reports must be equal but for timings. The per-shard cost
  the workers recorded gives the scaling on more workers, on paper.
- **A million rows.** ``ptqflow run --epochs 1`` (the command, in a fresh process) on a generated table of
  ``MILLION`` rows and on one of a tenth of them: the run's peak RSS (the child's ``ru_maxrss``) and wall time.
  Target: it runs within this machine's memory.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import Result, json_from_fresh_process

TEST_ROWS = 40_000
SHARD_ROWS = 4096
WORKERS = 2
MILLION = 1_000_000


def write_table(path: str, rows: int, seed: int = 0) -> None:
    """Noise with a class-specific bright square; written in chunks (a million rows is 784 MB of pixels)."""
    import pyarrow.parquet as pq

    from ptqflow.storage.tables import ROW_GROUP_BYTES, TensorTable, rows_per_group, to_arrow

    rng = np.random.default_rng(seed)
    chunk = rows_per_group(28 * 28, ROW_GROUP_BYTES)
    writer = None
    for start in range(0, rows, chunk):
        count = min(chunk, rows - start)
        labels = rng.integers(0, 10, count)
        images = rng.integers(0, 100, (count, 28, 28, 1), dtype=np.uint8)
        for k in range(10):
            images[labels == k, (k % 5) * 5 : (k % 5) * 5 + 5, (k // 5) * 10 : (k // 5) * 10 + 5] = 250
        table = to_arrow(TensorTable(images, labels, {"value_range": [0, 255]}))
        writer = writer or pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table)
    assert writer is not None
    writer.close()


def _report(store: str, summary) -> dict:
    from ptqflow.storage.store import ArtifactStore
    from ptqflow.tasks.core.validation_report import without_timings

    return without_timings(json.loads(ArtifactStore(store).read_bytes(summary.artifacts["report"]))["metrics"])


def sharded_validation() -> Result:
    from distributed import LocalCluster

    import ptqflow

    with tempfile.TemporaryDirectory(prefix="ptqflow-bench-scale-") as tmp:
        data, store = os.path.join(tmp, "table.parquet"), os.path.join(tmp, "store")
        write_table(data, int(TEST_ROWS / 0.4))
        common = {"dataset": data, "store": store, "epochs": 1, "test_fraction": 0.4, "validation_fraction": 0.1}
        ptqflow.run(**common, shard_rows=10**7)  # the upstream stages, cached for the timed runs

        def timed(**options) -> tuple[float, object]:
            started = time.perf_counter()
            summary = ptqflow.run(**common, **options)
            return time.perf_counter() - started, summary

        one_seconds, one = timed(shard_rows=10**7 + 1)  # one shard: validation predicts in its own process
        threads_seconds, threads = timed(shard_rows=SHARD_ROWS)
        env = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1"}
        with LocalCluster(
            n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None, env=env
        ) as cluster:
            # other shard bounds than the threads' run: its shards are not cache hits of those
            dask_seconds, dask = timed(shard_rows=SHARD_ROWS // 2, dask_address=cluster.scheduler_address)
        identical = _report(store, one) == _report(store, threads) == _report(store, dask)
        shard_seconds = [r.seconds for n, r in dask.tasks.items() if n.startswith("predict_test_rows[")]
        validate_seconds = dask.tasks["validate_with_interpreter"].seconds
    shards = len(shard_seconds)
    known = [s for s in shard_seconds if s is not None]
    per_shard = float(np.median(known)) if known else None
    projection = (
        {str(workers): round(validate_seconds + -(-shards // workers) * per_shard, 1) for workers in (1, 2, 4, 8, 16)}
        if per_shard is not None and validate_seconds is not None
        else None
    )
    return Result(
        name="sharded validation",
        metric=f"validation of {TEST_ROWS:,} test rows (28x28, default CNN), run wall time with every upstream "
        f"stage cached, on {WORKERS} Dask worker processes (against one process)",
        unit="s",
        ours=round(dask_seconds, 1),
        baseline=round(one_seconds, 1),
        ratio=round(one_seconds / dask_seconds, 2),
        target="report identical to one process's (timings aside)",
        met=identical,
        ours_label=f"{shards} shards on a LocalCluster of {WORKERS} workers",
        baseline_label="one process",
        detail={
            "threads_seconds": round(threads_seconds, 1),
            "reports_identical": identical,
            "shards": shards,
            "shard_rows": SHARD_ROWS // 2,
            "median_shard_seconds": per_shard,
            "validate_stage_seconds": validate_seconds,
            "projected_seconds_by_workers": projection,
        },
    )


def cli_run(data: str, store: str) -> dict:
    """``ptqflow run`` as a child of this (fresh) process: its wall time and peak RSS (the largest child's,
    Linux: KiB; the command's own process is the largest)."""
    import shutil

    command = shutil.which("ptqflow") or os.path.join(os.path.dirname(sys.executable), "ptqflow")
    started = time.perf_counter()
    completed = subprocess.run(
        [command, "run", "--dataset", data, "--store", store, "--epochs", "1", "--json"],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if completed.returncode not in (0, 1):
        raise RuntimeError(completed.stderr[-2000:])
    summary = json.loads(completed.stdout)
    return {
        "seconds": round(seconds, 1),
        "peak_rss_bytes": peak * 1024,
        "status": summary["status"],
        "stage_seconds": {n: r["seconds"] for n, r in summary["tasks"].items()},
        "accuracy": summary["metrics"]["quantized_accuracy"],
    }


def million_rows() -> Result:
    measured = {}
    with tempfile.TemporaryDirectory(prefix="ptqflow-bench-million-") as tmp:
        for rows in (MILLION // 10, MILLION):
            data = os.path.join(tmp, f"table-{rows}.parquet")
            write_table(data, rows, seed=rows)
            # from a fresh process: this one's children (Dask workers, earlier runs) would set the peak read
            measured[rows] = json_from_fresh_process("benchmarks.scale", "--cli-run", data, f"{tmp}/store-{rows}")
            os.remove(data)
    small, large = measured[MILLION // 10], measured[MILLION]
    gib = 2**30
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fits = large["peak_rss_bytes"] < memory
    return Result(
        name="a million rows",
        metric=f"peak RSS of `ptqflow run --epochs 1` on {MILLION:,} 28x28 rows (against {MILLION // 10:,} rows)",
        unit="GiB",
        ours=round(large["peak_rss_bytes"] / gib, 2),
        baseline=round(small["peak_rss_bytes"] / gib, 2),
        ratio=round(small["peak_rss_bytes"] / large["peak_rss_bytes"], 2),
        target=f"runs within this machine's memory ({memory / gib:.0f} GiB)",
        met=fits and large["status"] in ("passed", "failed"),
        ours_label=f"{MILLION:,} rows, {large['seconds']:.0f} s",
        baseline_label=f"{MILLION // 10:,} rows, {small['seconds']:.0f} s",
        detail={"measured": {str(k): v for k, v in measured.items()}},
    )


def run(repeats: int = 1) -> list[Result]:
    """One measurement each: the reports are compared, not timed to the millisecond."""
    return [sharded_validation(), million_rows()]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--cli-run"]:
        print(json.dumps(cli_run(sys.argv[2], sys.argv[3])))
    else:
        print(json.dumps([r.as_dict() for r in run()], indent=2))
