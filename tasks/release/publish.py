"""Publishing a passing run to an export location (any fsspec URL) for devices to pick up.

Layout under the export URL::

    versions/<UTC time>-<run id>/model.tflite, model_float.tflite, model.keras, calibration.parquet,
                                 report.json, manifest.json (and seen_rows.parquet for given splits)
    latest.json                  the pointer: which version is current, with every file's path and sha256
    history/<UTC time>-<run id>.json   every pointer that was live, oldest first by name

Every file is read back and checked against its sha256 before ``latest.json`` moves, and ``latest.json`` is
replaced atomically, so a device never sees a pointer to a partial version. A pointer names its files by their
paths relative to the export (``versions/.../model.tflite``), so a copied or replicated export stays whole. A
pointer enters ``history/`` only once ``latest.json`` holds it: what ``history/`` lists was live, and ``rollback``
goes only there (a publish killed between the two is completed by the next command that reads the export).
Publishing the same run again finds its verified version and changes nothing; so does a run whose model files are
byte for byte the current version's (a nightly run on unchanged data), whatever its report says. A publish that
fails while copying removes the version folder it started.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from pydantic import BaseModel, ValidationError

from ptqflow.storage.errors import ExportRefused, refused_by_storage
from ptqflow.storage.store import (
    EXPORT_OPTIONS_ENV,
    ArtifactMissing,
    ArtifactRef,
    ArtifactStore,
    ConcurrentUpdate,
    StoreError,
    safe_key,
    sha256_bytes,
)
from ptqflow.tasks.release.documents import ExportLocation, ExportPointer, RunManifest, first_problem
from ptqflow.tasks.release.firmware import DEVICE_EXPORT_FILES
from ptqflow.tasks.release.targets import ExportTarget, PointerMoved, Release

EXPORT_FILES = {
    "tflite": "model.tflite",
    "tflite_float": "model_float.tflite",
    "model": "model.keras",
    "calibration": "calibration.parquet",
    "report": "report.json",
    "report_md": "report.md",
    "report_html": "report.html",
}
# Exported when a run has them: the digests of the rows a model trained on, when its splits were the source's own
# (a later run's champion check reads them; see tasks.release.promotion.rows_unseen_by).
# And the device files of its targets (--target): model_data.cc/.h for TFLM, a _vela.tflite per Ethos-U.
OPTIONAL_EXPORT_FILES = {"seen_rows": "seen_rows.parquet", **DEVICE_EXPORT_FILES}


def export_file_name(name: str, ref: ArtifactRef) -> str:
    """The file an artifact is exported as: the float model keeps its format (a packed SavedModel is a zip)."""
    if name == "model" and ref.uri.endswith(".zip"):
        return "model.savedmodel.zip"
    return EXPORT_FILES.get(name) or OPTIONAL_EXPORT_FILES[name]


# What devices and users load. A run whose files these are, byte for byte, is the current version even when its
# report differs (the report records timings, so two runs of one model never give the same report).
MODEL_FILES = ("tflite", "tflite_float", "model", "calibration")
MANIFEST_FILE = "manifest.json"
POINTER = "latest.json"


class ExportCorrupted(StoreError):
    pass


class MalformedRecord(StoreError):
    """A pointer or history entry that is not what ptqflow writes (damaged, or written by someone else)."""


class ExportRecord(BaseModel):
    url: str
    version: str
    pointer: str
    files: dict[str, ArtifactRef]
    published: bool  # False when the run was already published (a no-op)


def parse_pointer(raw: bytes, where: str) -> ExportPointer:
    """A pointer (``latest.json`` or a ``history/`` entry), checked to be one.

    Raises:
        MalformedRecord: naming ``where`` and what is wrong.
    """
    try:
        return ExportPointer.model_validate_json(raw)
    except ValidationError as error:
        raise MalformedRecord(f"{where} is not a ptqflow export pointer ({first_problem(error, 160)})") from None


def export_store(url: str) -> ArtifactStore:
    return ArtifactStore(url, options_env=EXPORT_OPTIONS_ENV)


def exported_key(export: ArtifactStore, uri: str) -> str:
    """The key under ``export`` of a file a pointer names: a path relative to the export (what ptqflow writes), or
    a full URI written by an older ptqflow, here or where the export was copied from (its ``versions/...`` part)."""
    if "://" not in uri and not uri.startswith("/"):
        return safe_key(uri)
    try:
        return export.key_of(uri)
    except StoreError:
        if "/versions/" not in uri:
            raise
        return safe_key("versions/" + uri.rsplit("/versions/", 1)[1])


def read_verified(export: ArtifactStore, key: str, sha256: str, size: int) -> bytes:
    """An exported file's bytes, checked against the sha256 and size recorded for it."""
    data = export.read_named(key)
    if len(data) != size or sha256_bytes(data) != sha256:
        raise ExportCorrupted(
            f"export copy {export.uri_for(key)} does not match its source (sha256 {sha256_bytes(data)[:12]}, "
            f"{len(data)} bytes; expected {sha256[:12]}, {size} bytes): delete that version folder and publish again"
        )
    return data


