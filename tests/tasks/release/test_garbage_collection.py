"""What gc keeps when it cannot be sure (tasks/release/garbage_collection.py), on a store built by hand."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from ptqflow.storage.results import EXPECTED_SERIALIZER
from ptqflow.storage.store import ArtifactStore

NOW = datetime(2026, 11, 30, tzinfo=timezone.utc)


def add_run(store: ArtifactStore, run_id: str, day: int, blob: bytes, with_keys: bool = True) -> tuple[str, str]:
    """A run whose model is ``blob`` and whose one stage's cache record names a second blob."""
    model = store.put_bytes(blob, ".keras")
    extra = store.put_bytes(blob + b" report", ".json")
    key = f"ptqflow.tasks.stages.train-{run_id}"
    record = {
        "metadata": {"serializer": EXPECTED_SERIALIZER},
        "result": json.dumps(
            {
                "__class__": "ptqflow.tasks.core.artifacts.TrainedModel",
                "data": {"model": model.model_dump(), "report": extra.model_dump()},
            }
        ),
    }
    store.write_named(f"prefect-results/{key}", json.dumps(record).encode())
    stage = {"cached": False, "seconds": 1.0, **({"cache_key": key} if with_keys else {})}
    manifest = {
        "kind": "ptqflow.run_manifest",
        "run_id": run_id,
        "created_at": f"2026-11-{day:02d}T02:00:00+00:00",
        "artifacts": {"model": model.model_dump()},
        "tasks": {"train_float_model": stage},
    }
    store.write_named(f"runs/{run_id}.json", json.dumps(manifest).encode())
    return model.uri, extra.uri


def test_only_what_the_kept_runs_reach_survives(tmp_path):
    from ptqflow.tasks.release.garbage_collection import apply_collection, plan_collection

    store = ArtifactStore(str(tmp_path / "store"))
    old = add_run(store, "old", 1, b"old model")
    new = add_run(store, "new", 2, b"new model")
    plan = plan_collection(store, keep_runs=1, keep_days=None, now=NOW)
    assert plan.kept_runs == ["new"] and plan.removed_runs == ["old"] and not plan.notes
    assert plan.delete[0] == "runs/old.json"  # the manifest goes first: an interrupted gc leaves no dangling run
    apply_collection(store, plan)
    assert all(store.fs.exists(uri) for uri in new) and not any(store.fs.exists(uri) for uri in old)
    assert store.list_named("prefect-results") == ["prefect-results/ptqflow.tasks.stages.train-new"]


def test_a_kept_run_from_before_cache_keys_keeps_every_record_and_what_it_names(tmp_path):
    from ptqflow.tasks.release.garbage_collection import plan_collection

    store = ArtifactStore(str(tmp_path / "store"))
    old = add_run(store, "old", 1, b"old model")
    add_run(store, "new", 2, b"new model", with_keys=False)
    plan = plan_collection(store, keep_runs=1, keep_days=None, now=NOW)
    assert "kept every cache record" in plan.notes[0]
    # Only the old run's manifest goes: its record is kept, and with it the blobs the record names.
    assert plan.delete == ["runs/old.json"]
    assert all(store.fs.exists(uri) for uri in old)


def test_a_manifest_that_is_not_one_is_kept_and_said(tmp_path):
    from ptqflow.tasks.release.garbage_collection import plan_collection

    store = ArtifactStore(str(tmp_path / "store"))
    add_run(store, "new", 2, b"new model")
    store.write_named("runs/broken.json", b"{not json")
    plan = plan_collection(store, keep_runs=1, keep_days=None, now=NOW)
    assert "runs/broken.json" not in plan.delete and "is not a readable run manifest" in plan.notes[0]
    assert plan_collection(store, keep_runs=0, keep_days=30, now=NOW).kept_runs == ["new"]  # younger than 30 days
