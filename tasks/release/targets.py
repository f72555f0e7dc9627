"""Export targets: where a passing run's model is released, and which version is the champion there.

Each target does three things, as a model registry does in ZenML: ``publish`` a version (its files, verified),
``read_pointer`` (the champion: the version its users take now) and ``move_pointer`` (make a published version
the champion, only if the champion is still the one the caller read). Two implement it: the export folder devices
read (``tasks.release.publish.FolderExport``: ``versions/``, ``latest.json``, ``history/``) and MLflow's model
registry (``flows.registry.MlflowRegistry``: registered model versions and the ``champion`` alias).

The folder is the truth, since it is what devices read; a registry follows it (``follow``): it publishes the
version the folder's pointer names, from the folder's own files, and moves its own pointer there. A new kind of
target (another registry, a device fleet's store) implements the same three methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from ptqflow.storage.store import ArtifactRef
from ptqflow.tasks.release.documents import ExportPointer, RunManifest, same_version


class PointerMoved(Exception):
    """The target's champion is no longer the one the caller read: another writer moved it first. Not a
    StoreError: the store is fine and the input was valid; this command lost a race and says so."""


@dataclass(frozen=True)
class Release:
    """A version to publish: the run it comes from, its files by label (``tflite``, ``model``, ``report``, ...)
    and where their bytes are read from (the store for a run; the folder for a registry that follows it)."""

    run_id: str
    files: Mapping[str, ArtifactRef]
    read: Callable[[ArtifactRef], bytes]
    manifest: RunManifest | None = None
    version: str | None = None  # the version's name where it was published first (a follower keeps it)


class ExportTarget(Protocol):
    def read_pointer(self) -> ExportPointer | None:
        """The champion: the version this target's users take now; None when it has none."""
        ...

    def publish(self, release: Release) -> ExportPointer:
        """Make ``release`` a version of this target, every file verified; the champion does not move. Publishing
        a version the target holds already verifies (and repairs) it. Returns the pointer that would name it."""
        ...

    def move_pointer(self, pointer: ExportPointer, replacing: ExportPointer | None) -> None:
        """Make the version ``pointer`` names the champion, if the champion is still ``replacing``.

        Raises:
            PointerMoved: another writer moved the champion since ``replacing`` was read; nothing changed.
        """
        ...


def follow(champion: Release, follower: ExportTarget) -> ExportPointer:
    """Make ``champion`` (the leader's champion, as a release of its own files) the champion of ``follower``:
    published there if it lacks it, then its pointer moved to it unless it names it already. Returns the
    follower's pointer to it."""
    current = follower.read_pointer()
    published = follower.publish(champion)
    if not same_version(current, published):
        follower.move_pointer(published, replacing=current)
    return published
