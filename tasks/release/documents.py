"""The documents a run leaves behind, typed: the run manifest (``runs/<run_id>.json`` in the store, and
``manifest.json`` in each exported version) and the export pointer (``latest.json``, and each entry of
``history/``). They are read and written only through these models.

Each is read from storage someone else may write: a document that does not validate is refused by its reader,
naming the file (``CorruptManifest``, ``MalformedRecord``). Fields a newer ptqflow adds are kept as they are
(``extra="allow"``), so an older reader neither refuses nor drops them when it copies a document."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ptqflow.storage.store import ArtifactRef

# Raised when a field changes meaning; a reader still reads every earlier version.
MANIFEST_SCHEMA_VERSION = 1


def first_problem(error: ValidationError, limit: int) -> str:
    """Where a document fails to validate, and why, in at most ``limit`` characters (for a one-line refusal)."""
    first = error.errors()[0]
    return f"{'.'.join(map(str, first['loc'])) or 'the document'}: {first['msg']}"[:limit]


class RecordedGate(BaseModel):
    """The gate's verdict as a manifest records it (``tasks.evaluation.gate.GateResult``, dumped)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    name: str | None = None
    status: str | None = None
    passed: bool = False
    message: str = ""


class RecordedSplit(BaseModel):
    """How the run's rows were split (``tasks.core.artifacts.SplitRule``) and each split's size: what a later
    run's champion check replays on its own test rows."""

    model_config = ConfigDict(frozen=True, extra="allow")

    scheme: str | None = None
    seed: int | None = None
    validation_fraction: float | None = None
    test_fraction: float | None = None


class RecordedStage(BaseModel):
    """One stage of the run: cached or not, its time and its cache key (``tasks.release.outcome.StageRecord``)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    cached: bool | None = None
    seconds: float | None = None
    cache_key: str | None = None


class ExportLocation(BaseModel):
    """Where a run was published (added to its manifest by the publish)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    url: str
    version: str
    pointer: str | None = None


class RunManifest(BaseModel):
    """The record of one complete run: every artifact, the parameters (secrets removed), the metrics, the gate's
    verdict, the promotion and the export, and the library versions."""

    model_config = ConfigDict(frozen=True, extra="allow")

    kind: Literal["ptqflow.run_manifest"] = "ptqflow.run_manifest"
    schema_version: int = MANIFEST_SCHEMA_VERSION
    run_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    flow: str = "ptq-pipeline"
    created_at: str
    status: str | None = None
    parameters: dict[str, Any] = {}
    split: RecordedSplit | None = None
    store: str | None = None
    artifacts: dict[str, ArtifactRef] = {}
    metrics: dict[str, Any] = {}
    gate: RecordedGate | None = None
    tasks: dict[str, RecordedStage] = {}
    promotion: dict[str, Any] | None = None
    export: ExportLocation | None = None
    libraries: dict[str, str] = {}

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def dataset(self) -> str | None:
        """The data set the run sampled (its ``--dataset``), if its parameters record one."""
        sampling = self.parameters.get("sampling")
        return str(sampling["dataset"]) if isinstance(sampling, dict) and "dataset" in sampling else None

    def document(self) -> dict[str, Any]:
        """The manifest as JSON values, as it is stored."""
        return self.model_dump(mode="json")

    def to_bytes(self) -> bytes:
        return json.dumps(self.document(), indent=2, sort_keys=True).encode() + b"\n"


class ExportPointer(BaseModel):
    """``latest.json`` (the version devices take) and each entry of ``history/`` (every pointer that was live):
    the version, the run it came from, and its files by their paths in the export."""

    model_config = ConfigDict(frozen=True, extra="allow")

    kind: Literal["ptqflow.export_pointer"] = "ptqflow.export_pointer"
    version: str
    run_id: str
    files: dict[str, ArtifactRef]
    published_at: str | None = None
    pointed_at: str | None = Field(None, description="promote and rollback: when the pointer moved back or forth.")
    action: str | None = Field(None, description="promote or rollback; None for a publish.")
    history: str | None = Field(None, description="Its entry in history/ (pointers from before name none).")

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True).encode() + b"\n"


def same_version(a: ExportPointer | None, b: ExportPointer | None) -> bool:
    """Whether two pointers name the same version of the same run (None: no champion). Targets hold a version's
    files at their own URIs, so pointers read from two targets differ in their files even when they agree."""
    return (None if a is None else (a.version, a.run_id)) == (None if b is None else (b.version, b.run_id))
