"""The ``ptq-pipeline`` flow: five cached stages from a data set to a validated, fully-integer ``.tflite``."""

# No `from __future__ import annotations` here: Prefect builds the flow's parameter model from the signature,
# and a deployment loads this file by path, where string annotations cannot be resolved.
import functools

from prefect import flow

from ptqflow.flows.cluster import pipeline_task_runner
from ptqflow.flows.lifecycle import FlowParameters, announce, finish_run, guarded_run, upstream_stages
from ptqflow.flows.stages import StageRunner
from ptqflow.storage.store import DEFAULT_STORE
from ptqflow.tasks.core.artifacts import ConvertedModels, PredictedRows, SampledDataset, TrainedModel
from ptqflow.tasks.core.installation import require_target_runtimes
from ptqflow.tasks.core.parameters import (
    CalibrationParameters,
    ConversionParameters,
    DeviceTarget,
    GateParameters,
    RegistryParameters,
    RepairParameters,
    SamplingParameters,
    TargetOps,
    TrainingParameters,
    ValidationParameters,
)
from ptqflow.tasks.evaluation.gate import FIDELITY_GATES, GateStatus, check_gate
from ptqflow.tasks.evaluation.shards import shard_bounds
from ptqflow.tasks.release.outcome import RunSummary
from ptqflow.tasks.stages.convert import convert_to_tflite
from ptqflow.tasks.stages.repair import repair_quantization
from ptqflow.tasks.stages.validate import predict_test_rows, validate_with_interpreter


def sharded_predictions(
    run: StageRunner,
    dataset: SampledDataset,
    trained: TrainedModel,
    converted: ConvertedModels,
    name: str,
    validation: ValidationParameters,
    ops: TargetOps,
) -> tuple[PredictedRows, ...]:
    """The test split's predictions, shard by shard on the flow's task runner (a Dask cluster's workers, or this
    process's threads), when it has more than one shard; none otherwise (validation predicts them itself). With a
    TFLite Micro target, each shard also runs its rows on TFLM. A model with TensorFlow ops is not sharded: the
    Python interpreter cannot run it, which validation reports."""
    bounds = shard_bounds(dataset.counts["test"], validation.batch_size, validation.shard_rows)
    if len(bounds) < 2 or ops is TargetOps.select:
        return ()
    submitted = [
        run.submit(
            predict_test_rows,
            label=f"{name}[{start}:{stop}]",
            dataset=dataset,
            trained=trained,
            converted=converted,
            batch_size=validation.batch_size,
            num_threads=validation.num_threads,
            start=start,
            stop=stop,
            tflm=DeviceTarget.tflm in validation.targets,
            tflm_samples=validation.tflm_samples,
        )
        for start, stop in bounds
    ]
    return tuple(run.collect(shard) for shard in submitted)


# Prefect persists a failed run's exception even with persist_result=False; JSON keeps it from being a pickle.
@flow(
    name="ptq-pipeline",
    persist_result=False,
    result_serializer="json",
    validate_parameters=True,
    task_runner=pipeline_task_runner(),
)
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
    storage_block: str | None = None,
    export_block: str | None = None,
    registry: RegistryParameters = RegistryParameters(),
    repair: RepairParameters = RepairParameters(),
) -> RunSummary:
    """Sample, train, calibrate, convert and validate; fail when the quantized model is less faithful than the
    gate allows (``tasks.evaluation.fidelity``: accuracy drop, MAE rise, or SQNR against the float model, by task);
    publish a passing run to ``export``; record the run in a manifest.

    Args:
        store: fsspec URL of the artifact store (a local folder, s3://bucket/prefix, ...).
        seed: seeds sampling, training and calibration; the same seed gives a byte-identical .tflite.
        export: fsspec URL to publish a passing run to (a new version folder, then latest.json).
    """
    parameters = FlowParameters(**locals())  # first line: nothing else is local yet
    require_target_runtimes(validation.targets)
    with guarded_run(store, export, sampling, training, calibration, storage_block, export_block, registry) as run:
        dataset, calibration_sets, trained = upstream_stages(run, seed, sampling, training, calibration)
        calibration_set = calibration_sets[calibration.calibration_size]
        converted = run(convert_to_tflite, trained=trained, calibration=calibration_set, params=conversion)
        validate = functools.partial(
            run,
            validate_with_interpreter,
            dataset=dataset,
            trained=trained,
            params=validation,
            calibration=calibration_set,
            conversion=conversion,
        )
        shards = functools.partial(
            sharded_predictions, run, dataset, trained, validation=validation, ops=conversion.ops
        )
        validated = validate(converted=converted, predictions=shards(converted, "predict_test_rows"))
        verdict = check_gate(validated, gate, conversion.ops)
        repaired = None
        if verdict.status is GateStatus.failed and verdict.name in FIDELITY_GATES and repair.applies_to(conversion):
            repaired = run(
                repair_quantization,
                dataset=dataset,
                trained=trained,
                calibration=calibration_set,
                converted=converted,
                validated=validated,
                conversion=conversion,
                gate=gate.thresholds_only(),
                params=repair,
            )
            if repaired.succeeded:
                converted = ConvertedModels(
                    quantized=repaired.repaired, float_model=converted.float_model, mixed=repaired.mixed
                )
                validated = validate(
                    label="validate_repaired_model",
                    converted=converted,
                    repair=repaired,
                    predictions=shards(converted, "predict_repaired_rows"),
                )
            verdict = check_gate(validated, gate, conversion.ops, repaired)

        artifacts = {
            "dataset": dataset.manifest,
            "model": trained.model,
            "calibration": calibration_set.table,
            "tflite": converted.quantized,
            "tflite_float": converted.float_model,
            "report": validated.report,
            **validated.device_files,
            **({"tflite_unrepaired": repaired.unrepaired} if repaired is not None and repaired.succeeded else {}),
        }
        metrics = validated.figures().model_dump(mode="json")
        if repaired is not None:
            metrics["repair"] = repaired.model_dump(mode="json", exclude={"repaired", "unrepaired"})
        outcome = finish_run(run, "ptq-pipeline", parameters, dataset, artifacts, verdict, validated, metrics)
        summary = RunSummary(**dict(outcome), metrics=validated.figures(), repair=repaired)
        announce(summary, parameters)
        return summary
