"""The store's contract, written once and bound to memory://, a local folder and S3 (moto)."""

from __future__ import annotations

import uuid

import pytest

from ptqflow.storage.store import (
    ArtifactCorrupted,
    ArtifactMissing,
    ArtifactRef,
    ArtifactStore,
    ForeignReference,
    StoreError,
    UnsafeKey,
    sha256_bytes,
)


@pytest.fixture(params=["memory", "local", "s3"])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "memory":
        return ArtifactStore(f"memory://ptqflow-test-{uuid.uuid4().hex}")
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "store"))
    endpoint = request.getfixturevalue("s3_endpoint")
    import s3fs

    options = {"endpoint_url": endpoint}
    bucket = f"bucket-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    return ArtifactStore(f"s3://{bucket}/prefix", storage_options=options)


def _corrupt(store: ArtifactStore, ref: ArtifactRef, data: bytes) -> None:
    path = store.fs._strip_protocol(ref.uri)
    store.fs.pipe_file(path, data)


def test_put_returns_content_addressed_reference(store):
    ref = store.put_bytes(b"hello tensors", ".bin")
    assert ref.sha256 == sha256_bytes(b"hello tensors")
    assert ref.bytes == len(b"hello tensors")
    assert ref.uri.endswith(f"{ref.sha256}.bin")
    assert ref.uri.startswith(store.url)
    assert store.read_bytes(ref) == b"hello tensors"


def test_same_bytes_share_one_blob(store):
    first = store.put_bytes(b"x" * 1000, ".bin")
    second = store.put_bytes(b"x" * 1000, ".bin")
    assert first == second
    blobs = [p for p in store.fs.find(store.root) if not p.endswith("/")]
    assert len(blobs) == 1


def test_reference_round_trips_as_json(store):
    ref = store.put_bytes(b"abc")
    assert ArtifactRef.model_validate_json(ref.model_dump_json()) == ref


def test_missing_blob_is_reported_with_a_fix(store):
    ref = store.put_bytes(b"abc")
    store.fs.rm(store.fs._strip_protocol(ref.uri))
    assert not store.exists(ref)
    with pytest.raises(ArtifactMissing, match="rerun the pipeline"):
        store.read_bytes(ref)
    with pytest.raises(ArtifactMissing):
        store.verify(ref)


def test_flipped_byte_is_detected_on_every_read_path(store):
    data = bytes(range(256)) * 4
    ref = store.put_bytes(data, ".bin")
    flipped = bytearray(data)
    flipped[100] ^= 0xFF
    _corrupt(store, ref, bytes(flipped))
    assert store.exists(ref)  # same size: only the digest can tell
    with pytest.raises(ArtifactCorrupted, match="corrupted"):
        store.read_bytes(ref)
    with pytest.raises(ArtifactCorrupted):
        store.verify(ref)
    with pytest.raises(ArtifactCorrupted):
        with store.open(ref):
            pass


def test_truncated_blob_is_detected(store):
    ref = store.put_bytes(b"0123456789" * 10)
    _corrupt(store, ref, b"0123456789")
    assert not store.exists(ref)
    with pytest.raises(ArtifactCorrupted, match="corrupted"):
        store.read_bytes(ref)


def test_rewriting_a_corrupt_blob_repairs_it(store):
    ref = store.put_bytes(b"payload")
    _corrupt(store, ref, b"PAYLOAD")
    assert store.put_bytes(b"payload") == ref
    assert store.read_bytes(ref) == b"payload"


def test_open_streams_a_verified_blob(store):
    data = b"z" * (3 << 20)
    ref = store.put_bytes(data)
    with store.open(ref) as f:
        assert f.read(10) == b"z" * 10
        f.seek(0)
        assert f.read() == data


def test_reference_from_another_store_is_refused(store, tmp_path):
    other = ArtifactStore(str(tmp_path / "other"))
    ref = other.put_bytes(b"elsewhere")
    with pytest.raises(StoreError, match="not in the store"):
        store.read_bytes(ref)


