"""The ``ptq-sweep`` flow: one trained model converted under a grid of quantization configurations, each one
evaluated, all ranked side by side; the best that passes the gate is validated in full and can be exported.

Conversions and evaluations fan out on the flow's task runner, prefect-dask's ``DaskTaskRunner``: a LocalCluster
of single-threaded worker processes by default, or an existing cluster (``PTQFLOW_DASK_ADDRESS``,
``ptqflow sweep --dask-address``). Workers share nothing but the artifact store: every stage takes references and
writes its artifacts there. Sampling, calibration and training are the pipeline's own stages, so their cached
results are reused.
"""

# No `from __future__ import annotations` here: Prefect builds the flow's parameter model from the signature.
from collections.abc import Sequence
from typing import Any

from prefect import flow
from prefect.futures import as_completed

from ptqflow.flows.cluster import dask_task_runner
from ptqflow.flows.lifecycle import FlowParameters, announce, finish_run, guarded_run, upstream_stages
from ptqflow.flows.stages import StageRunner, Submitted
from ptqflow.storage.store import DEFAULT_STORE
from ptqflow.tasks.core.artifacts import (
    CalibrationSet,
    ConvertedModels,
    FloatOutputs,
    SampledDataset,
    TrainedModel,
    ValidationResult,
)
from ptqflow.tasks.core.errors import ConversionFailed
from ptqflow.tasks.core.installation import require_target_runtimes
from ptqflow.tasks.core.parameters import (
    CalibrationParameters,
    DeviceTarget,
    GateParameters,
    QuantizationScheme,
    RegistryParameters,
    SamplingParameters,
    SweepParameters,
    TrainingParameters,
    ValidationParameters,
)
from ptqflow.tasks.core.progress import report
from ptqflow.tasks.evaluation.gate import check_gate
from ptqflow.tasks.release.outcome import SweepSummary
from ptqflow.tasks.stages.report import write_sweep_report
from ptqflow.tasks.stages.sweep import (
    convert_float_reference,
    evaluate_configuration,
    predict_float_outputs,
    quantize_configuration,
)
from ptqflow.tasks.stages.validate import validate_with_interpreter
from ptqflow.tasks.sweep.grid import FLOAT_REFERENCE, SweepConfiguration, select_configurations, sweep_grid
from ptqflow.tasks.sweep.ranking import SweepRow, configuration_row, judge, no_configuration_passed, rank, reference_row
from ptqflow.tasks.views.render import sweep_markdown


def evaluate_grid(
    run: StageRunner,
    grid: Sequence[SweepConfiguration],
    dataset: SampledDataset,
    trained: TrainedModel,
    calibration_sets: dict[int, CalibrationSet],
    batch_size: int,
    latency_threads: int,
    devices: ValidationParameters | None = None,
) -> tuple[list[SweepRow], FloatOutputs]:
    """Convert under every configuration, and evaluate each model as soon as its conversion is done, all on the
    task runner. A configuration the converter refuses becomes a row with the converter's message. Returns the
    rows, the float reference first, and the float Keras model's outputs every model was compared with. With
    ``devices``, each quantized configuration is also measured on its device targets."""
    # The float model's outputs, which every evaluation compares with: predicted once, first in the queue.
    float_outputs = run.submit(predict_float_outputs, dataset=dataset, trained=trained, batch_size=batch_size)
    conversions: dict[str, Submitted] = {
        FLOAT_REFERENCE: run.submit(convert_float_reference, label=f"convert[{FLOAT_REFERENCE}]", trained=trained)
    }
    # Longest first, so that no long evaluation is left for last while the other workers idle: int16x8 models run
    # on the interpreter's reference kernels, several times slower than int8 (7 s against 1 s for MobileNetV2).
    for configuration in sorted(grid, key=lambda c: c.conversion.scheme is not QuantizationScheme.int16x8):
        conversions[configuration.name] = run.submit(
            quantize_configuration,
            label=f"convert[{configuration.name}]",
            trained=trained,
            calibration=calibration_sets[configuration.calibration_size] if configuration.calibration_size else None,
            params=configuration.conversion,
        )
    names = {submitted.future: name for name, submitted in conversions.items()}
    evaluations: dict[str, Submitted] = {}
    errors: dict[str, str] = {}
    reference = run.collect(float_outputs)  # done before the first conversion: it is shorter and went first
    for future in as_completed(list(names)):
        name = names[future]
        try:
            candidate = run.collect(conversions[name])
        except ConversionFailed as error:
            errors[name] = str(error)
            continue
        evaluations[name] = run.submit(
            evaluate_configuration,
            label=f"evaluate[{name}]",
            dataset=dataset,
            reference=reference,
            candidate=candidate,
            batch_size=batch_size,
            num_threads=latency_threads,
            outputs=trained.outputs,
            **({"devices": devices} if devices is not None and name != FLOAT_REFERENCE else {}),
        )
    total = len(evaluations)
    results = {}
    for done, (name, submitted) in enumerate(evaluations.items(), 1):
        results[name] = run.collect(submitted)
        report("ptq-sweep", f"{done}/{total} configurations evaluated", done, total)
    if FLOAT_REFERENCE in errors:
        raise ConversionFailed(f"the float reference could not be converted: {errors[FLOAT_REFERENCE]}")
    rows = [reference_row(results[FLOAT_REFERENCE])] + [
        configuration_row(c, results.get(c.name), errors.get(c.name)) for c in grid
    ]
    return rows, reference


# The bound on the whole sweep, training included (stages on Dask workers cannot be stopped one by one).
SWEEP_TIMEOUT_SECONDS = 12 * 3600.0


