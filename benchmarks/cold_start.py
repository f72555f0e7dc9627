"""A cold command: ``ptqflow run`` on the built-in data set in a fresh process, with a fresh store and no
``PREFECT_API_URL`` (so Prefect's temporary server starts and stops with it), as a newcomer's first run. Its wall
time against the sum of its stages' own times, from the same run's ``--json`` summary: the difference is the fixed
cost of a run (imports, Prefect's server, the flow's set-up and end)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import Result

TARGET = 1.25


def one_run() -> tuple[float, float]:
    """(wall seconds, seconds of the stages) of one cold ``ptqflow run``."""
    store = tempfile.mkdtemp(prefix="ptqflow-bench-cold-")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PTQFLOW_TEMPORARY_PREFECT_API")}
    try:
        start = time.perf_counter()
        completed = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "ptqflow"), "run", "--store", store, "--json"],
            capture_output=True,
            text=True,
            env=env,
        )
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(store, ignore_errors=True)
    if completed.returncode != 0:
        raise RuntimeError(f"ptqflow run failed:\n{completed.stderr[-3000:]}")
    summary = json.loads(completed.stdout)
    return wall, sum(task["seconds"] for task in summary["tasks"].values())


def run(repeats: int = 3) -> list[Result]:
    runs = [one_run() for _ in range(repeats)]
    ratios = [wall / stages for wall, stages in runs]
    middle = sorted(range(repeats), key=lambda i: ratios[i])[repeats // 2]
    wall, stages = runs[middle]
    ratio = statistics.median(ratios)
    return [
        Result(
            name="cold start",
            metric="a cold `ptqflow run` (digits, fresh store, temporary Prefect server): wall time against the "
            "sum of its stages",
            unit="s",
            ours=round(wall, 2),
            baseline=round(stages, 2),
            ratio=round(stages / wall, 3),
            target=f"wall <= {TARGET}x the stages (ratio >= {1 / TARGET:.2f})",
            met=ratio <= TARGET,
            ours_label=f"wall time ({ratio:.2f}x the stages)",
            baseline_label="the stages' own time",
            detail={"runs": [{"wall_s": round(w, 3), "stages_s": round(s, 3)} for w, s in runs]},
        )
    ]


if __name__ == "__main__":
    print(json.dumps([r.as_dict() for r in run()], indent=2))
