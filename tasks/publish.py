"""Publishing a passing run to an export location (any fsspec URL) for devices to pick up.

Layout under the export URL::

    versions/<UTC time>-<run id>/model.tflite, model_float.tflite, model.keras, calibration.parquet,
                                 report.json, manifest.json (and seen_rows.parquet for given splits)
    latest.json                  the pointer: which version is current, with every file's sha256
    history/<UTC time>-<run id>.json   every pointer ever written, oldest first by name

Every file is read back and checked against its sha256 before ``latest.json`` moves, and ``latest.json`` is
replaced atomically, so a device never sees a pointer to a partial version. Publishing the same run again finds
its verified version and changes nothing; so does a run whose model files are byte for byte the current
version's (a nightly run on unchanged data), whatever its report says.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

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
# (a later run's champion check reads them; see tasks.promotion.rows_unseen_by).
OPTIONAL_EXPORT_FILES = {"seen_rows": "seen_rows.parquet"}


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


class ExportRecord(BaseModel):
    url: str
    version: str
    pointer: str
    files: dict[str, ArtifactRef]
    published: bool  # False when the run was already published (a no-op)


def export_store(url: str) -> ArtifactStore:
    return ArtifactStore(url, options_env=EXPORT_OPTIONS_ENV)


def read_verified(export: ArtifactStore, key: str, sha256: str, size: int) -> bytes:
    """An exported file's bytes, checked against the sha256 and size recorded for it."""
    data = export.read_named(key)
    if len(data) != size or sha256_bytes(data) != sha256:
        raise ExportCorrupted(
            f"export copy {export.uri_for(key)} does not match its source (sha256 {sha256_bytes(data)[:12]}, "
            f"{len(data)} bytes; expected {sha256[:12]}, {size} bytes): delete that version folder and publish again"
        )
    return data


def verify_copy(export: ArtifactStore, key: str, sha256: str, size: int) -> ArtifactRef:
    read_verified(export, key, sha256, size)
    return ArtifactRef(uri=export.uri_for(key), sha256=sha256, bytes=size)


class PointerMoved(Exception):
    """``latest.json`` no longer names the version this run was compared with: another writer published first.
    Not a StoreError: the store is fine and the input was valid; this run lost a race and says so."""


def _current_pointer(export: ArtifactStore) -> tuple[dict[str, Any] | None, str | None]:
    """``latest.json`` and the sha256 of its bytes (what a conditional replace compares against)."""
    if not export.exists_named(POINTER):
        return None, None
    raw = export.read_named(POINTER)
    return json.loads(raw), sha256_bytes(raw)


def _run_version(export: ArtifactStore, run_id: str) -> str | None:
    """The version folder of ``run_id``, complete or left by an interrupted publish."""
    return next((key.rsplit("/", 1)[-1] for key in export.list_named("versions") if key.endswith(f"-{run_id}")), None)


def _copy_verified(store: ArtifactStore, export: ArtifactStore, key: str, ref: ArtifactRef) -> ArtifactRef:
    """The export's copy of ``ref`` at ``key``: kept when it verifies, (re)written from the store when it is
    missing or does not match (an interrupted or damaged earlier publish), then verified."""
    try:
        return verify_copy(export, key, ref.sha256, ref.bytes)
    except (ExportCorrupted, ArtifactMissing):
        export.write_named(key, store.read_bytes(ref))
        return verify_copy(export, key, ref.sha256, ref.bytes)


def publish_run(
    store: ArtifactStore,
    export: ArtifactStore,
    run_id: str,
    artifacts: dict[str, ArtifactRef],
    manifest: dict[str, Any],
    compared_with: str | None | bool = True,
) -> ExportRecord:
    """Copy a run's artifacts and manifest to its version folder under ``export``, verify every copy, record the
    pointer in ``history/``, then move ``latest.json`` to it.

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
    latest, latest_sha = _current_pointer(export)
    current_version = latest["version"] if latest else None
    own_version = _run_version(export, run_id)
    if (
        latest
        and current_version != own_version
        and all(latest["files"].get(name, {}).get("sha256") == artifacts[name].sha256 for name in MODEL_FILES)
    ):
        # Another run's model, byte for byte (a rerun on unchanged data): the devices already have these bytes.
        files = {
            name: verify_copy(export, export.key_of(ref["uri"]), ref["sha256"], ref["bytes"])
            for name, ref in latest["files"].items()
        }
        return ExportRecord(
            url=export.url, version=latest["version"], pointer=export.uri_for(POINTER), files=files, published=False
        )
    if compared_with is not True and current_version not in (compared_with, own_version):
        raise PointerMoved(
            f"{export.uri_for(POINTER)} now names {current_version or 'nothing'}, not {compared_with or 'nothing'}, "
            "which this run was compared with: another run published first"
        )

    now = datetime.now(timezone.utc)
    version = own_version or safe_key(f"{now:%Y%m%dT%H%M%SZ}-{run_id}")
    folder = f"versions/{version}"
    files = {
        name: _copy_verified(store, export, f"{folder}/{export_file_name(name, artifacts[name])}", artifacts[name])
        for name in [*EXPORT_FILES, *(n for n in OPTIONAL_EXPORT_FILES if n in artifacts)]
    }
    export_info = {"url": export.url, "version": version, "pointer": export.uri_for(POINTER)}
    manifest_key = f"{folder}/{MANIFEST_FILE}"
    if not export.exists_named(manifest_key):  # an interrupted publish may have written it: writes are whole
        export.write_named(
            manifest_key, json.dumps({**manifest, "export": export_info}, indent=2, sort_keys=True).encode() + b"\n"
        )
    manifest_bytes = export.read_named(manifest_key)
    files["manifest"] = verify_copy(export, manifest_key, sha256_bytes(manifest_bytes), len(manifest_bytes))

    history_key = f"history/{version}.json"
    if export.exists_named(history_key):  # recorded by an interrupted publish: the pointer to write again
        pointer = export.read_named(history_key)
    else:
        pointer = (
            json.dumps(
                {
                    "kind": "ptqflow.export_pointer",
                    "version": version,
                    "run_id": run_id,
                    "published_at": now.isoformat(timespec="seconds"),
                    "files": {name: ref.model_dump() for name, ref in files.items()},
                },
                indent=2,
                sort_keys=True,
            ).encode()
            + b"\n"
        )
        export.write_named(history_key, pointer, exclusive=True)
    if current_version == version:  # already current: its copies are now verified (and repaired), nothing moves
        return ExportRecord(
            url=export.url, version=version, pointer=export_info["pointer"], files=files, published=False
        )
    try:
        export.replace_named_if(POINTER, pointer, latest_sha)
    except ConcurrentUpdate as error:
        export.delete_named(history_key)  # this pointer never took effect: history/ records only those that did
        raise PointerMoved(f"{error}: another run published during this one") from None
    return ExportRecord(url=export.url, version=version, pointer=export_info["pointer"], files=files, published=True)


@task(name="publish_export", cache_policy=NO_CACHE, persist_result=False)
def publish_export(
    store_url: str,
    export_url: str,
    run_id: str,
    artifacts: dict[str, ArtifactRef],
    manifest: dict[str, Any],
    compared_with: str | None,
) -> ExportRecord:
    return publish_run(ArtifactStore(store_url), export_store(export_url), run_id, artifacts, manifest, compared_with)