@pytest.mark.parametrize("tamper", ["/../../outside.txt", "/../../../outside", "x", ".tmp-1", "/sub"])
def test_a_tampered_reference_reaches_nothing_outside_its_blob(store, tamper):
    """A cached reference is data anyone with write access to the store can edit: whatever its URI says, only the
    blob its digest names is read, and nothing is moved or deleted elsewhere."""
    ref = store.put_bytes(b"inside", ".json")
    outside_path = f"{store.root}/outside.txt"
    store.fs.pipe_file(outside_path, b"someone else's file")
    tampered = ArtifactRef(uri=ref.uri.removesuffix(".json") + tamper, sha256=ref.sha256, bytes=ref.bytes)
    for reach in (store.read_bytes, store.verify, store.exists, store.quarantine):
        with pytest.raises(ForeignReference, match="not in the store"):
            reach(tampered)
    assert store.fs.cat_file(outside_path) == b"someone else's file"
    assert store.read_bytes(ref) == b"inside"


def test_json_round_trip(store):
    ref = store.put_json({"b": 1, "a": [1, 2]})
    assert ref.uri.endswith(".json")
    assert store.read_json(ref) == {"a": [1, 2], "b": 1}


def test_local_write_leaves_no_temporary_files(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    for i in range(5):
        store.put_bytes(f"blob {i}".encode())
    leftovers = [p for p in (tmp_path / "store").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_local_store_url_is_absolute_whatever_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = ArtifactStore("./relative-store")
    assert store.url == f"file://{tmp_path}/relative-store"
    ref = store.put_bytes(b"a")
    monkeypatch.chdir("/")
    assert ArtifactStore(f"{tmp_path}/relative-store").read_bytes(ref) == b"a"


# -- named objects: manifests, pointers, cache records -----------------------------------------------------


def test_named_objects_round_trip_and_list(store):
    uri = store.write_named("runs/a.json", b"{}")
    store.write_named("runs/b.json", b"[]")
    assert uri == store.uri_for("runs/a.json")
    assert store.read_named("runs/b.json") == b"[]"
    assert store.list_named("runs") == ["runs/a.json", "runs/b.json"]
    assert store.list_named("nothing-here") == []


def test_exclusive_create_refuses_to_replace(store):
    store.write_named("runs/once.json", b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        store.write_named("runs/once.json", b"second", exclusive=True)
    assert store.read_named("runs/once.json") == b"first"


def test_pointer_replacement_is_whole(store):
    store.write_named("latest.json", b"v1")
    store.write_named("latest.json", b"v2-longer")
    assert store.read_named("latest.json") == b"v2-longer"


def test_missing_named_object_is_reported(store):
    with pytest.raises(ArtifactMissing, match="does not exist"):
        store.read_named("runs/none.json")


def test_quarantine_moves_a_bad_blob_aside(store):
    ref = store.put_bytes(b"good bytes", ".bin")
    _corrupt(store, ref, b"bad! bytes")
    moved = store.quarantine(ref)
    assert moved is not None and "/quarantine/" in moved and not store.exists(ref)
    assert store.fs.cat_file(store.fs._strip_protocol(moved)) == b"bad! bytes"
    assert store.put_bytes(b"good bytes", ".bin") == ref
    store.verify(ref)


@pytest.mark.parametrize(
    "key",
    [
        "../escape",
        "runs/../../etc/passwd",
        "/etc/passwd",
        "runs//x",
        "a b",
        "runs/.hidden",
        "ok/..",
        "",
        "x\x00y",
        "runs/ünï",
        "runs/$(rm -rf)",
        "C:\\windows",
    ],
)
def test_keys_from_user_text_cannot_escape_the_root(store, key):
    with pytest.raises(UnsafeKey, match="cannot be used as a storage key"):
        store.write_named(key, b"x")


def test_urls_with_credentials_are_refused():
    with pytest.raises(StoreError, match="carries credentials") as error:
        ArtifactStore("s3://AKIAEXAMPLE:sEcReT@bucket/prefix")
    assert "sEcReT" not in str(error.value)


def test_storage_options_come_from_the_environment_and_are_never_echoed(monkeypatch, tmp_path):
    monkeypatch.setenv("PTQFLOW_STORAGE_OPTIONS", '{"auto_mkdir": true}')
    assert ArtifactStore(str(tmp_path)).storage_options == {"auto_mkdir": True}
    monkeypatch.setenv("PTQFLOW_STORAGE_OPTIONS", '{"secret": "hunter2"')
    with pytest.raises(StoreError, match="not valid JSON") as error:
        ArtifactStore(str(tmp_path))
    assert "hunter2" not in str(error.value)


def test_a_killed_writers_temporary_file_is_never_listed_and_is_swept_once_stale(tmp_path):
    import os
    import time

    store = ArtifactStore(str(tmp_path / "store"))
    store.write_named("runs/abc.json", b"{}")
    runs = tmp_path / "store" / "runs"
    # What a kill -9 before the rename leaves: <name>.tmp-<uuid4 hex>.
    stale, fresh = runs / f"abd.json.tmp-{'0f' * 16}", runs / f"abe.json.tmp-{'1e' * 16}"
    stale.write_bytes(b"{"), fresh.write_bytes(b"{")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert store.list_named("runs") == ["runs/abc.json"]
    assert store.sweep_temporaries(older_than_seconds=60) == [f"{store.uri_for('runs')}/{stale.name}"]
    assert not stale.exists() and fresh.exists()  # a young one may belong to a live writer
    assert store.read_named("runs/abc.json") == b"{}"


def test_only_ptqflows_own_temporaries_in_its_own_folders_are_swept(tmp_path):
    """A store rooted at a folder that holds other files (a home named by mistake) loses none of them."""
    import os
    import time

    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    others = [home / "report.tmp-draft", home / "notes" / f"a.txt.tmp-{'ab' * 16}", home / "config.tmp-1"]
    store = ArtifactStore(str(home))
    store.write_named("latest.json", b"{}")
    store.write_named("runs/r.json", b"{}")
    own = [home / f"latest.json.tmp-{'cd' * 16}", home / "runs" / f"r.json.tmp-{'ef' * 16}"]
    for path in [*others, *own]:
        path.write_bytes(b"x")
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    assert sorted(store.sweep_temporaries(older_than_seconds=60)) == sorted(store._uri(str(p)) for p in own)
    assert all(p.exists() for p in others) and not any(p.exists() for p in own)


def test_object_stores_have_no_temporaries_to_sweep():
    assert ArtifactStore(f"memory://sweep-{uuid.uuid4().hex}").sweep_temporaries(0) == []


def test_the_folders_swept_are_those_ptqflow_writes():
    """The sweep's list of ptqflow's own places must follow the names the writers use."""
    from ptqflow.storage.results import RESULTS_KEY
    from ptqflow.storage.store import OWN_FOLDERS, OWN_TOP_FILES
    from ptqflow.tasks.release.manifest import RUNS_PREFIX
    from ptqflow.tasks.release.publish import POINTER

    written = {ArtifactStore.BLOB_DIR, ArtifactStore.QUARANTINE_DIR, RESULTS_KEY, RUNS_PREFIX, "versions", "history"}
    assert written == set(OWN_FOLDERS) and set(OWN_TOP_FILES) == {POINTER}


@pytest.mark.parametrize("size", [0, 1, 65_535, 65_536, 65_537, 300_001])
def test_file_bytes_reads_whole_files_local_or_not(tmp_path, size):
    import fsspec

    from ptqflow.storage.store import file_bytes, filesystem_for

    content = bytes(range(256)) * (size // 256) + bytes(size % 256)
    (tmp_path / "f").write_bytes(content)
    local, path = filesystem_for(str(tmp_path / "f"))
    assert file_bytes(local, path) == content
    memory, key = fsspec.filesystem("memory"), f"/ptqflow-test-{uuid.uuid4().hex}"
    memory.pipe(key, content)
    try:
        assert file_bytes(memory, key) == content
    finally:
        memory.rm(key)
