"""The ``ptq-pipeline`` flow: five cached stages from a data set to a validated, fully-integer ``.tflite``."""

# No `from __future__ import annotations` here: Prefect builds the flow's parameter model from the signature,
# and a deployment loads this file by path, where string annotations cannot be resolved.
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from ptqflow.flows.api import DEFAULT_STORE
from ptqflow.flows.locks import exclusive
from ptqflow.flows.stages import StageRecord, StageRunner, sweep_leftovers
from ptqflow.flows.trust import enforce_for_deployment_runs
from ptqflow.storage.store import ArtifactRef, ArtifactStore
from ptqflow.tasks.artifacts import CalibrationSet, ConvertedModels, SampledDataset, TrainedModel
from ptqflow.tasks.calibrate import materialize_calibration_set
from ptqflow.tasks.convert import convert_to_tflite
from ptqflow.tasks.datasets import is_builtin, resolve_source
from ptqflow.tasks.errors import AccuracyGateFailed
from ptqflow.tasks.manifest import build_manifest, write_run_manifest
from ptqflow.tasks.parameters import (
    CalibrationParameters,
    ConversionParameters,
    GateParameters,
    RepairParameters,
    SamplingParameters,
    TrainingParameters,
    ValidationParameters,
)
from ptqflow.tasks.promotion import PromotionDecision, compare_with_champion, record_promotion_in_report
from ptqflow.tasks.publish import ExportRecord, PointerMoved, export_store, publish_export
from ptqflow.tasks.repair import repair_quantization
from ptqflow.tasks.sample import columns_of, fingerprint_source, sample_dataset
from ptqflow.tasks.train import fingerprint_model, train_float_model
from ptqflow.tasks.validate import GateResult, check_accuracy_gate, validate_with_interpreter


class RunSummary(BaseModel):
    """What a run produced; the CLI's ``--json`` output."""

    run_id: str | None
    status: str = Field(description="'passed', 'failed' or 'not_validated' (the accuracy gate).")
    store: str
    artifacts: dict[str, ArtifactRef]
    metrics: dict[str, Any]
    tasks: dict[str, StageRecord]
    gate: GateResult
    manifest: str = Field(description="URI of the run manifest (runs/<run_id>.json in the store).")
    export: ExportRecord | None = Field(None, description="Where the run was published, if it was.")
    promotion: PromotionDecision | None = Field(
        None, description="With an export: whether the model replaced the exported one, and both accuracies."
    )


def _pct(value: float | None) -> str:
    return "not run" if value is None else f"{value:.2%}"


def _worst(layers: list[dict[str, Any]]) -> str:
    return ", ".join(f"{w['layer']} ({w['op']}, badness {w['badness']:.1f})" for w in layers)


def _summary_markdown(summary: RunSummary) -> str:
    m = summary.metrics
    rows = [
        "| | float Keras | float .tflite | quantized .tflite |",
        "|---|---|---|---|",
        f"| accuracy | {_pct(m['float_accuracy'])} | {_pct(m['tflite_float_accuracy'])} | "
        f"{_pct(m['quantized_accuracy'])} |",
        f"| size | | {m['float_bytes']:,} B | {m['quantized_bytes']:,} B |",
    ]
    stages = ["| stage | cached | seconds |", "|---|---|---|"] + [
        f"| {name} | {'yes' if r.cached else 'no'} | {r.seconds:.1f} |" for name, r in summary.tasks.items()
    ]
    worst = m.get("worst_layers") or []
    drop = "not measured" if m["accuracy_drop_pp"] is None else f"**{m['accuracy_drop_pp']:.2f} pp**"
    return "\n".join(
        [
            f"# ptq-pipeline: {summary.status}",
            "",
            summary.gate.message,
            "",
            *rows,
            "",
            f"Accuracy drop: {drop}; top-1 agreement {_pct(m['agreement'])}; "
            f"full integer: {'yes' if m['full_integer'] else 'no'}.",
            "",
            *([f"Worst layers: {_worst(worst)}", ""] if worst else []),
            f"Quantized model: `{summary.artifacts['tflite'].uri}`",
            "",
            f"Report: `{summary.artifacts['report_html'].uri}` (also `report.md`, `report.json`)"
            if "report_html" in summary.artifacts
            else "",
            "",
            f"Manifest: `{summary.manifest}`"
            + (f"; exported as version `{summary.export.version}` to `{summary.export.url}`" if summary.export else ""),
            "",
            summary.promotion.message if summary.promotion else "",
            "",
            *stages,
        ]
    )


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
    challenger_accuracy: float | None,
    gate: GateParameters,
    batch_size: int,
) -> tuple[PromotionDecision | None, dict[str, ArtifactRef]]:
    """With an export target and a passing gate: compare with the exported model (champion) on this test split
    (see tasks/promotion.py). Returns the decision and the run's artifacts, whose report now records it."""
    if not export or not verdict.passed or challenger_accuracy is None:
        return None, artifacts
    promotion = run.effect(
        compare_with_champion,
        export_url=export,
        dataset=dataset,
        challenger=artifacts["tflite"],
        challenger_accuracy=challenger_accuracy,
        gate=gate,
        batch_size=batch_size,
    )
    get_run_logger().info(promotion.message)
    if "report" in artifacts:
        artifacts = {
            **artifacts,
            **run.effect(record_promotion_in_report, report=artifacts["report"], promotion=promotion),
        }
    return promotion, artifacts


