"""ptqflow gc on a real store: five runs and an export, two kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FAST = ("--epochs", "2")


def run_json(cli, *args: str) -> dict:
    result = cli("run", *args, *FAST, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def interrupt_a_collection_halfway(store: Path) -> None:
    from datetime import datetime, timezone

    from ptqflow.storage.store import ArtifactStore
    from ptqflow.tasks.release.garbage_collection import apply_collection, plan_collection

    target = ArtifactStore(str(store))
    plan = plan_collection(target, keep_runs=2, keep_days=None, now=datetime.now(timezone.utc))
    deleted, delete = [], target.delete_named

    def killed_halfway(key: str) -> None:
        if len(deleted) == len(plan.delete) // 2:
            raise KeyboardInterrupt("killed")
        delete(key)
        deleted.append(key)

    target.delete_named = killed_halfway  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        apply_collection(target, plan)
    assert len(deleted) == len(plan.delete) // 2 > 0


def test_gc_keeps_the_newest_runs_warm_frees_the_rest_and_leaves_exports_whole(cli, tmp_path):
    store, export = tmp_path / "store", tmp_path / "export"
    runs = [
        run_json(cli, "--store", str(store), "--seed", str(seed), *(("--export", str(export)) if seed == 1 else ()))
        for seed in range(5)
    ]
    before = files(store)
    dry = cli("gc", "--store", str(store), "--keep-runs", "2", "--dry-run")
    assert dry.returncode == 0 and "would free" in dry.stdout and files(store) == before

    interrupt_a_collection_halfway(store)  # what a kill -9 in the middle of gc leaves: each deletion is whole
    interrupted = files(store)
    assert set(interrupted) < set(before)
    collected = cli("gc", "--store", str(store), "--keep-runs", "2")  # the next gc finishes the job
    assert collected.returncode == 0, collected.stderr[-3000:]
    after = files(store)
    freed = sum(interrupted.values()) - sum(after.values())
    assert f"freed {freed:,} B" in collected.stdout and freed > 0
    assert set(after) < set(interrupted)  # deleted only: nothing rewritten or added

    removed, kept = runs[:3], runs[3:]
    assert sorted(p.name for p in (store / "runs").iterdir()) == sorted(f"{r['run_id']}.json" for r in kept)
    for run in removed:  # what each removed run alone held is gone (every seed trains its own model)
        for name in ("model", "tflite", "calibration"):
            assert not Path(run["artifacts"][name]["uri"].removeprefix("file://")).exists(), (run["run_id"], name)
    for run, seed in zip(kept, (3, 4)):  # and a kept run is all there: it reruns from cache, byte for byte
        again = run_json(cli, "--store", str(store), "--seed", str(seed))
        assert all(t["cached"] for t in again["tasks"].values()), again["tasks"]
        assert again["artifacts"] == run["artifacts"]

    # The export holds its own verified copies: the removed run it published still verifies.
    latest = json.loads((export / "latest.json").read_text())
    assert latest["run_id"] == runs[1]["run_id"]
    for ref in latest["files"].values():
        assert (export / ref["uri"]).stat().st_size == ref["bytes"]  # relative to the export
    verify = cli("rollback", "--export", str(export))  # nothing to roll back to, but every file is read first
    assert "nothing to roll back to" in verify.stderr


def _manifest(store, run_id: str, day: int) -> None:
    document = {"kind": "ptqflow.run_manifest", "run_id": run_id, "created_at": f"2026-11-{day:02d}T02:00:00+00:00"}
    store.write_named(f"runs/{run_id}.json", json.dumps(document).encode())


def test_gc_and_runs_name_a_malformed_manifest_and_go_on(tmp_path):
    from typer.testing import CliRunner

    from ptqflow.flows.cli import app
    from ptqflow.storage.store import ArtifactStore

    store = ArtifactStore(str(tmp_path / "store"))
    _manifest(store, "old", 1)
    _manifest(store, "new", 2)
    store.write_named("runs/broken.json", b'{"kind": "ptqflow.run_manifest", "created_at": 5}')
    listed = CliRunner().invoke(app, ["runs", "--store", store.url, "--json"])
    assert listed.exit_code == 0, listed.output
    assert "runs/broken.json is not a readable run manifest" in listed.output and "Traceback" not in listed.output
    collected = CliRunner().invoke(app, ["gc", "--store", store.url, "--keep-runs", "1"])
    assert collected.exit_code == 0 and "kept runs/broken.json" in collected.output, collected.output
    assert store.exists_named("runs/broken.json") and store.exists_named("runs/new.json")
    assert not store.exists_named("runs/old.json")


def test_gc_on_storage_that_refuses_deletes_says_so_in_one_line(tmp_path, monkeypatch):
    import errno

    from typer.testing import CliRunner

    from ptqflow.flows.cli import app
    from ptqflow.storage.store import ArtifactStore

    store = ArtifactStore(str(tmp_path / "store"))
    _manifest(store, "old", 1)
    _manifest(store, "new", 2)

    def read_only(self, key: str) -> None:  # root ignores file modes: the refusal a read-only mount gives
        raise OSError(errno.EROFS, "Read-only file system", self.path_for(key))

    monkeypatch.setattr(ArtifactStore, "delete_named", read_only)
    result = CliRunner().invoke(app, ["gc", "--store", store.url, "--keep-runs", "1"])
    assert result.exit_code != 0 and not isinstance(result.exception, OSError)
    assert "gc stopped: the storage is read-only at" in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