def read_exported(export: ArtifactStore, ref: ArtifactRef) -> bytes:
    """The bytes of a file a pointer names, checked against its recorded sha256 and size."""
    return read_verified(export, exported_key(export, ref.uri), ref.sha256, ref.bytes)


def verify_copy(export: ArtifactStore, key: str, sha256: str, size: int) -> ArtifactRef:
    read_verified(export, key, sha256, size)
    return ArtifactRef(uri=export.uri_for(key), sha256=sha256, bytes=size)


def pointer_files(files: dict[str, ArtifactRef], export: ArtifactStore) -> dict[str, ArtifactRef]:
    """A version's files as a pointer names them: by their paths relative to the export."""
    return {name: ref.model_copy(update={"uri": exported_key(export, ref.uri)}) for name, ref in files.items()}


def current_pointer(export: ArtifactStore) -> tuple[ExportPointer | None, bytes | None]:
    """``latest.json`` parsed and as bytes (what a conditional replace compares against); a damaged one is
    (None, its bytes): it names nothing to follow, and whoever replaces it repairs it.

    Its ``history/`` entry is written first if a command was killed between moving the pointer and recording it,
    so that ``history/`` lists every pointer that was live."""
    if not export.exists_named(POINTER):
        return None, None
    raw = export.read_named(POINTER)
    try:
        pointer = parse_pointer(raw, export.uri_for(POINTER))
    except MalformedRecord:
        return None, raw
    record_in_history(export, pointer, raw)
    return pointer, raw


def history_key_of(pointer: ExportPointer) -> str | None:
    """Where a pointer is recorded in ``history/``: named in it (since it moved there), or, for a publish's
    pointer from before, ``history/<version>.json``."""
    if pointer.history is not None:
        return safe_key(pointer.history)
    return None if pointer.action else safe_key(f"history/{pointer.version}.json")


def record_in_history(export: ArtifactStore, pointer: ExportPointer, raw: bytes) -> None:
    """Record a live pointer in ``history/`` if it is not yet. Best effort: a reader that may not write (a
    read-only mirror) still reads, and the next command that may write records it."""
    key = history_key_of(pointer)
    if key is None or export.exists_named(key):
        return
    try:
        export.write_named(key, raw, exclusive=True)
    except FileExistsError:
        pass  # another command recorded it meanwhile
    except Exception as error:
        logging.getLogger(__name__).warning("%s could not be recorded as %s (%s)", POINTER, key, error)


def move_pointer(export: ArtifactStore, pointer: bytes, history_key: str, previous: bytes | None) -> None:
    """Replace ``latest.json`` with ``pointer`` if it still holds ``previous``, then record it in ``history/``.

    Raises:
        ConcurrentUpdate: another writer moved ``latest.json`` first; nothing was changed.
    """
    export.replace_named_if(POINTER, pointer, sha256_bytes(previous) if previous is not None else None)
    try:
        export.write_named(history_key, pointer, exclusive=True)
    except FileExistsError:
        pass  # recorded already: a pointer to this version published before (rollback, then publish again)
    except Exception as error:  # the pointer moved: the move stands, and the next reader records it
        logging.getLogger(__name__).warning(
            "%s moved, but recording it as %s failed (%s): the next command that reads the export records it",
            export.uri_for(POINTER),
            history_key,
            error,
        )


