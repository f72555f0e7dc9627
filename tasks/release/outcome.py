"""What a finished run hands its caller: the typed outcome of ``ptq-pipeline`` and ``ptq-sweep``, returned by the
Python API, printed by the CLI (``--json`` is its serialisation) and drawn by ``tasks.views.render``."""

from __future__ import annotations

from pydantic import BaseModel, Field

from ptqflow.storage.store import ArtifactRef
from ptqflow.tasks.core.artifacts import RepairResult, ValidationFigures
from ptqflow.tasks.core.validation_report import PromotionDecision
from ptqflow.tasks.evaluation.gate import GateResult, GateStatus
from ptqflow.tasks.release.publish import ExportRecord
from ptqflow.tasks.sweep.ranking import SweepReport, SweepRow


class StageRecord(BaseModel):
    cached: bool
    seconds: float | None = Field(
        description="Wall time in this flow; for a stage that ran on a task runner's worker, its run time there as "
        "Prefect recorded it (not the wait for a worker), or None if Prefect's API could not say."
    )
    cache_key: str | None = Field(
        None,
        description="The stage's cache key, which names its record under prefect-results/ (ptqflow gc keeps "
        "the records of the runs it keeps); None in manifests written before it was recorded.",
    )


class RegistryRecord(BaseModel):
    """What a command did in MLflow (``flows.registry``)."""

    tracking_uri: str
    registered_model: str
    mlflow_run_id: str | None = Field(None, description="The MLflow run that records this ptqflow run.")
    champion_version: str | None = Field(
        None, description="The registered version the champion alias names now: the export's latest.json model."
    )
    previous_champion_version: str | None = None
    champion_run_id: str | None = Field(None, description="The ptqflow run of that version.")


class RunOutcome(BaseModel):
    """What every run ends with, whichever flow ran it."""

    run_id: str | None
    status: GateStatus = Field(description="The gate's verdict; the CLI exits 0 only when it is 'passed'.")
    store: str
    artifacts: dict[str, ArtifactRef]
    tasks: dict[str, StageRecord]
    gate: GateResult
    manifest: str = Field(description="URI of the run manifest (runs/<run_id>.json in the store).")
    export: ExportRecord | None = Field(None, description="Where the run was published, if it was.")
    promotion: PromotionDecision | None = Field(
        None, description="With an export: whether the model replaced the exported one, and both accuracies."
    )
    registry: RegistryRecord | None = Field(None, description="With --mlflow-uri: what was recorded in MLflow.")


class RunSummary(RunOutcome):
    """What a ``ptq-pipeline`` run produced; the CLI's ``ptqflow run --json`` output."""

    metrics: ValidationFigures = Field(description="The validation of the model the run ends with.")
    repair: RepairResult | None = Field(None, description="What repair kept in float, when the gate called it.")


class SweepSummary(RunOutcome):
    """What a ``ptq-sweep`` run produced; the CLI's ``ptqflow sweep --json`` output."""

    best: str | None = Field(description="The best configuration that passed, by rank_by.")
    rank_by: str
    rows: list[SweepRow] = Field(description="Every configuration, ranked; the float reference included.")
    report: SweepReport
    metrics: ValidationFigures | None = Field(None, description="The full validation of the best configuration.")
