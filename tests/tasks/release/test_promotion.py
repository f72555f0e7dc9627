"""The promotion rule, and moving latest.json by hand (promote, rollback) on an export in memory."""

from __future__ import annotations

import json
import uuid

import pytest

from ptqflow.storage.store import ArtifactStore, StoreError
from ptqflow.tasks.release.documents import ExportPointer, RecordedSplit, RunManifest
from ptqflow.tasks.release.promotion import decide, point_latest_to, read_pointer, rollback


def champion_with_split(scheme: str) -> RunManifest:
    """A champion's manifest whose split rule is ``scheme`` with seed 0 and fractions 0.15 / 0.2."""
    split = RecordedSplit(scheme=scheme, seed=0, validation_fraction=0.15, test_fraction=0.2)
    return RunManifest(run_id="c", created_at="2026-01-01T00:00:00+00:00", split=split)


CHAMPION = ExportPointer(version="20261126T020000Z-a", run_id="a", files={})


def test_no_exported_model_yet_promotes():
    assert decide(0.95, True, 0.0).promote


def test_a_model_that_failed_its_gate_is_never_promoted():
    decision = decide(0.99, False, 0.0, 0.5, CHAMPION)
    assert not decision.promote and "did not pass its own gate" in decision.message


@pytest.mark.parametrize(
    ("challenger", "champion", "tolerance", "promoted"),
    [
        (0.95, 0.95, 0.0, True),
        (0.96, 0.95, 0.0, True),
        (0.949, 0.95, 0.0, False),
        (0.949, 0.95, 0.2, True),
        (0.94, 0.95, 0.5, False),
    ],
)
def test_the_challenger_may_be_at_most_the_tolerance_below_the_champion(challenger, champion, tolerance, promoted):
    decision = decide(challenger, True, tolerance, champion, CHAMPION)
    assert decision.promote is promoted
    assert decision.champion_accuracy == champion and decision.challenger_accuracy == challenger
    if not promoted:
        assert decision.message.startswith("not promoted:") and CHAMPION.version in decision.message


def _publish(export: ArtifactStore, version: str, payload: bytes) -> None:
    """A version as publish_run leaves it: its files, history/<version>.json, latest.json."""
    key = f"versions/{version}/model.tflite"
    export.write_named(key, payload)
    import hashlib

    pointer = json.dumps(
        {
            "kind": "ptqflow.export_pointer",
            "version": version,
            "run_id": version[-1],
            "published_at": "2026-11-27T00:00:00+00:00",
            "files": {
                "tflite": {
                    "uri": export.uri_for(key),
                    "sha256": hashlib.sha256(payload).hexdigest(),
                    "bytes": len(payload),
                }
            },
        }
    ).encode()
    export.write_named(f"history/{version}.json", pointer, exclusive=True)
    export.write_named("latest.json", pointer)


def test_rollback_points_at_the_version_before_and_keeps_every_pointer():
    export = ArtifactStore(f"memory://export-{uuid.uuid4().hex}")
    _publish(export, "20261125T020000Z-a", b"model a")
    _publish(export, "20261126T020000Z-b", b"model b")
    move = rollback(export)
    assert (move.version, move.previous_version) == ("20261125T020000Z-a", "20261126T020000Z-b")
    assert read_pointer(export).version == "20261125T020000Z-a" and read_pointer(export).action == "rollback"
    with pytest.raises(StoreError, match="is the first live version"):
        rollback(export)
    assert len(export.list_named("history")) == 3  # two publishes and the rollback, none overwritten
    point_latest_to(export, "20261126T020000Z-b", "promote")
    assert read_pointer(export).version == "20261126T020000Z-b" and len(export.list_named("history")) == 4


