"""docs/performance.md's table is generated from benchmarks/results.json; the two must agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.readme import load, render_table, table_in_readme

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results.json"


def test_readme_table_is_the_one_results_json_generates():
    if not RESULTS.exists():
        pytest.fail("benchmarks/results.json is missing: run `python -m benchmarks` and commit its output")
    assert table_in_readme(ROOT / "docs" / "performance.md") == render_table(load(RESULTS))


def test_every_result_reports_both_figures_and_the_machine():
    results = load(RESULTS)
    assert {"cpu", "cores", "libraries"} <= results["machine"].keys()
    names = {r["name"] for r in results["results"]}
    assert {"validation", "caching_warm", "memory", "size_mobilenetv2_sized"} <= names
    for r in results["results"]:
        assert r["ours"] > 0 and r["baseline"] > 0 and r["ratio"] > 0, r["name"]
