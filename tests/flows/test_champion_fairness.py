"""The champion check compares only on rows the exported model never trained on (tasks/release/promotion.py), end to end
from the CLI: two seeds into one export, and a source that grows between nightly runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ptqflow.storage.tables import read_parquet, write_parquet_bytes
from ptqflow.tasks.data.datasets import load_dataset

pytestmark = pytest.mark.slow


def run(cli, *args: str) -> dict:
    result = cli("run", *args, "--epochs", "10", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def split_rows(summary: dict, name: str) -> set[bytes]:
    dataset = json.loads(Path(summary["artifacts"]["dataset"]["uri"].removeprefix("file://")).read_text())
    with open(dataset["splits"][name]["uri"].removeprefix("file://"), "rb") as f:
        table = read_parquet(f)
    return {row.tobytes() for row in table.features}


def test_two_seeds_into_one_export_compare_only_on_rows_both_held_out_or_refuse(cli, tmp_path):
    store, export = str(tmp_path / "store"), str(tmp_path / "export")
    champion = run(cli, "--store", store, "--export", export, "--seed", "0")
    assert champion["promotion"]["promote"]
    challenger = run(cli, "--store", store, "--export", export, "--seed", "1")
    decision = challenger["promotion"]
    unseen = split_rows(challenger, "test") - split_rows(champion, "train") - split_rows(champion, "validation")
    # Rows the champion's rule held out are exactly the ones counted; about a fifth of this test split.
    assert decision["compared_rows"] == len(split_rows(challenger, "test") & split_rows(champion, "test"))
    assert decision["compared_rows"] <= len(unseen) and decision["compared_rows"] < 100
    assert not decision["promote"] and decision["message"].startswith("not promoted automatically: only ")
    assert "--min-comparison-rows" in decision["message"]

    # Asked to decide on fewer rows, it does: on those rows only, never on rows the champion trained on.
    third = run(cli, "--store", store, "--export", export, "--seed", "1", "--min-comparison-rows", "20")
    assert third["promotion"]["compared_rows"] == decision["compared_rows"]
    assert (
        f"the {decision['compared_rows']} rows of this test split it never trained on" in third["promotion"]["message"]
    )


def test_a_source_that_grows_is_compared_on_its_whole_test_split_which_the_champion_never_saw(cli, tmp_path):
    digits = load_dataset("digits")
    source = tmp_path / "digits.parquet"
    source.write_bytes(write_parquet_bytes(digits.take(np.arange(1200))))
    store, export = str(tmp_path / "store"), str(tmp_path / "export")
    champion = run(cli, "--dataset", str(source), "--store", store, "--export", export)

    source.write_bytes(write_parquet_bytes(digits))  # a night's new rows appended
    challenger = run(cli, "--dataset", str(source), "--store", store, "--export", export, "--promotion-tolerance", "3")
    test = split_rows(challenger, "test")
    assert not test & split_rows(champion, "train") and not test & split_rows(champion, "validation")
    assert split_rows(champion, "test") <= test  # every old test row is still a test row
    decision = challenger["promotion"]
    assert decision["compared_rows"] == len(test)
    assert f"all {len(test)} rows of this test split" in decision["message"]
    assert decision["promote"], decision["message"]  # more data, judged fairly: it replaces the champion
    latest = json.loads((tmp_path / "export" / "latest.json").read_text())
    assert latest["run_id"] == challenger["run_id"]
