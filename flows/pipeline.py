"""The ``ptq-pipeline`` flow: five cached stages from a data set to a validated, fully-integer ``.tflite``."""

from __future__ import annotations

import os
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from flows.stages import StageRecord, StageRunner
from storage.store import ArtifactRef, ArtifactStore
from tasks.calibrate import materialize_calibration_set
from tasks.convert import convert_to_tflite
from tasks.errors import AccuracyGateFailed
from tasks.parameters import (
    CalibrationParameters,
    ConversionParameters,
    GateParameters,
    SamplingParameters,
    TrainingParameters,
    ValidationParameters,
)
from tasks.sample import sample_dataset
from tasks.train import train_float_model
from tasks.validate import check_accuracy_gate, validate_with_interpreter

DEFAULT_STORE = os.environ.get("PTQFLOW_STORE", "./ptqflow-store")


class GateSummary(BaseModel):
    name: str
    passed: bool
    observed_drop_pp: float
    max_drop_pp: float
    message: str


class RunSummary(BaseModel):
    """What a run produced; the CLI's ``--json`` output."""

    run_id: str | None
    status: str = Field(description="'passed' or 'failed' (the accuracy gate).")
    store: str
    artifacts: dict[str, ArtifactRef]
    metrics: dict[str, Any]
    tasks: dict[str, StageRecord]
    gate: GateSummary


def _summary_markdown(summary: RunSummary) -> str:
    m = summary.metrics
    rows = [
        "| | float Keras | float .tflite | quantized .tflite |",
        "|---|---|---|---|",
        f"| accuracy | {m['float_accuracy']:.2%} | {m['tflite_float_accuracy']:.2%} | {m['quantized_accuracy']:.2%} |",
        f"| size | | {m['float_bytes']:,} B | {m['quantized_bytes']:,} B |",
    ]
    stages = ["| stage | cached | seconds |", "|---|---|---|"] + [
        f"| {name} | {'yes' if r.cached else 'no'} | {r.seconds:.1f} |" for name, r in summary.tasks.items()
    ]
    return "\n".join(
        [
            f"# ptq-pipeline: {summary.status}",
            "",
            summary.gate.message,
            "",
            *rows,
            "",
            f"Accuracy drop: **{m['accuracy_drop_pp']:.2f} pp**; top-1 agreement {m['agreement']:.2%}; "
            f"full integer: {'yes' if m['full_integer'] else 'no'}.",
            "",
            f"Quantized model: `{summary.artifacts['tflite'].uri}`",
            "",
            *stages,
        ]
    )


@flow(name="ptq-pipeline", persist_result=False, validate_parameters=True)
def ptq_pipeline(
    store: str = DEFAULT_STORE,
    seed: int = 0,
    sampling: SamplingParameters = SamplingParameters(),
    training: TrainingParameters = TrainingParameters(),
    calibration: CalibrationParameters = CalibrationParameters(),
    conversion: ConversionParameters = ConversionParameters(),
    validation: ValidationParameters = ValidationParameters(),
    gate: GateParameters = GateParameters(),
) -> RunSummary:
    """Sample, train, calibrate, convert and validate; fail when the quantized model loses more accuracy than
    ``gate.max_accuracy_drop`` allows.

    Args:
        store: fsspec URL of the artifact store (a local folder, s3://bucket/prefix, ...).
        seed: seeds sampling, training and calibration; the same seed gives a byte-identical .tflite.
    """
    artifact_store = ArtifactStore(store)
    run = StageRunner(artifact_store)

    dataset = run(sample_dataset, params=sampling, seed=seed)
    # Calibration needs only the data, so it runs before training: a calibration set that cannot be drawn
    # fails the run in seconds, not after the model has trained.
    calibration_set = run(materialize_calibration_set, dataset=dataset, params=calibration, seed=seed)
    trained = run(train_float_model, dataset=dataset, params=training, seed=seed)
    converted = run(convert_to_tflite, trained=trained, calibration=calibration_set, params=conversion)
    validated = run(validate_with_interpreter, dataset=dataset, trained=trained, converted=converted, params=validation)

    verdict = check_accuracy_gate(validated, gate.max_accuracy_drop)
    summary = RunSummary(
        run_id=flow_run.get_id(),
        status="passed" if verdict.passed else "failed",
        store=artifact_store.url,
        artifacts={
            "dataset": dataset.manifest,
            "model": trained.model,
            "calibration": calibration_set.table,
            "tflite": converted.quantized,
            "tflite_float": converted.float_model,
            "report": validated.report,
        },
        metrics=validated.model_dump(exclude={"report"}),
        tasks=run.records,
        gate=GateSummary(**verdict.__dict__),
    )
    create_markdown_artifact(_summary_markdown(summary), key="ptq-summary", description=verdict.message)
    if not verdict.passed:
        raise AccuracyGateFailed(verdict.message, summary)
    return summary
