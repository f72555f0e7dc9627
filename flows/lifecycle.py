"""What every flow does around its own stages: check a deployment's form and hold the store's lock before anything
runs; sample, calibrate and train (the stages every conversion starts from); and end the same way, with the
champion check, the manifest, the export and the Prefect artifacts."""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict

from ptqflow.flows.environment import variables_set
from ptqflow.flows.events import emit_run_events
from ptqflow.flows.locks import exclusive
from ptqflow.flows.registry import (
    RegistryOutOfLine,
    check_reachable,
    out_of_line,
    record_in_mlflow,
    registered_model_name,
)
from ptqflow.flows.stages import StageRunner, sweep_leftovers
from ptqflow.flows.trust import enforce_for_deployment_runs
from ptqflow.storage.credentials import options_from_block
from ptqflow.storage.store import BLOCK_ENV, EXPORT_OPTIONS_ENV, STORE_OPTIONS_ENV, ArtifactRef, ArtifactStore
from ptqflow.tasks.core.artifacts import CalibrationSet, SampledDataset, TrainedModel, ValidationResult
from ptqflow.tasks.core.errors import AccuracyGateFailed, secrets_kept_out
from ptqflow.tasks.core.parameters import (
    CalibrationParameters,
    ConversionParameters,
    GateParameters,
    ModelTask,
    RegistryParameters,
    RepairParameters,
    SamplingParameters,
    SweepParameters,
    TrainingParameters,
    ValidationParameters,
)
from ptqflow.tasks.core.validation_report import PromotionDecision
from ptqflow.tasks.data.datasets import is_builtin, resolve_source
from ptqflow.tasks.data.sampling import columns_of
from ptqflow.tasks.evaluation.gate import GateResult
from ptqflow.tasks.models.training import check_trainable
from ptqflow.tasks.release.documents import ExportLocation, RunManifest
from ptqflow.tasks.release.manifest import build_manifest
from ptqflow.tasks.release.outcome import RegistryRecord, RunOutcome, RunSummary, SweepSummary
from ptqflow.tasks.release.publish import ExportRecord, export_store
from ptqflow.tasks.release.targets import PointerMoved
from ptqflow.tasks.stages.calibrate import materialize_calibration_set
from ptqflow.tasks.stages.release import (
    compare_with_champion,
    publish_export,
    write_run_manifest,
)
from ptqflow.tasks.stages.report import write_report
from ptqflow.tasks.stages.sample import fingerprint_source, sample_dataset
from ptqflow.tasks.stages.train import fingerprint_model, train_float_model
from ptqflow.tasks.views.render import (
    promotion_markdown,
    run_summary_markdown,
    sweep_header,
    sweep_rows,
    sweep_summary_markdown,
    sweep_targets,
    sweep_task,
)


class FlowParameters(BaseModel):
    """A flow's parameters as Prefect validated them, typed for the steps that finish a run: ptq-pipeline's take
    ``conversion`` and ``repair``, ptq-sweep's ``sweep``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: str
    seed: int
    export: str | None
    storage_block: str | None
    export_block: str | None
    sampling: SamplingParameters
    training: TrainingParameters
    calibration: CalibrationParameters
    validation: ValidationParameters
    gate: GateParameters
    registry: RegistryParameters
    conversion: ConversionParameters | None = None
    repair: RepairParameters | None = None
    sweep: SweepParameters | None = None

    def recorded(self) -> dict[str, Any]:
        """As the manifest and MLflow record them: JSON, the groups a flow does not take left out."""
        left_out = {group for group in ("conversion", "repair", "sweep") if getattr(self, group) is None}
        return self.model_dump(mode="json", exclude=left_out)


@contextmanager
def guarded_run(
    store: str,
    export: str | None,
    sampling: SamplingParameters,
    training: TrainingParameters,
    calibration: CalibrationParameters,
    storage_block: str | None = None,
    export_block: str | None = None,
    registry: RegistryParameters | None = None,
) -> Iterator[StageRunner]:
    """A stage runner on ``store`` while this run holds the store's and the export's lock (see flows/locks.py);
    with ``storage_block`` / ``export_block``, their credentials open the store and the export (see
    ``storage.credentials``); with ``registry``'s MLflow, once it answers. An exception leaving the run quotes
    no secret (``secrets_kept_out``): Prefect records the flow run's failure."""
    with secrets_kept_out():
        yield from _guarded(store, export, sampling, training, calibration, storage_block, export_block, registry)