@flow(
    name="ptq-sweep",
    persist_result=False,
    result_serializer="json",
    validate_parameters=True,
    task_runner=dask_task_runner(),
    timeout_seconds=SWEEP_TIMEOUT_SECONDS,
)
def ptq_sweep(
    store: str = DEFAULT_STORE,
    seed: int = 0,
    sampling: SamplingParameters = SamplingParameters(),
    training: TrainingParameters = TrainingParameters(),
    calibration: CalibrationParameters = CalibrationParameters(),
    validation: ValidationParameters = ValidationParameters(),
    gate: GateParameters = GateParameters(),
    sweep: SweepParameters = SweepParameters(),
    export: str | None = None,
    storage_block: str | None = None,
    export_block: str | None = None,
    registry: RegistryParameters = RegistryParameters(),
) -> SweepSummary:
    """Convert one trained model under every configuration of the sweep, evaluate and rank them; validate the best
    that passes the gate in full, and publish it to ``export``.

    Args:
        store: fsspec URL of the artifact store, shared by the flow and every Dask worker.
        seed: seeds sampling, training and calibration, as in ptq-pipeline (whose cached stages are reused).
        export: fsspec URL to publish the best passing configuration to (a new version folder, then latest.json).
    """
    parameters = FlowParameters(**locals())  # first line: nothing else is local yet
    grid = select_configurations(
        sweep_grid(calibration.calibration_size, sweep.calibration_sizes), sweep.configurations
    )
    require_target_runtimes(validation.targets)
    with guarded_run(store, export, sampling, training, calibration, storage_block, export_block, registry) as run:
        sizes = {c.calibration_size for c in grid if c.calibration_size is not None}
        dataset, calibration_sets, trained = upstream_stages(run, seed, sampling, training, calibration, sorted(sizes))
        rows, float_outputs = evaluate_grid(
            run,
            grid,
            dataset,
            trained,
            calibration_sets,
            validation.batch_size,
            sweep.latency_threads,
            validation if validation.targets != (DeviceTarget.litert,) else None,
        )
        rows = rank([judge(r, gate, sweep.require_full_integer) for r in rows], sweep.ranking)
        best = next((r for r in rows if r.passed), None)
        table = sweep_markdown(rows, sweep.ranking, gate, sampling.task, best.name if best else None)
        document = sweep_document(rows, sweep, gate, best)
        sweep_report = run.effect(write_sweep_report, document=document, markdown=table)
        artifacts = {"dataset": dataset.manifest, "model": trained.model, **sweep_report.artifacts()}
        verdict = no_configuration_passed(rows, gate, sampling.task)
        validated = None
        if best is not None:
            validated, calibration_set, chosen = validate_best(
                run, grid, rows, best, dataset, trained, calibration_sets, calibration, validation, float_outputs
            )
            verdict = check_gate(validated, gate, chosen.conversion.ops)
            verdict = verdict.model_copy(update={"message": f"best configuration {best.name}: {verdict.message}"})
            artifacts.update(
                calibration=calibration_set.table,
                tflite=best.measured().model,
                tflite_float=next(r for r in rows if r.reference).measured().model,
                report=validated.report,
                **validated.device_files,
            )
        metrics = {"sweep": document["rows"], "best": document["best"]}
        if validated is not None:
            metrics.update(validated.figures().model_dump(mode="json"))
        outcome = finish_run(run, "ptq-sweep", parameters, dataset, artifacts, verdict, validated, metrics)
        summary = SweepSummary(
            **dict(outcome),
            best=best.name if best else None,
            rank_by=sweep.ranking.value,
            rows=rows,
            report=sweep_report,
            metrics=validated.figures() if validated else None,
        )
        announce(summary, parameters, table)
        return summary


def sweep_document(
    rows: Sequence[SweepRow], sweep: SweepParameters, gate: GateParameters, best: SweepRow | None
) -> dict[str, Any]:
    """sweep.json: every row, ranked, with what ranked and judged them."""
    return {
        "kind": "ptqflow.sweep_report",
        "report_version": 1,
        "rank_by": sweep.ranking.value,
        "max_accuracy_drop_pp": gate.max_accuracy_drop,
        "gate": gate.model_dump(mode="json"),
        "require_full_integer": sweep.require_full_integer,
        "best": best.name if best else None,
        "rows": [r.model_dump(mode="json") for r in rows],
    }


def validate_best(
    run: StageRunner,
    grid: Sequence[SweepConfiguration],
    rows: Sequence[SweepRow],
    best: SweepRow,
    dataset: SampledDataset,
    trained: TrainedModel,
    calibration_sets: dict[int, CalibrationSet],
    calibration: CalibrationParameters,
    validation: ValidationParameters,
    float_outputs: FloatOutputs,
) -> tuple[ValidationResult, CalibrationSet, SweepConfiguration]:
    """The pipeline's full validation of the best configuration (three models, per-layer error, the HTML report):
    what is exported is judged by it. Its models are the sweep's own, not converted again."""
    chosen = next(c for c in grid if c.name == best.name)
    calibration_set = calibration_sets[chosen.calibration_size or calibration.calibration_size]
    reference = next(r for r in rows if r.reference)
    validated = run(
        validate_with_interpreter,
        dataset=dataset,
        trained=trained,
        converted=ConvertedModels(quantized=best.measured().model, float_model=reference.measured().model),
        params=validation,
        calibration=calibration_set,
        conversion=chosen.conversion,
        float_outputs=float_outputs,
    )
    return validated, calibration_set, chosen