def test_a_corrupt_version_is_not_pointed_at():
    export = ArtifactStore(f"memory://export-{uuid.uuid4().hex}")
    _publish(export, "20261125T020000Z-a", b"model a")
    _publish(export, "20261126T020000Z-b", b"model b")
    export.write_named("versions/20261125T020000Z-a/model.tflite", b"tampered")
    with pytest.raises(StoreError, match="does not match its source"):
        rollback(export)
    assert read_pointer(export).version == "20261126T020000Z-b"


def test_the_rows_unseen_by_a_champion_are_those_its_own_rule_held_out_for_testing():
    import numpy as np

    from ptqflow.tasks.data.sampling import SPLIT_SCHEME, hash_split
    from ptqflow.tasks.release.promotion import rows_unseen_by

    rows = np.random.default_rng(0).integers(0, 256, (2000, 64), dtype=np.uint8)
    labels = np.arange(2000) % 4
    champion_rule = champion_with_split(SPLIT_SCHEME)
    champion_held_out = set(hash_split(rows, labels, 0.15, 0.2, seed=0)["test"].tolist())
    assert set(np.flatnonzero(rows_unseen_by(champion_rule, rows)).tolist()) == champion_held_out
    # Another run with the same seed: its whole test split is unseen by the champion.
    test = hash_split(rows, labels, 0.15, 0.2, seed=0)["test"]
    assert rows_unseen_by(champion_rule, rows[test]).all()
    # Another seed: only the rows both held out (about a fifth of a fifth of the data).
    other_test = hash_split(rows, labels, 0.15, 0.2, seed=1)["test"]
    unseen = rows_unseen_by(champion_rule, rows[other_test])
    assert set(other_test[unseen].tolist()) == champion_held_out & set(other_test.tolist())
    assert 0.1 < unseen.mean() < 0.3
    # A champion exported before the rule existed: nothing can be proven unseen.
    assert rows_unseen_by(RunManifest(run_id="c", created_at="2026-01-01T00:00:00+00:00"), rows) is None


def test_the_rows_unseen_by_a_champion_of_given_splits_are_those_it_never_trained_on():
    import numpy as np

    from ptqflow.tasks.data.sampling import GIVEN_SCHEME, read_seen_rows, seen_rows_bytes
    from ptqflow.tasks.release.promotion import rows_unseen_by

    rows = np.random.default_rng(0).integers(0, 256, (300, 64), dtype=np.uint8)
    champion = champion_with_split(GIVEN_SCHEME)
    seen = read_seen_rows(seen_rows_bytes(rows[:200]))  # the champion trained and validated on the first 200
    # The owner moved 50 of those rows into the test split since: only the other 100 are a fair comparison.
    unseen = rows_unseen_by(champion, rows[150:], lambda: seen)
    assert unseen.tolist() == [False] * 50 + [True] * 100
    assert rows_unseen_by(champion, rows[150:]) is None  # its digests were not exported: nothing is proven


def test_the_rows_a_fair_comparison_needs():
    from ptqflow.tasks.core.parameters import GateParameters

    assert GateParameters().comparison_rows_needed(359) == 100
    assert GateParameters().comparison_rows_needed(120) == 60  # half a small test split
    assert GateParameters(min_comparison_rows=30).comparison_rows_needed(359) == 30


@pytest.mark.parametrize(
    ("challenger", "champion", "tolerance", "promoted"),
    [(0.100, 0.100, 0.0, True), (0.095, 0.100, 0.0, True), (0.101, 0.100, 0.0, False), (0.101, 0.100, 2.0, True)],
)
def test_a_regression_challenger_may_have_at_most_the_tolerance_more_error(challenger, champion, tolerance, promoted):
    from ptqflow.tasks.release.promotion import decide_on_error

    decision = decide_on_error(challenger, tolerance, champion, CHAMPION, 80, "the 80 rows")
    assert decision.promote is promoted and decision.metric == "mae"
    assert decision.challenger_mae == challenger and decision.champion_mae == champion
    assert f"MAE {challenger:.4g} against {champion:.4g}" in decision.message