def _guarded(
    store: str,
    export: str | None,
    sampling: SamplingParameters,
    training: TrainingParameters,
    calibration: CalibrationParameters,
    storage_block: str | None,
    export_block: str | None,
    registry: RegistryParameters | None,
) -> Iterator[StageRunner]:
    # A deployment's form is filled by others: its locations and model are checked before anything is touched.
    enforce_for_deployment_runs(
        {
            "store": store,
            "export": export,
            "sampling": sampling.model_dump(mode="json"),
            "training": training.model_dump(mode="json"),
            "calibration": calibration.model_dump(mode="json"),
            "registry": registry.model_dump(mode="json") if registry else None,
            "storage_block": storage_block,
            "export_block": export_block,
        }
    )
    check_trainable(sampling.task, training)
    if registry is not None:
        check_reachable(registry)
    with credentials_from_blocks(storage_block, export_block):
        artifact_store = ArtifactStore(store)
        export_target_store = export_store(export) if export else None  # a bad export URL fails now
        # One run at a time per store and export target (schedules, the UI, deployments).
        with exclusive(artifact_store.url, export_target_store.url if export_target_store else None) as held:
            sweep_leftovers(held, artifact_store, export_target_store)
            yield StageRunner(artifact_store)


@contextmanager
def credentials_from_blocks(storage_block: str | None, export_block: str | None) -> Iterator[None]:
    """For the run's duration, name the blocks whose credentials open the store and the export, in the variables
    every process of the run reads (``storage.store.BLOCK_ENV``; the sweep's local Dask workers inherit them): a
    block's values are read where they are used, never passed around. A block that cannot be read fails now."""
    named = {BLOCK_ENV[STORE_OPTIONS_ENV]: storage_block, BLOCK_ENV[EXPORT_OPTIONS_ENV]: export_block}
    chosen = {variable: block for variable, block in named.items() if block}
    for block in chosen.values():
        options_from_block(block)
    with variables_set(chosen):
        yield


def run_date() -> datetime:
    """When this flow run was scheduled for (now, for a run started by hand), in UTC."""
    scheduled = flow_run.scheduled_start_time
    return scheduled.astimezone(timezone.utc) if scheduled else datetime.now(timezone.utc)


def upstream_stages(
    run: StageRunner,
    seed: int,
    sampling: SamplingParameters,
    training: TrainingParameters,
    calibration: CalibrationParameters,
    more_calibration_sizes: Sequence[int] = (),
) -> tuple[SampledDataset, dict[int, CalibrationSet], TrainedModel]:
    """Sample, draw the calibration set (one per size), train: what every conversion starts from."""
    # The run's date fills a {date} template and places a --window-days window: a scheduled run's date is the time
    # it was scheduled for, so a late or retried nightly run still reads its own day.
    source_url, since = (
        resolve_source(sampling.dataset, run_date(), sampling.since, sampling.window_days)
        if not is_builtin(sampling.dataset)
        else (None, None)
    )
    # What the inputs hold now (listings, no reads): part of the cache keys, and a bad URL fails here, first.
    source = run.retrying(fingerprint_source)(source_url or sampling.dataset, since)
    calibration_source = run.retrying(fingerprint_source)(calibration.calibration_source)
    model_file = run.retrying(fingerprint_model)(training)

    dataset = run(
        sample_dataset, params=sampling, seed=seed, source_fingerprint=source, source_url=source_url, since=since
    )
    # Calibration needs only the data, so it runs before training: a calibration set that cannot be drawn
    # fails the run in seconds, not after the model has trained.
    calibration_sets = {}
    for size in [calibration.calibration_size, *sorted(set(more_calibration_sizes) - {calibration.calibration_size})]:
        calibration_sets[size] = run(
            materialize_calibration_set,
            label=None if size == calibration.calibration_size else f"materialize_calibration_set[{size}]",
            dataset=dataset,
            params=calibration.model_copy(update={"calibration_size": size}),
            seed=seed,
            columns=columns_of(sampling),
            source_fingerprint=calibration_source,
        )
    trained = run(train_float_model, dataset=dataset, params=training, seed=seed, model_fingerprint=model_file)
    return dataset, calibration_sets, trained


