"""Run the benchmarks: ``python -m benchmarks [--only a,b] [--repeats N] [--no-readme]``.

Each benchmark module runs in a fresh process (so TensorFlow state and memory never leak from one to the next),
prints nothing that matters, and writes its results as JSON to a file the runner reads. The runner prints a
table, writes ``benchmarks/results.json`` and regenerates the table in docs/performance.md from it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import machine

ROOT = Path(__file__).resolve().parent.parent
MODULES = [
    "calibration",
    "validation",
    "caching",
    "storage",
    "memory",
    "inference",
    "tensor_layout",
    "sweep",
    "images",
    "activation_ranges",
    "device_targets",
    "mixed_precision",
    "streaming",
    "validation_memory",
    "scale",
    "cold_start",
]


def _run_module(name: str, repeats: int) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        target = out.name
    try:
        code = (
            "import json, sys\n"
            f"from benchmarks.{name} import run\n"
            f"json.dump([r.as_dict() for r in run({repeats})], open({target!r}, 'w'))\n"
        )
        completed = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL"},
        )
        if completed.returncode != 0:
            raise SystemExit(f"benchmark {name} failed:\n{completed.stderr[-4000:]}")
        with open(target, encoding="utf-8") as f:
            return json.load(f)
    finally:
        os.unlink(target)


def _print(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ptqflow benchmarks (ratio: times better than the baseline)", title_justify="left")
    for column in ("benchmark", "ptqflow", "baseline", "ratio", "target", "met"):
        table.add_column(column)
    for r in results:
        table.add_row(
            r["name"],
            f"{r['ours']:.4g} {r['unit']}",
            f"{r['baseline']:.4g} {r['unit']}",
            f"{r['ratio']:.2f}x",
            r["target"],
            {True: "yes", False: "NO", None: "-"}[r["met"]],
        )
    Console(width=160).print(table)


def _merged(previous: dict, fresh: dict) -> dict:
    """A partial run (``--only``) replaces its own benchmarks' rows in place and keeps the others, each row with
    the time it was measured; the machine must be the same one."""
    if previous.get("machine", {}).get("cpu") != fresh["machine"]["cpu"]:
        raise SystemExit("results.json was measured on another machine: rerun every benchmark, without --only")
    names = {r["name"] for r in fresh["results"]}
    merged, placed = [], False
    for row in previous["results"]:
        if row["name"] in names:
            if not placed:
                merged += fresh["results"]
                placed = True
        else:
            merged.append({"measured_at": previous["generated_at"], "repeats": previous["repeats"], **row})
    if not placed:
        merged += fresh["results"]
    # The whole suite's time is known only from a full run: keep the last one's.
    return {**fresh, "total_seconds": previous["total_seconds"], "results": merged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(MODULES)}")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (the median is quoted)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results.json")
    parser.add_argument("--no-readme", action="store_true", help="do not regenerate the table in docs/performance.md")
    args = parser.parse_args()
    modules = args.only.split(",") if args.only else MODULES
    unknown = set(modules) - set(MODULES)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(sorted(unknown))}: choose from {', '.join(MODULES)}")

    started = time.perf_counter()
    results: list[dict] = []
    for name in modules:
        module_started = time.perf_counter()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        measured_at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        results += [{**r, "measured_at": measured_at, "repeats": args.repeats} for r in _run_module(name, args.repeats)]
        print(f"  {name}: {time.perf_counter() - module_started:.0f} s", file=sys.stderr, flush=True)
    document = {
        "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "repeats": args.repeats,
        "total_seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
        "results": results,
    }
    if args.only and args.output.exists():
        document = _merged(json.loads(args.output.read_text(encoding="utf-8")), document)
    args.output.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    _print(results)
    if not args.no_readme:
        from benchmarks.readme import update_readme

        update_readme(ROOT / "docs" / "performance.md", document)
    failed = [r["name"] for r in results if r["met"] is False]
    if failed:
        print(f"targets not met: {', '.join(failed)}", file=sys.stderr)


if __name__ == "__main__":
    main()
