"""Publishing to an export location: versioned, verified, pointer last, idempotent."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest

from ptqflow.storage.store import ArtifactStore
from ptqflow.tasks.publish import EXPORT_FILES, ExportCorrupted, PointerMoved, publish_run


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "store"))


@pytest.fixture(params=["local", "memory", "s3"])
def export(request, tmp_path) -> ArtifactStore:
    if request.param == "memory":
        return ArtifactStore(f"memory://export-{uuid.uuid4().hex}")
    if request.param == "s3":  # moto: conditional PUTs (If-Match, If-None-Match) as S3 has them
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = f"export-{uuid.uuid4().hex[:12]}"
        options = {"endpoint_url": endpoint}
        ArtifactStore(f"s3://{bucket}", storage_options=options).fs.mkdir(bucket)
        return ArtifactStore(f"s3://{bucket}/models", storage_options=options)
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


def test_publishing_a_run_again_restores_a_damaged_copy_of_its_version(store, export):
    artifacts = _artifacts(store, "v1")
    record = publish_run(store, export, "run-1", artifacts, _manifest("run-1"))
    pointer = export.read_named("latest.json")
    export.write_named(f"versions/{record.version}/model.tflite", b"tampered")
    again = publish_run(store, export, "run-1", artifacts, _manifest("run-1"))
    assert not again.published and again.version == record.version
    assert export.read_named(f"versions/{record.version}/model.tflite") == store.read_bytes(artifacts["tflite"])
    assert export.read_named("latest.json") == pointer


def test_a_damaged_copy_of_another_runs_identical_version_is_a_clear_error(store, export):
    artifacts = _artifacts(store, "v1")
    record = publish_run(store, export, "run-1", artifacts, _manifest("run-1"))
    export.write_named(f"versions/{record.version}/model.tflite", b"tampered")
    with pytest.raises(ExportCorrupted, match="does not match its source"):
        publish_run(store, export, "run-2", artifacts, _manifest("run-2"))  # same model files, another run


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


def _fail_once(monkeypatch, export: ArtifactStore, method: str, when) -> None:
    """Make ``export.<method>`` raise a transient error the first time ``when(key)`` holds."""
    original = getattr(export, method)
    failed = []

    def flaky(key, *args, **kwargs):
        if when(key) and not failed:
            failed.append(key)
            raise ConnectionError(f"network gone while writing {key}")
        return original(key, *args, **kwargs)

    monkeypatch.setattr(export, method, flaky)


def _assert_pointer_on_a_complete_verified_version(
    export: ArtifactStore, store: ArtifactStore, artifacts: dict, run_id: str
) -> None:
    latest = json.loads(export.read_named("latest.json"))
    assert latest["run_id"] == run_id
    for name, ref in latest["files"].items():
        data = export.read_named(export.key_of(ref["uri"]))
        assert len(data) == ref["bytes"] and hashlib.sha256(data).hexdigest() == ref["sha256"], name
        if name in artifacts:
            assert data == store.read_bytes(artifacts[name])
    assert json.loads(export.read_named(f"history/{latest['version']}.json")) == latest


@pytest.mark.parametrize(
    ("method", "failing"),
    [
        ("write_named", lambda key: key.endswith("/model.tflite")),  # the first copy
        ("write_named", lambda key: key.endswith("/report.html")),  # the last copy
        ("write_named", lambda key: key.endswith("/manifest.json")),
        ("write_named", lambda key: key.startswith("history/")),
        ("replace_named_if", lambda key: key == "latest.json"),
    ],  # the pointer
    ids=["first-copy", "last-copy", "manifest", "history", "pointer"],
)
def test_a_publish_interrupted_at_any_write_is_finished_by_the_retry(store, export, monkeypatch, method, failing):
    publish_run(store, export, "run-1", _artifacts(store, "v1"), _manifest("run-1"))
    artifacts = _artifacts(store, "v2")
    with monkeypatch.context() as patched:
        _fail_once(patched, export, method, failing)
        with pytest.raises(ConnectionError):
            publish_run(store, export, "run-2", artifacts, _manifest("run-2"), compared_with=_version_of(export))
        assert json.loads(export.read_named("latest.json"))["run_id"] == "run-1"  # devices still see a whole version
    champion = json.loads(export.read_named("latest.json"))["version"]
    record = publish_run(store, export, "run-2", artifacts, _manifest("run-2"), compared_with=champion)
    assert record.published
    _assert_pointer_on_a_complete_verified_version(export, store, artifacts, "run-2")
    assert len([k for k in export.list_named("versions")]) == 2  # the retry finished the same folder


def _version_of(export: ArtifactStore) -> str:
    return json.loads(export.read_named("latest.json"))["version"]


def test_of_two_runs_compared_with_the_same_champion_only_the_first_publishes(store, export):
    publish_run(store, export, "run-1", _artifacts(store, "v1"), _manifest("run-1"))
    champion = _version_of(export)
    first = publish_run(store, export, "run-2", _artifacts(store, "v2"), _manifest("run-2"), compared_with=champion)
    with pytest.raises(PointerMoved, match=f"now names {first.version}, not {champion}.*another run published first"):
        publish_run(store, export, "run-3", _artifacts(store, "v3"), _manifest("run-3"), compared_with=champion)
    assert _version_of(export) == first.version
    assert [k.rsplit("/", 1)[-1] for k in export.list_named("history")] == [f"{champion}.json", f"{first.version}.json"]


def test_a_writer_that_moves_the_pointer_during_a_publish_makes_it_lose(store, export, monkeypatch):
    """No shared lock (another host, no Prefect server): the pointer write is conditional on what was read."""
    publish_run(store, export, "run-1", _artifacts(store, "v1"), _manifest("run-1"))
    champion = _version_of(export)
    other_writer = ArtifactStore(export.url, storage_options=export.storage_options)
    original = export.write_named

    def history_then_race(key, data, exclusive=False):
        result = original(key, data, exclusive)
        if key.startswith("history/") and key.endswith("-run-3.json"):  # just before run-3 moves the pointer
            publish_run(
                store, other_writer, "run-2", _artifacts(store, "v2"), _manifest("run-2"), compared_with=champion
            )
        return result

    monkeypatch.setattr(export, "write_named", history_then_race)
    with pytest.raises(PointerMoved, match="replaced by another writer meanwhile"):
        publish_run(store, export, "run-3", _artifacts(store, "v3"), _manifest("run-3"), compared_with=champion)
    assert json.loads(export.read_named("latest.json"))["run_id"] == "run-2"  # exactly one pointer write won
    # history/ records the pointers that took effect, and only those.
    assert [json.loads(export.read_named(k))["run_id"] for k in export.list_named("history")] == ["run-1", "run-2"]


def test_a_promote_racing_another_writer_changes_nothing(store, export, monkeypatch):
    from ptqflow.tasks.promotion import point_latest_to

    first = publish_run(store, export, "run-1", _artifacts(store, "v1"), _manifest("run-1"))
    second = publish_run(
        store, export, "run-2", _artifacts(store, "v2"), _manifest("run-2"), compared_with=first.version
    )
    other_writer = ArtifactStore(export.url, storage_options=export.storage_options)
    original = export.write_named

    def history_then_race(key, data, exclusive=False):
        result = original(key, data, exclusive)
        if "-promote-" in key:
            publish_run(
                store, other_writer, "run-3", _artifacts(store, "v3"), _manifest("run-3"), compared_with=second.version
            )
        return result

    monkeypatch.setattr(export, "write_named", history_then_race)
    with pytest.raises(PointerMoved, match="nothing was changed"):
        point_latest_to(export, first.version, "promote")
    assert json.loads(export.read_named("latest.json"))["run_id"] == "run-3"
    assert not [k for k in export.list_named("history") if "-promote-" in k]
