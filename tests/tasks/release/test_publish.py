"""Publishing to an export location: versioned, verified, pointer last, idempotent."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest

from ptqflow.storage.store import ArtifactStore
from ptqflow.tasks.release.documents import RunManifest
from ptqflow.tasks.release.publish import EXPORT_FILES, ExportCorrupted, publish_run
from ptqflow.tasks.release.targets import PointerMoved


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


def _manifest(run_id: str) -> RunManifest:
    return RunManifest(run_id=run_id, status="passed", created_at="2026-11-26T02:00:00+00:00")


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
        assert ref["uri"].startswith(f"versions/{latest['version']}/")  # relative: a copied export stays whole
        data = export.read_named(ref["uri"])
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
        ("replace_named_if", lambda key: key == "latest.json"),
    ],  # the pointer
    ids=["first-copy", "last-copy", "manifest", "pointer"],
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


def test_a_pointer_moved_but_not_recorded_is_recorded_by_the_next_reader(store, export, monkeypatch):
    """Killed (here: the write fails) between moving latest.json and recording it in history/: the move stands,
    and the next command that reads the export records it, so rollback still sees it as live."""
    publish_run(store, export, "run-1", _artifacts(store, "v1"), _manifest("run-1"))
    artifacts = _artifacts(store, "v2")
    with monkeypatch.context() as patched:
        _fail_once(patched, export, "write_named", lambda key: key.startswith("history/"))
        record = publish_run(store, export, "run-2", artifacts, _manifest("run-2"), compared_with=_version_of(export))
    assert record.published and not export.exists_named(f"history/{record.version}.json")
    from ptqflow.tasks.release.promotion import read_pointer

    assert read_pointer(export).run_id == "run-2"
    _assert_pointer_on_a_complete_verified_version(export, store, artifacts, "run-2")


def test_a_writer_that_moves_the_pointer_during_a_publish_makes_it_lose(store, export, monkeypatch):
    """No shared lock (another host, no Prefect server): the pointer write is conditional on what was read."""
    publish_run(store, export, "run-1", _artifacts(store, "v1"), _manifest("run-1"))
    champion = _version_of(export)
    other_writer = ArtifactStore(export.url, storage_options=export.storage_options)
    original = export.replace_named_if

    def race_then_move(key, data, expected):  # another writer publishes just before run-3 moves the pointer
        if b'"run-3"' in data:
            publish_run(
                store, other_writer, "run-2", _artifacts(store, "v2"), _manifest("run-2"), compared_with=champion
            )
        return original(key, data, expected)

    monkeypatch.setattr(export, "replace_named_if", race_then_move)
    with pytest.raises(PointerMoved, match="replaced by another writer meanwhile"):
        publish_run(store, export, "run-3", _artifacts(store, "v3"), _manifest("run-3"), compared_with=champion)
    assert json.loads(export.read_named("latest.json"))["run_id"] == "run-2"  # exactly one pointer write won
    # history/ records the pointers that took effect, and only those.
    assert [json.loads(export.read_named(k))["run_id"] for k in export.list_named("history")] == ["run-1", "run-2"]


def test_a_promote_racing_another_writer_changes_nothing(store, export, monkeypatch):
    from ptqflow.tasks.release.promotion import point_latest_to

    first = publish_run(store, export, "run-1", _artifacts(store, "v1"), _manifest("run-1"))
    second = publish_run(
        store, export, "run-2", _artifacts(store, "v2"), _manifest("run-2"), compared_with=first.version
    )
    other_writer = ArtifactStore(export.url, storage_options=export.storage_options)
    original = export.replace_named_if

    def race_then_move(key, data, expected):  # another writer publishes just before the promote moves the pointer
        if b'"promote"' in data:
            publish_run(
                store, other_writer, "run-3", _artifacts(store, "v3"), _manifest("run-3"), compared_with=second.version
            )
        return original(key, data, expected)

    monkeypatch.setattr(export, "replace_named_if", race_then_move)
    with pytest.raises(PointerMoved, match="nothing was changed"):
        point_latest_to(export, first.version, "promote")
    assert json.loads(export.read_named("latest.json"))["run_id"] == "run-3"
    assert not [k for k in export.list_named("history") if "-promote-" in k]


def test_rollback_never_lands_on_a_version_that_was_never_live(store, export, monkeypatch):
    """A publish killed after its copies and before latest.json moved leaves a complete folder that no device ever
    saw: rollback must pass over it to the version that was live before."""
    from ptqflow.tasks.release.promotion import rollback

    first = publish_run(store, export, "run-1", _artifacts(store, "v1"), _manifest("run-1"))
    with monkeypatch.context() as patched:
        _fail_once(patched, export, "replace_named_if", lambda key: key == "latest.json")
        with pytest.raises(ConnectionError):  # the kill: latest.json never moves to run-2
            publish_run(
                store, export, "run-2", _artifacts(store, "v2"), _manifest("run-2"), compared_with=first.version
            )
    third = publish_run(
        store, export, "run-3", _artifacts(store, "v3"), _manifest("run-3"), compared_with=first.version
    )
    assert len(export.list_named("versions")) == 3
    move = rollback(export)
    assert (move.version, move.previous_version) == (first.version, third.version)


def test_a_publish_the_storage_refuses_removes_its_version_folder_and_names_the_export(store, export, monkeypatch):
    import errno

    from ptqflow.storage.errors import ExportRefused

    first = publish_run(store, export, "run-1", _artifacts(store, "v1"), _manifest("run-1"))
    original = export.write_named

    def full(key, data, exclusive=False):
        if key.endswith("/report.html"):  # the disk fills up at the last copy
            raise OSError(errno.ENOSPC, "No space left on device", export.path_for(key))
        return original(key, data, exclusive)

    monkeypatch.setattr(export, "write_named", full)
    with pytest.raises(ExportRefused, match="nothing was published: the storage is full at .*point --export") as error:
        publish_run(store, export, "run-2", _artifacts(store, "v2"), _manifest("run-2"), compared_with=first.version)
    assert "--store" not in str(error.value)
    assert [key.rsplit("/", 1)[-1] for key in export.list_named("versions")] == [first.version]
    assert _version_of(export) == first.version


def test_a_copied_export_is_whole_its_pointers_name_files_relative_to_it(store, tmp_path):
    import shutil

    from ptqflow.tasks.release.promotion import champion_model, read_pointer, rollback

    origin = ArtifactStore(str(tmp_path / "origin"))
    first = publish_run(store, origin, "run-1", _artifacts(store, "v1"), _manifest("run-1"))
    publish_run(store, origin, "run-2", _artifacts(store, "v2"), _manifest("run-2"), compared_with=first.version)
    shutil.copytree(tmp_path / "origin", tmp_path / "replica")
    shutil.rmtree(tmp_path / "origin")
    replica = ArtifactStore(str(tmp_path / "replica"))
    assert champion_model(replica, read_pointer(replica)) == store.read_bytes(_artifacts(store, "v2")["tflite"])
    assert rollback(replica).version == first.version


def test_a_damaged_latest_json_is_named_by_rollback_and_repaired_by_promote(store, export):
    from ptqflow.tasks.release.promotion import point_latest_to, read_pointer, rollback
    from ptqflow.tasks.release.publish import MalformedRecord

    first = publish_run(store, export, "run-1", _artifacts(store, "v1"), _manifest("run-1"))
    export.write_named("latest.json", b'{"kind": "ptqflow.export_pointer", "version": ')
    with pytest.raises(MalformedRecord, match="latest.json is not a ptqflow export pointer"):
        rollback(export)
    point_latest_to(export, first.version, "promote")  # the command that repairs it
    assert read_pointer(export).version == first.version


def test_a_damaged_history_entry_is_passed_over_by_rollback(store, export):
    from ptqflow.tasks.release.promotion import rollback

    first = publish_run(store, export, "run-1", _artifacts(store, "v1"), _manifest("run-1"))
    second = publish_run(
        store, export, "run-2", _artifacts(store, "v2"), _manifest("run-2"), compared_with=first.version
    )
    publish_run(store, export, "run-3", _artifacts(store, "v3"), _manifest("run-3"), compared_with=second.version)
    export.write_named(f"history/{second.version}.json", b"[1, 2")
    assert rollback(export).version == first.version


def test_a_reader_that_may_not_write_still_reads_an_unrecorded_pointer(store, export, monkeypatch):
    from ptqflow.tasks.release.promotion import read_pointer

    record = publish_run(store, export, "run-1", _artifacts(store, "v1"), _manifest("run-1"))
    export.delete_named(f"history/{record.version}.json")  # killed before it was recorded

    def refused(key, data, exclusive=False):
        raise PermissionError(13, "Permission denied", key)

    monkeypatch.setattr(export, "write_named", refused)  # a read-only mirror's credentials
    assert read_pointer(export).version == record.version
    monkeypatch.undo()
    assert read_pointer(export).version == record.version and export.exists_named(f"history/{record.version}.json")
