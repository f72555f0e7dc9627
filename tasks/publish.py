"""Publishing a passing run to an export location (any fsspec URL) for devices to pick up.

Layout under the export URL::

    versions/<UTC time>-<run id>/model.tflite, model_float.tflite, model.keras, calibration.parquet,
                                 report.json, manifest.json
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

from storage.store import EXPORT_OPTIONS_ENV, ArtifactRef, ArtifactStore, StoreError, safe_key, sha256_bytes

EXPORT_FILES = {
    "tflite": "model.tflite",
    "tflite_float": "model_float.tflite",
    "model": "model.keras",
    "calibration": "calibration.parquet",
    "report": "report.json",
    "report_md": "report.md",
    "report_html": "report.html",
}
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


def _existing_version(export: ArtifactStore, run_id: str, artifacts: dict[str, ArtifactRef]) -> str | None:
    """The version that already holds this run, or the current one if it has exactly these artifacts."""
    versions = [key.rsplit("/", 1)[-1] for key in export.list_named("versions") if key.endswith(f"-{run_id}")]
    if versions:
        return versions[0]
    if export.exists_named(POINTER):
        latest = json.loads(export.read_named(POINTER))
        if all(latest["files"].get(name, {}).get("sha256") == artifacts[name].sha256 for name in MODEL_FILES):
            return latest["version"]  # a rerun of the same model: the devices already have these bytes
    return None


def publish_run(
    store: ArtifactStore, export: ArtifactStore, run_id: str, artifacts: dict[str, ArtifactRef], manifest: dict[str, Any]
) -> ExportRecord:
    """Copy a run's artifacts and manifest to a new version under ``export``, verify, then move ``latest.json``.

    A no-op (``published=False``) when the run, or the very same artifacts, are already published; the existing
    copies are verified all the same.

    Raises:
        ExportCorrupted: a copy does not match its source (now, or in an earlier publish).
    """
    existing = _existing_version(export, run_id, artifacts)
    if existing is not None:
        folder = f"versions/{existing}"
        pointer = json.loads(export.read_named(f"{folder}/{MANIFEST_FILE}"))["export"]
        # Verified against what was published then (its pointer in history/), not against this run's files.
        recorded = json.loads(export.read_named(f"history/{existing}.json"))["files"]
        files = {
            name: verify_copy(export, f"{folder}/{filename}", recorded[name]["sha256"], recorded[name]["bytes"])
            for name, filename in EXPORT_FILES.items() if name in recorded
        }
        return ExportRecord(url=export.url, version=existing, pointer=pointer["pointer"], files=files, published=False)

    now = datetime.now(timezone.utc)
    version = safe_key(f"{now:%Y%m%dT%H%M%SZ}-{run_id}")
    folder = f"versions/{version}"
    files = {}
    for name, filename in EXPORT_FILES.items():
        ref = artifacts[name]
        export.write_named(f"{folder}/{filename}", store.read_bytes(ref))
        files[name] = verify_copy(export, f"{folder}/{filename}", ref.sha256, ref.bytes)
    export_info = {"url": export.url, "version": version, "pointer": export.uri_for(POINTER)}
    manifest_bytes = json.dumps({**manifest, "export": export_info}, indent=2, sort_keys=True).encode() + b"\n"
    export.write_named(f"{folder}/{MANIFEST_FILE}", manifest_bytes)
    files["manifest"] = verify_copy(export, f"{folder}/{MANIFEST_FILE}", sha256_bytes(manifest_bytes), len(manifest_bytes))

    pointer = json.dumps(
        {
            "kind": "ptqflow.export_pointer",
            "version": version,
            "run_id": run_id,
            "published_at": now.isoformat(timespec="seconds"),
            "files": {name: ref.model_dump() for name, ref in files.items()},
        },
        indent=2,
        sort_keys=True,
    ).encode() + b"\n"
    export.write_named(f"history/{version}.json", pointer, exclusive=True)
    export.write_named(POINTER, pointer)
    return ExportRecord(url=export.url, version=version, pointer=export_info["pointer"], files=files, published=True)


@task(name="publish_export", cache_policy=NO_CACHE, persist_result=False)
def publish_export(
    store_url: str, export_url: str, run_id: str, artifacts: dict[str, ArtifactRef], manifest: dict[str, Any]
) -> ExportRecord:
    return publish_run(ArtifactStore(store_url), export_store(export_url), run_id, artifacts, manifest)