def publish_if_promoted(
    run: StageRunner,
    export: str | None,
    run_id: str,
    artifacts: dict[str, ArtifactRef],
    manifest: dict[str, Any],
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


def promotion_markdown(promotion: PromotionDecision) -> str:
    def pct(value: float | None) -> str:
        return "—" if value is None else f"{value:.2%}"

    return "\n".join(
        [
            f"# {'promoted' if promotion.promote else 'not promoted'}",
            "",
            promotion.message,
            "",
            f"| | accuracy ({promotion.comparison or 'this run'}) |",
            "|---|---|",
            f"| new model (challenger) | {pct(promotion.challenger_accuracy)} |",
            f"| exported model (champion{', ' + promotion.champion_version if promotion.champion_version else ''}) | "
            f"{pct(promotion.champion_accuracy)} |",
            "",
            f"Tolerance: {promotion.tolerance_pp} pp.",
        ]
    )


# Prefect persists a failed run's exception even with persist_result=False; JSON keeps it from being a pickle.
@flow(name="ptq-pipeline", persist_result=False, result_serializer="json", validate_parameters=True)
def ptq_pipeline(
    store: str = DEFAULT_STORE,
    seed: int = 0,
    sampling: SamplingParameters = SamplingParameters(),
    training: TrainingParameters = TrainingParameters(),
    calibration: CalibrationParameters = CalibrationParameters(),
    conversion: ConversionParameters = ConversionParameters(),
    validation: ValidationParameters = ValidationParameters(),
    gate: GateParameters = GateParameters(),
    export: str | None = None,
    repair: RepairParameters = RepairParameters(),
) -> RunSummary:
    """Sample, train, calibrate, convert and validate; fail when the quantized model loses more accuracy than
    ``gate.max_accuracy_drop`` allows; publish a passing run to ``export``; record the run in a manifest.

    Args:
        store: fsspec URL of the artifact store (a local folder, s3://bucket/prefix, ...).
        seed: seeds sampling, training and calibration; the same seed gives a byte-identical .tflite.
        export: fsspec URL to publish a passing run to (a new version folder, then latest.json).
    """
    # A deployment's form is filled by others: its locations and model are checked before anything is touched.
    enforce_for_deployment_runs(
        {
            "store": store,
            "export": export,
            "sampling": sampling.model_dump(mode="json"),
            "training": training.model_dump(mode="json"),
            "calibration": calibration.model_dump(mode="json"),
        }
    )
    artifact_store = ArtifactStore(store)
    export_target_store = export_store(export) if export else None  # a bad export URL fails now, not after training
    export_target = export_target_store.url if export_target_store else None
    # One run at a time per store and export target (schedules, the UI, deployments): see flows/locks.py.
    with exclusive(artifact_store.url, export_target) as held:
        sweep_leftovers(held, artifact_store, export_target_store)
        run = StageRunner(artifact_store)

        dataset, calibration_sets, trained = upstream_stages(run, seed, sampling, training, calibration)
        calibration_set = calibration_sets[calibration.calibration_size]
        converted = run(convert_to_tflite, trained=trained, calibration=calibration_set, params=conversion)
        validated = run(
            validate_with_interpreter,
            dataset=dataset,
            trained=trained,
            converted=converted,
            params=validation,
            calibration=calibration_set,
            conversion=conversion,
        )
        verdict = check_accuracy_gate(validated, gate.max_accuracy_drop, conversion.ops)

        repaired = None
        if verdict.status == "failed" and verdict.name == "accuracy_drop" and repair.applies_to(conversion):
            repaired = run(
                repair_quantization,
                dataset=dataset,
                trained=trained,
                calibration=calibration_set,
                converted=converted,
                validated=validated,
                conversion=conversion,
                max_accuracy_drop=gate.max_accuracy_drop,
                params=repair,
            )
            if repaired.succeeded:
                converted = ConvertedModels(quantized=repaired.repaired, float_model=converted.float_model)
                validated = run(
                    validate_with_interpreter,
                    label="validate_repaired_model",
                    dataset=dataset,
                    trained=trained,
                    converted=converted,
                    params=validation,
                    calibration=calibration_set,
                    conversion=conversion,
                    repair=repaired,
                )
            verdict = check_accuracy_gate(validated, gate.max_accuracy_drop, conversion.ops, repaired)

        run_id = str(flow_run.get_id())
        artifacts = {
            "dataset": dataset.manifest,
            "model": trained.model,
            "calibration": calibration_set.table,
            "tflite": converted.quantized,
            "tflite_float": converted.float_model,
            "report": validated.report,
            **(
                {"report_md": validated.report_md, "report_html": validated.report_html}
                if validated.report_html
                else {}
            ),
            **({"tflite_unrepaired": repaired.unrepaired} if repaired is not None and repaired.succeeded else {}),
        }
        metrics = validated.model_dump(mode="json", exclude={"report", "report_md", "report_html"})
        if repaired is not None:
            metrics["repair"] = repaired.model_dump(mode="json", exclude={"repaired", "unrepaired"})
        parameters = {
            "store": store,
            "seed": seed,
            "export": export,
            **{
                name: value.model_dump(mode="json")
                for name, value in (
                    ("sampling", sampling),
                    ("training", training),
                    ("calibration", calibration),
                    ("conversion", conversion),
                    ("validation", validation),
                    ("gate", gate),
                    ("repair", repair),
                )
            },
        }
        promotion, artifacts = challenge_champion(
            run, export, dataset, artifacts, verdict, validated.quantized_accuracy, gate, validation.batch_size
        )
        manifest = build_manifest(
            run_id,
            parameters,
            artifact_store.url,
            {k: v.model_dump() for k, v in artifacts.items()},
            metrics,
            verdict.model_dump(),
            {k: v.model_dump() for k, v in run.records.items()},
            promotion=promotion.model_dump(mode="json") if promotion else None,
            split=dataset.split.model_dump() if dataset.split else None,
        )
        exported, promotion = publish_if_promoted(run, export, run_id, artifacts, manifest, promotion)
        manifest_uri = run.effect(
            write_run_manifest,
            manifest={
                **manifest,
                "export": exported.model_dump(mode="json") if exported else None,
                "promotion": promotion.model_dump(mode="json") if promotion else None,
            },
        )

        summary = RunSummary(
            run_id=run_id,
            status=verdict.status,
            store=artifact_store.url,
            artifacts=artifacts,
            metrics=metrics,
            tasks=run.records,
            gate=verdict,
            manifest=manifest_uri,
            export=exported,
            promotion=promotion,
        )
        create_markdown_artifact(_summary_markdown(summary), key="ptq-summary", description=verdict.message)
        if promotion is not None:
            create_markdown_artifact(promotion_markdown(promotion), key="ptq-promotion", description=promotion.message)
        if "report_html" in artifacts:
            create_link_artifact(
                artifacts["report_html"].uri,
                link_text="validation report (HTML)",
                key="ptq-report",
                description="report.html: metrics per model, per-layer error, audit, plots",
            )
        if not verdict.passed:
            raise AccuracyGateFailed(verdict.message, summary)
        return summary