def _run_version(export: ArtifactStore, run_id: str) -> str | None:
    """The version folder of ``run_id``, complete or left by an interrupted publish."""
    return next((key.rsplit("/", 1)[-1] for key in export.list_named("versions") if key.endswith(f"-{run_id}")), None)


def _copy_verified(
    read: Callable[[ArtifactRef], bytes], export: ArtifactStore, key: str, ref: ArtifactRef
) -> ArtifactRef:
    """The export's copy of ``ref`` at ``key``: kept when it verifies, (re)written from ``read`` (the store) when
    it is missing or does not match (an interrupted or damaged earlier publish), then verified."""
    try:
        return verify_copy(export, key, ref.sha256, ref.bytes)
    except (ExportCorrupted, ArtifactMissing):
        export.write_named(key, read(ref))
        return verify_copy(export, key, ref.sha256, ref.bytes)


def remove_version_folder(export: ArtifactStore, version: str) -> None:
    """Remove a version folder no pointer names (a publish that failed while copying); best effort: a folder
    that stays is never listed by ``history/`` and is finished by the next publish of its run."""
    folder = export.path_for(f"versions/{version}")
    try:
        export.fs.rm(folder, recursive=True)
    except (OSError, ValueError):
        pass


@dataclass(frozen=True)
class FolderExport:
    """The export folder devices read (``--export URL``) as an export target (``tasks.release.targets``):
    ``versions/<version>/`` holds each version's files and manifest, ``latest.json`` names the champion, and
    ``history/`` every pointer that was live."""

    export: ArtifactStore

    def read_pointer(self) -> ExportPointer | None:
        """``latest.json``; None when there is none or it is damaged (it names nothing to follow)."""
        return current_pointer(self.export)[0]

    def publish(self, release: Release) -> ExportPointer:
        """Copy and verify the release's files and manifest into its version folder (a run's own folder, if an
        earlier publish started it, is finished: what verifies stays, what is missing or wrong is copied again).

        Raises:
            ExportRefused: the storage refused a write; the folder this publish started is removed.
            ExportCorrupted: a copy does not match its source after writing it.
        """
        own_version = _run_version(self.export, release.run_id)
        now = datetime.now(timezone.utc)
        version = release.version or own_version or safe_key(f"{now:%Y%m%dT%H%M%SZ}-{release.run_id}")
        files = self._copy_version(release, version, started_here=own_version is None and release.version is None)
        return ExportPointer(
            version=version,
            run_id=release.run_id,
            published_at=now.isoformat(timespec="seconds"),
            history=f"history/{version}.json",
            files=pointer_files(files, self.export),
        )

    def move_pointer(self, pointer: ExportPointer, replacing: ExportPointer | None) -> None:
        """Replace ``latest.json`` with ``pointer`` by a conditional write, if it still names ``replacing`` (None:
        none, or a damaged one, which this repairs), then record it in ``history/``.

        Raises:
            PointerMoved: another writer moved ``latest.json`` first; nothing was changed.
        """
        current, raw = current_pointer(self.export)
        if current != replacing:
            raise PointerMoved(
                f"{self.export.uri_for(POINTER)} now names {current.version if current else 'nothing'}, not "
                f"{replacing.version if replacing else 'nothing'}"
            )
        history = pointer.history or f"history/{pointer.version}.json"
        try:
            move_pointer(self.export, pointer.to_bytes(), safe_key(history), raw)
        except ConcurrentUpdate as error:
            raise PointerMoved(str(error)) from None

    def _copy_version(self, release: Release, version: str, started_here: bool) -> dict[str, ArtifactRef]:
        """The version folder's files (full URIs), each copied if needed and verified, with the manifest."""
        export, folder = self.export, f"versions/{version}"
        try:
            files = {
                name: _copy_verified(
                    release.read, export, f"{folder}/{export_file_name(name, release.files[name])}", release.files[name]
                )
                for name in [*EXPORT_FILES, *(n for n in OPTIONAL_EXPORT_FILES if n in release.files)]
            }
            manifest_key = f"{folder}/{MANIFEST_FILE}"
            if release.manifest is not None and not export.exists_named(manifest_key):
                # An interrupted publish may have written it already: writes are whole.
                location = ExportLocation(url=export.url, version=version, pointer=export.uri_for(POINTER))
                export.write_named(manifest_key, release.manifest.model_copy(update={"export": location}).to_bytes())
            if export.exists_named(manifest_key):
                manifest_bytes = export.read_named(manifest_key)
                files["manifest"] = verify_copy(export, manifest_key, sha256_bytes(manifest_bytes), len(manifest_bytes))
        except BaseException as error:
            if started_here:  # a folder this publish started, which nothing names
                remove_version_folder(export, version)
            refusal = refused_by_storage(error, "--export")
            if refusal:
                raise ExportRefused(
                    f"nothing was published: {refusal}; the run's stages are reused on the rerun"
                ) from None
            raise
        return files


