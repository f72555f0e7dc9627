"""Publishing to an export location: versioned, verified, pointer last, idempotent."""

from __future__ import annotations

import json
import uuid

import pytest

from storage.store import ArtifactStore
from tasks.publish import EXPORT_FILES, ExportCorrupted, publish_run


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "store"))


@pytest.fixture(params=["local", "memory"])
def export(request, tmp_path) -> ArtifactStore:
    if request.param == "memory":
        return ArtifactStore(f"memory://export-{uuid.uuid4().hex}")
    return ArtifactStore(str(tmp_path / "export"))


def _artifacts(store: ArtifactStore, tag: str) -> dict:
    return {name: store.put_bytes(f"{name} {tag}".encode(), ".bin") for name in EXPORT_FILES}


def _manifest(run_id: str) -> dict:
    return {"run_id": run_id, "status": "passed", "export": None}


def test_publish_copies_verifies_and_points(store, export):
    artifacts = _artifacts(store, "v1")
    record = publish_run(store, export, "run-1", artifacts, _manifest("run-1"))
    assert record.published and record.version.endswith("-run-1")
    latest = json.loads(export.read_named("latest.json"))
    assert latest["version"] == record.version and latest["run_id"] == "run-1"
    for name, filename in EXPORT_FILES.items():
        copy = export.read_named(f"versions/{record.version}/{filename}")
        assert copy == store.read_bytes(artifacts[name])
        assert latest["files"][name]["sha256"] == artifacts[name].sha256
    manifest = json.loads(export.read_named(f"versions/{record.version}/manifest.json"))
    assert manifest["export"]["version"] == record.version
    assert export.list_named("history") == [f"history/{record.version}.json"]


def test_republishing_the_same_run_is_a_no_op(store, export):
    artifacts = _artifacts(store, "v1")
    first = publish_run(store, export, "run-1", artifacts, _manifest("run-1"))
    pointer = export.read_named("latest.json")
    again = publish_run(store, export, "run-1", artifacts, _manifest("run-1"))
    assert not again.published and again.version == first.version
    assert export.read_named("latest.json") == pointer
    assert len(export.list_named("versions")) == 1


def test_a_cached_rerun_with_the_same_bytes_publishes_nothing(store, export):
    artifacts = _artifacts(store, "v1")
    first = publish_run(store, export, "run-1", artifacts, _manifest("run-1"))
    second = publish_run(store, export, "run-2", artifacts, _manifest("run-2"))
    assert not second.published and second.version == first.version
    assert len(export.list_named("versions")) == 1


def test_the_same_model_with_a_new_report_publishes_nothing(store, export):
    artifacts = _artifacts(store, "v1")
    first = publish_run(store, export, "run-1", artifacts, _manifest("run-1"))
    # Another run of the same model: same model files, but its report has other timings.
    rerun = {**artifacts, "report": store.put_bytes(b"report with other timings", ".json")}
    second = publish_run(store, export, "run-2", rerun, _manifest("run-2"))
    assert not second.published and second.version == first.version
    assert second.files["report"].sha256 == artifacts["report"].sha256  # what the export holds, verified
    assert len(export.list_named("versions")) == 1


def test_a_new_model_gets_a_new_version_and_keeps_history(store, export):
    publish_run(store, export, "run-1", _artifacts(store, "v1"), _manifest("run-1"))
    second = publish_run(store, export, "run-2", _artifacts(store, "v2"), _manifest("run-2"))
    assert second.published
    assert json.loads(export.read_named("latest.json"))["run_id"] == "run-2"
    assert len(export.list_named("versions")) == 2 and len(export.list_named("history")) == 2


def test_a_corrupt_export_copy_is_a_clear_error(store, export):
    artifacts = _artifacts(store, "v1")
    record = publish_run(store, export, "run-1", artifacts, _manifest("run-1"))
    export.write_named(f"versions/{record.version}/model.tflite", b"tampered")
    with pytest.raises(ExportCorrupted, match="does not match its source.*delete that version folder"):
        publish_run(store, export, "run-1", artifacts, _manifest("run-1"))


def test_a_failed_copy_leaves_the_pointer_where_it_was(store, export, monkeypatch):
    publish_run(store, export, "run-1", _artifacts(store, "v1"), _manifest("run-1"))
    pointer = export.read_named("latest.json")
    original = export.write_named

    def failing_write(key, data, exclusive=False):
        if key.endswith("report.json"):
            raise ConnectionError("network gone")
        return original(key, data, exclusive)

    monkeypatch.setattr(export, "write_named", failing_write)
    with pytest.raises(ConnectionError):
        publish_run(store, export, "run-2", _artifacts(store, "v2"), _manifest("run-2"))
    assert export.read_named("latest.json") == pointer
