"""The run manifest: the record of one complete run, written last and exactly once.

It lists every artifact (URI, sha256, size), the parameters (secrets removed), the metrics, the gate's verdict,
the export, and the library versions. It is created with an exclusive write under ``runs/<run_id>.json``, so it
exists only for a run that got to the end, and no later run can overwrite it.
"""

from __future__ import annotations

import platform
import re
from datetime import datetime, timezone
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from pydantic import ValidationError

from ptqflow.storage.store import ArtifactRef, ArtifactStore, StoreError, safe_key
from ptqflow.tasks.core.caching import library_versions
from ptqflow.tasks.release.documents import RecordedGate, RecordedSplit, RecordedStage, RunManifest, first_problem

RUNS_PREFIX = "runs"
_SECRET_NAME = re.compile(r"secret|password|passwd|token|credential|access_key|key_id|sas|signature", re.I)


def scrub(value: Any) -> Any:
    """A copy of ``value`` with secret-looking keys redacted and credentials removed from URLs."""
    if isinstance(value, dict):
        return {k: "***" if _SECRET_NAME.search(str(k)) else scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, str) and "://" in value:
        parts = urlsplit(value)
        if parts.username or parts.password:
            return urlunsplit(parts._replace(netloc=parts.hostname or ""))
    return value


def manifest_key(run_id: str) -> str:
    return safe_key(f"{RUNS_PREFIX}/{run_id}.json")


def build_manifest(
    run_id: str,
    parameters: dict[str, Any],
    store_url: str,
    artifacts: dict[str, ArtifactRef],
    metrics: dict[str, Any],
    gate: dict[str, Any],
    tasks: dict[str, Any],
    flow: str = "ptq-pipeline",
    promotion: dict[str, Any] | None = None,
    split: dict[str, Any] | None = None,
) -> RunManifest:
    """Pure: the manifest document (without the export, which publishing adds)."""
    import prefect

    return RunManifest(
        run_id=run_id,
        flow=flow,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        status="passed" if gate["passed"] else "failed",
        parameters=scrub(parameters),
        # Which split each row was in (a later run's champion check replays it on its own test rows).
        split=RecordedSplit.model_validate(split) if split is not None else None,
        store=scrub(store_url),
        artifacts=artifacts,
        metrics=metrics,
        gate=RecordedGate.model_validate(gate),
        tasks={name: RecordedStage.model_validate(record) for name, record in tasks.items()},
        promotion=promotion,
        libraries={**library_versions(), "prefect": prefect.__version__, "python": platform.python_version()},
    )


def list_manifests(store: ArtifactStore) -> ManifestListing:
    """Every run manifest in the store, newest first, and the files in ``runs/`` that are not manifests."""
    manifests, unreadable = [], []
    for key in store.list_named(RUNS_PREFIX):
        if not key.endswith(".json"):
            continue
        try:
            manifests.append(read_manifest(store, key))
        except CorruptManifest as error:
            unreadable.append(str(error))
    return ManifestListing(sorted(manifests, key=lambda m: m.created_at, reverse=True), unreadable)


def find_manifest(store: ArtifactStore, run_id: str) -> RunManifest:
    """The manifest of ``run_id`` (a unique prefix of it is enough).

    Raises:
        LookupError: no run, or several runs, match.
    """
    keys = [k for k in store.list_named(RUNS_PREFIX) if k.rsplit("/", 1)[-1].startswith(run_id)]
    if not keys:
        raise LookupError(f"no run {run_id!r} in {store.url}: `ptqflow runs --store {store.url}` lists the runs")
    if len(keys) > 1:
        raise LookupError(f"{len(keys)} runs start with {run_id!r}: give more of the run id")
    return read_manifest(store, keys[0])


class CorruptManifest(StoreError):
    pass


class ManifestListing(NamedTuple):
    manifests: list[RunManifest]  # newest first
    unreadable: list[str]  # one line per manifest that is not one: the file and the fix


def read_manifest(store: ArtifactStore, key: str) -> RunManifest:
    """A run manifest, checked to be one (someone else may have written the file).

    Raises:
        CorruptManifest: not JSON, or not a ptqflow run manifest.
    """
    try:
        return RunManifest.model_validate_json(store.read_named(key))
    except ValidationError as error:
        detail = first_problem(error, 100)
        raise CorruptManifest(
            f"{store.uri_for(key)} is not a readable run manifest ({detail}): move it out of {RUNS_PREFIX}/ (a "
            "manifest only records a run; the artifacts it names stay valid)"
        ) from None