def challenge_champion(
    run: StageRunner,
    export: str | None,
    dataset: SampledDataset,
    artifacts: dict[str, ArtifactRef],
    verdict: GateResult,
    challenger_figure: float | None,
    gate: GateParameters,
    batch_size: int,
) -> PromotionDecision | None:
    """With an export target and a passing gate: compare with the exported model (champion) on this test split
    (see tasks/release/promotion.py) and return the decision; None without one."""
    if not export or not verdict.passed:
        return None
    promotion = run.effect(
        compare_with_champion,
        export_url=export,
        dataset=dataset,
        challenger=artifacts["tflite"],
        challenger_figure=challenger_figure,
        gate=gate,
        batch_size=batch_size,
    )
    get_run_logger().info(promotion.message)
    return promotion


def with_report_views(
    run: StageRunner, artifacts: dict[str, ArtifactRef], promotion: PromotionDecision | None
) -> dict[str, ArtifactRef]:
    """``artifacts`` with report.md and report.html rendered from its report.json (and, with ``promotion``, a
    report.json that records it); as it was for a run with no report (a sweep where nothing passed)."""
    if "report" not in artifacts:
        return artifacts
    return {**artifacts, **run.effect(write_report, report=artifacts["report"], promotion=promotion).artifacts()}


def publish_if_promoted(
    run: StageRunner,
    export: str | None,
    run_id: str,
    artifacts: dict[str, ArtifactRef],
    manifest: RunManifest,
    promotion: PromotionDecision | None,
) -> tuple[ExportRecord | None, PromotionDecision | None]:
    """Publish the run (a new version folder, then latest.json) when the champion check promoted it, provided
    latest.json still names the champion it was compared with. Returns the export and the final decision: a run
    that lost that race to another writer says so and is not published."""
    if not export or promotion is None or not promotion.promote:
        return None, promotion
    try:
        exported = run.effect(
            publish_export,
            export_url=export,
            run_id=run_id,
            artifacts=artifacts,
            manifest=manifest,
            compared_with=promotion.champion_version,
        )
    except PointerMoved as lost:
        get_run_logger().warning("not published: %s", lost)
        return None, promotion.model_copy(
            update={"promote": False, "message": f"not published: {lost}; rerun to compare with the new exported model"}
        )
    return exported, promotion


def finish_run(
    run: StageRunner,
    flow: str,
    parameters: FlowParameters,
    dataset: SampledDataset,
    artifacts: dict[str, ArtifactRef],
    verdict: GateResult,
    validated: ValidationResult | None,
    metrics: dict[str, Any],
) -> RunOutcome:
    """Compare with the exported model, write the manifest, publish when promoted. ``metrics``: what the manifest
    records."""
    export, gate = parameters.export, parameters.gate
    run_id = str(flow_run.get_id())
    if dataset.seen_rows is not None:  # exported beside the model: what a later run's champion check reads
        artifacts = {**artifacts, "seen_rows": dataset.seen_rows}
    promotion = challenge_champion(
        run,
        export,
        dataset,
        artifacts,
        verdict,
        (validated.quantized_mae if dataset.spec.task is ModelTask.regression else validated.quantized_accuracy)
        if validated
        else None,
        gate,
        parameters.validation.batch_size,
    )
    artifacts = with_report_views(run, artifacts, promotion)  # the report for people records the decision
    run.record_worker_seconds()
    manifest = build_manifest(
        run_id,
        parameters.recorded(),
        run.store.url,
        artifacts,
        metrics,
        verdict.model_dump(mode="json"),
        {k: v.model_dump() for k, v in run.records.items()},
        flow=flow,
        promotion=promotion.model_dump(mode="json") if promotion else None,
        split={**dataset.split.model_dump(), "samples": dataset.counts} if dataset.split else None,
    )
    exported, promotion = publish_if_promoted(run, export, run_id, artifacts, manifest, promotion)
    manifest_uri = run.effect(
        write_run_manifest,
        manifest=manifest.model_copy(
            update={
                "export": ExportLocation.model_validate(exported.model_dump(mode="json")) if exported else None,
                "promotion": promotion.model_dump(mode="json") if promotion else None,
            }
        ),
    )
    return RunOutcome(
        run_id=run_id,
        status=verdict.status,
        store=run.store.url,
        artifacts=artifacts,
        tasks=run.records,
        gate=verdict,
        manifest=manifest_uri,
        export=exported,
        promotion=promotion,
        registry=record_run_in_mlflow(run, parameters, run_id, verdict, metrics, artifacts),
    )


