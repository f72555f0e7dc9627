from __future__ import annotations

import json

import pytest

from ptqflow.storage.store import ArtifactStore
from ptqflow.tasks.release.documents import RunManifest
from ptqflow.tasks.release.manifest import build_manifest, find_manifest, list_manifests, scrub
from ptqflow.tasks.stages.release import write_run_manifest


def test_scrub_removes_secrets_and_url_credentials():
    cleaned = scrub(
        {"store": "s3://key:secret@bucket/p", "aws_secret_access_key": "x", "nested": [{"token": "t"}], "seed": 0}
    )
    assert cleaned == {
        "store": "s3://bucket/p",
        "aws_secret_access_key": "***",
        "nested": [{"token": "***"}],
        "seed": 0,
    }


def _manifest(run_id: str, created: str = "2026-01-01T00:00:00+00:00") -> RunManifest:
    m = build_manifest(
        run_id, {"seed": 0}, "file:///s", {}, {"quantized_accuracy": 1.0, "accuracy_drop_pp": 0.0}, {"passed": True}, {}
    )
    return m.model_copy(update={"created_at": created})


def test_manifest_records_versions_and_status():
    m = _manifest("abc")
    assert m.status == "passed" and m.run_id == "abc"
    assert {"tensorflow-cpu", "keras", "ai-edge-litert", "prefect", "python"} & set(m.libraries)
    assert m.schema_version == 1 and json.loads(m.to_bytes())["kind"] == "ptqflow.run_manifest"


def test_a_manifest_from_an_older_or_newer_ptqflow_reads_and_keeps_what_it_does_not_know(tmp_path):
    store = ArtifactStore(str(tmp_path))
    older = {"kind": "ptqflow.run_manifest", "run_id": "old-1", "created_at": "2025-01-01T00:00:00+00:00"}
    newer = {**_manifest("new-1").document(), "schema_version": 2, "device": {"arena_bytes": 1024}}
    store.write_named("runs/old-1.json", json.dumps(older).encode())
    store.write_named("runs/new-1.json", json.dumps(newer).encode())
    found = {m.run_id: m for m in list_manifests(store).manifests}
    assert found["old-1"].status is None and found["old-1"].artifacts == {} and not found["old-1"].passed
    assert found["new-1"].document()["device"] == {"arena_bytes": 1024}


def test_manifests_are_written_once_and_found_by_prefix(tmp_path):
    store = ArtifactStore(str(tmp_path))
    write_run_manifest.fn(store.url, _manifest("aaaa-1", "2026-01-01T00:00:00+00:00"))
    write_run_manifest.fn(store.url, _manifest("bbbb-2", "2026-01-02T00:00:00+00:00"))
    # A retried run reaching the end again keeps the first record.
    write_run_manifest.fn(store.url, _manifest("aaaa-1").model_copy(update={"status": "changed"}))
    assert json.loads(store.read_named("runs/aaaa-1.json"))["status"] == "passed"
    assert [m.run_id for m in list_manifests(store).manifests] == ["bbbb-2", "aaaa-1"]
    assert find_manifest(store, "bbbb").run_id == "bbbb-2"
    with pytest.raises(LookupError, match="ptqflow runs"):
        find_manifest(store, "zzz")


def test_ambiguous_prefix_asks_for_more(tmp_path):
    store = ArtifactStore(str(tmp_path))
    write_run_manifest.fn(store.url, _manifest("ab-1"))
    write_run_manifest.fn(store.url, _manifest("ab-2"))
    with pytest.raises(LookupError, match="give more of the run id"):
        find_manifest(store, "ab")


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"kind": "ptqflow.run_manifest"}', b'{"kind": "ptqflow.run_manifest", "run_id": 7}'],
    ids=["not-json", "a-list", "no-run-id", "a-number-for-a-run-id"],
)
def test_a_malformed_manifest_is_skipped_and_named_not_a_crash(tmp_path, content):
    store = ArtifactStore(str(tmp_path / "store"))
    write_run_manifest.fn(store.url, _manifest("aaaa-1"))
    store.write_named("runs/broken.json", content)
    listing = list_manifests(store)
    assert [m.run_id for m in listing.manifests] == ["aaaa-1"]
    [problem] = listing.unreadable
    assert "runs/broken.json is not a readable run manifest" in problem and "move it out of runs/" in problem