def publish_run(
    store: ArtifactStore,
    export: ArtifactStore,
    run_id: str,
    artifacts: dict[str, ArtifactRef],
    manifest: RunManifest,
    compared_with: str | None | bool = True,
) -> ExportRecord:
    """Publish a run to the export folder and make it the champion: copy its artifacts and manifest to its version
    folder, verify every copy, then move ``latest.json`` to it and record it in ``history/``.

    Resumable: after a failure at any write, calling it again keeps what verifies, copies what is missing or
    wrong (restoring the recorded bytes), and finishes. ``published=False`` when ``latest.json`` already names the
    run's version (its copies verified all the same), or another run's whose model files are byte for byte the
    run's (a rerun on unchanged data).

    Args:
        compared_with: the version ``latest.json`` named when the run was compared with it (None: there was
            none). ``latest.json`` is replaced only if it still names that version, by a conditional write; True
            skips that check (a `promote` by hand), the write is still conditional on what was read here.

    Raises:
        PointerMoved: another writer moved ``latest.json`` since the comparison or during this publish.
        ExportCorrupted: a copy does not match its source after writing it.
    """
    target: ExportTarget = FolderExport(export)  # mypy holds the folder to the protocol here
    latest = target.read_pointer()
    current_version = latest.version if latest else None
    own_version = _run_version(export, run_id)
    if (
        latest
        and current_version != own_version
        and all(name in latest.files and latest.files[name].sha256 == artifacts[name].sha256 for name in MODEL_FILES)
    ):
        # Another run's model, byte for byte (a rerun on unchanged data): the devices already have these bytes.
        files = {
            name: verify_copy(export, exported_key(export, ref.uri), ref.sha256, ref.bytes)
            for name, ref in latest.files.items()
        }
        return ExportRecord(
            url=export.url, version=latest.version, pointer=export.uri_for(POINTER), files=files, published=False
        )
    if compared_with is not True and current_version not in (compared_with, own_version):
        raise PointerMoved(
            f"{export.uri_for(POINTER)} now names {current_version or 'nothing'}, not {compared_with or 'nothing'}, "
            "which this run was compared with: another run published first"
        )
    pointer = target.publish(Release(run_id=run_id, files=artifacts, read=store.read_bytes, manifest=manifest))
    files = {name: ref.model_copy(update={"uri": export.uri_for(ref.uri)}) for name, ref in pointer.files.items()}
    record = ExportRecord(
        url=export.url, version=pointer.version, pointer=export.uri_for(POINTER), files=files, published=False
    )
    if current_version == pointer.version:  # already current: its copies are now verified (and repaired)
        return record
    try:
        target.move_pointer(pointer, replacing=latest)
    except PointerMoved as error:
        raise PointerMoved(f"{error}: another run published during this one") from None
    return record.model_copy(update={"published": True})