def record_run_in_mlflow(
    run: StageRunner,
    parameters: FlowParameters,
    run_id: str,
    verdict: GateResult,
    metrics: dict[str, Any],
    artifacts: dict[str, ArtifactRef],
) -> RegistryRecord | None:
    """With ``--mlflow-uri``: the run as an MLflow run and, with an export, the registry's champion in line with
    its latest.json (``flows.registry``). Raises RegistryOutOfLine, naming the command that repairs it."""
    registry = parameters.registry
    if registry.mlflow_uri is None:
        return None
    name = registered_model_name(registry, parameters.sampling.dataset)
    try:
        record: RegistryRecord = run.effect(
            record_in_mlflow,
            registry=registry,
            name=name,
            run_id=run_id,
            status=verdict.status.value,
            parameters=parameters.recorded(),
            metrics=metrics,
            artifacts=artifacts,
            export_url=parameters.export,
        )
    except Exception as error:
        raise RegistryOutOfLine(out_of_line(error, registry, name, parameters.export, run_id)) from None
    get_run_logger().info("MLflow: %s", record.model_dump_json())
    return record


def announce(summary: RunSummary | SweepSummary, parameters: FlowParameters, sweep_table: str | None = None) -> None:
    """Show the outcome in the Prefect UI (markdown, table and link artifacts) and emit its events
    (``flows.events``); a run that failed its gate then fails, carrying its summary (the CLI prints it and exits
    1). ``parameters``: the flow's, by name."""
    if isinstance(summary, SweepSummary):
        create_table_artifact(
            [
                dict(zip(sweep_header(sweep_task(summary.rows), sweep_targets(summary.rows)), line))
                for line in sweep_rows(summary.rows)
            ],
            key="ptq-sweep",
            description=f"{len(summary.rows) - 1} configurations ranked by {summary.rank_by}; best: "
            f"{summary.best or 'none'}",
        )
        create_markdown_artifact(
            sweep_summary_markdown(summary, sweep_table or ""),
            key="ptq-sweep-summary",
            description=summary.gate.message,
        )
        create_link_artifact(
            summary.report.plot.uri,
            link_text="sweep plot (PNG)",
            key="ptq-sweep-plot",
            description="size vs accuracy drop, and latency, per configuration",
        )
    else:
        create_markdown_artifact(run_summary_markdown(summary), key="ptq-summary", description=summary.gate.message)
    if summary.promotion is not None:
        create_markdown_artifact(
            promotion_markdown(summary.promotion), key="ptq-promotion", description=summary.promotion.message
        )
    if "report_html" in summary.artifacts:
        create_link_artifact(
            summary.artifacts["report_html"].uri,
            link_text="validation report (HTML)",
            key="ptq-report",
            description="report.html: metrics per model, per-layer error, audit, plots",
        )
    emit_run_events(summary, parameters.sampling.dataset, parameters.export)
    if not summary.gate.passed:
        raise AccuracyGateFailed(summary.gate.message, summary)
