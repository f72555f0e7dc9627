"""Export targets (tasks.release.targets): publish, read the pointer, move it only from what was read, and
follow another target. The export folder is checked here; MLflow's registry, on a real server, in
tests/flows/test_mlflow_registry.py."""

from __future__ import annotations

import functools
import uuid

import pytest

from ptqflow.storage.store import ArtifactStore
from ptqflow.tasks.release.documents import RunManifest
from ptqflow.tasks.release.publish import EXPORT_FILES, FolderExport, read_exported
from ptqflow.tasks.release.targets import PointerMoved, Release, follow


@pytest.fixture
def store() -> ArtifactStore:
    return ArtifactStore(f"memory://targets-{uuid.uuid4().hex}/store")


def folder(name: str) -> FolderExport:
    return FolderExport(ArtifactStore(f"memory://targets-{uuid.uuid4().hex}/{name}"))


def release(store: ArtifactStore, run_id: str) -> Release:
    files = {label: store.put_bytes(f"{label} of {run_id}".encode(), ".bin") for label in EXPORT_FILES}
    manifest = RunManifest(run_id=run_id, status="passed", created_at="2026-12-01T00:00:00+00:00")
    return Release(run_id=run_id, files=files, read=store.read_bytes, manifest=manifest)


def test_publishing_verifies_the_files_and_moves_nothing_until_asked(store):
    export = folder("export")
    pointer = export.publish(release(store, "run-1"))
    assert export.read_pointer() is None, "publishing alone names no champion"
    for ref in pointer.files.values():
        assert ref.uri.startswith(f"versions/{pointer.version}/")
        assert read_exported(export.export, ref)  # verified against its sha256 and size
    assert "manifest" in pointer.files
    export.move_pointer(pointer, replacing=None)
    assert export.read_pointer() == pointer
    assert export.export.exists_named(f"history/{pointer.version}.json")


def test_the_pointer_moves_only_from_the_champion_the_caller_read(store):
    export = folder("export")
    first = export.publish(release(store, "run-1"))
    export.move_pointer(first, replacing=None)
    second = export.publish(release(store, "run-2"))
    with pytest.raises(PointerMoved, match="now names .*run-1, not nothing"):
        export.move_pointer(second, replacing=None)  # read before run-1 became the champion: a stale view
    assert export.read_pointer() == first
    export.move_pointer(second, replacing=first)
    assert export.read_pointer() == second


def test_a_follower_publishes_the_leaders_champion_from_its_files_and_points_to_it(store):
    leader, mirror = folder("leader"), folder("mirror")
    published = leader.publish(release(store, "run-1"))
    leader.move_pointer(published, replacing=None)
    champion = leader.read_pointer()
    assert champion is not None
    read_from_leader = functools.partial(read_exported, leader.export)
    followed = follow(Release(champion.run_id, champion.files, read_from_leader, version=champion.version), mirror)
    assert mirror.read_pointer() == followed and followed.version == champion.version
    for label, ref in followed.files.items():
        assert read_exported(mirror.export, ref) == read_exported(leader.export, champion.files[label])
    history = mirror.export.list_named("history")
    follow(Release(champion.run_id, champion.files, read_from_leader, version=champion.version), mirror)
    assert mirror.export.list_named("history") == history, "following again moves nothing"
