"""Stage 5, validate_with_interpreter: float vs quantized accuracy with the LiteRT Interpreter, a dtype audit,
sizes, speed and per-layer error, as a typed ``ValidationReport`` written as report.json, .md and .html.

The gate that judges it is ``tasks.gate``; running ``.tflite`` models is ``tasks.interpreter``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
from prefect import get_run_logger, task

from ptqflow.storage.keras_models import keras_model_from_bytes
from ptqflow.storage.store import ArtifactStore
from ptqflow.storage.tables import read_parquet
from ptqflow.tasks.artifacts import (
    CalibrationSet,
    ConvertedModels,
    FidelityFigures,
    FloatOutputs,
    RepairResult,
    SampledDataset,
    TrainedModel,
    ValidationResult,
    WorstLayer,
)
from ptqflow.tasks.caching import StageCachePolicy
from ptqflow.tasks.device import device_footprint
from ptqflow.tasks.diagnose import layer_errors
from ptqflow.tasks.errors import secrets_kept_out
from ptqflow.tasks.feeds import model_input_slots, predict_keras
from ptqflow.tasks.fidelity import fidelity_in_words
from ptqflow.tasks.interpreter import (
    audit_tensor_types,
    keras_speed,
    predict_tflite,
    rerun_max_difference,
    tflite_speed,
)
from ptqflow.tasks.metrics import (
    accuracy,
    increase_pct,
    mean_absolute_error,
    model_metrics,
    task_figures,
    worst_sqnr,
)
from ptqflow.tasks.outputs import model_outputs
from ptqflow.tasks.parameters import ConversionParameters, ModelTask, QuantizationScheme, ValidationParameters
from ptqflow.tasks.progress import report
from ptqflow.tasks.render import render_html, render_markdown
from ptqflow.tasks.validation_report import (
    LayerError,
    ModelKind,
    ModelMetrics,
    RepairCost,
    ValidationMetrics,
    ValidationReport,
)

if TYPE_CHECKING:
    import keras


def evaluate_models(
    keras_model: keras.Model,
    float_tflite: bytes,
    quantized_tflite: bytes,
    features: np.ndarray,
    labels: np.ndarray,
    params: ValidationParameters,
    class_names: list[str] | None = None,
    measure_speed: bool = True,
    keras_outputs: np.ndarray | None = None,
    task: ModelTask = ModelTask.classification,
) -> ValidationMetrics:
    """Pure stage function: every figure of the validation report but the per-layer ones. ``keras_outputs``, the
    float Keras model's outputs on ``features`` when they are known already, saves predicting them again.

    A model with TensorFlow (Flex) ops cannot run in the Python LiteRT Interpreter: it is reported as not
    validated, with its audit, never as a pass."""

    def progress(model_name: str):
        return lambda done: report(
            "validate_with_interpreter", f"{model_name}: {done}/{len(features)} samples", done, len(features)
        )

    classification = task is ModelTask.classification
    names = (class_names or [str(i) for i in range(int(labels.max()) + 1)]) if classification else []
    num_threads = params.num_threads or os.cpu_count() or 1
    audit = audit_tensor_types(quantized_tflite)
    float_audit = audit_tensor_types(float_tflite)
    device = {
        ModelKind.float_tflite: device_footprint(float_tflite),
        ModelKind.quantized_tflite: device_footprint(quantized_tflite),
    }
    inputs = model_input_slots(keras_model)
    keras_out = (
        predict_keras(keras_model, features, params.batch_size, inputs) if keras_outputs is None else keras_outputs
    )
    layout = model_outputs(keras_model)
    float_accuracy = accuracy(keras_out, labels) if classification else None
    float_mae = mean_absolute_error(keras_out, labels) if task is ModelTask.regression else None
    common = ValidationMetrics(
        samples=int(len(labels)),
        task=task,
        class_names=names,
        float_accuracy=float_accuracy,
        float_mae=float_mae,
        float_bytes=len(float_tflite),
        quantized_bytes=len(quantized_tflite),
        size_ratio=round(len(float_tflite) / len(quantized_tflite), 4),
        num_threads=num_threads,
        audit=audit,
        validated=False,
        not_validated_reason=None,
        tflite_float_accuracy=None,
        quantized_accuracy=None,
        accuracy_drop_pp=None,
        agreement=None,
        rerun_max_difference=None,
        models={ModelKind.float_keras: model_metrics(keras_out, keras_out, labels, names, layout=layout)},
        device=device,
    )
    flex = sorted(set(audit.flex_ops) | set(float_audit.flex_ops))
    if flex:
        return common.model_copy(
            update={
                "not_validated_reason": (
                    f"the model uses TensorFlow (Flex) ops ({', '.join(flex)}), which the Python LiteRT Interpreter "
                    "cannot run: validate it on a runtime linked with the Flex delegate, or replace those ops"
                )
            }
        )
    float_out = predict_tflite(
        float_tflite, features, params.batch_size, params.num_threads, progress("float .tflite"), inputs
    )
    quant_out = predict_tflite(
        quantized_tflite, features, params.batch_size, params.num_threads, progress("quantized .tflite"), inputs
    )
    speeds = {}
    if measure_speed:
        report("validate_with_interpreter", "measuring latency and throughput")
        speeds = {
            ModelKind.float_keras: keras_speed(keras_model, features, params.batch_size, inputs=inputs),
            ModelKind.float_tflite: tflite_speed(float_tflite, features, params.batch_size, num_threads, inputs=inputs),
            ModelKind.quantized_tflite: tflite_speed(
                quantized_tflite, features, params.batch_size, num_threads, inputs=inputs
            ),
        }
    models = {
        ModelKind.float_keras: model_metrics(
            keras_out, keras_out, labels, names, None, speeds.get(ModelKind.float_keras), layout
        ),
        ModelKind.float_tflite: model_metrics(
            float_out, keras_out, labels, names, len(float_tflite), speeds.get(ModelKind.float_tflite), layout
        ),
        ModelKind.quantized_tflite: model_metrics(
            quant_out, keras_out, labels, names, len(quantized_tflite), speeds.get(ModelKind.quantized_tflite), layout
        ),
    }
    quantized = models[ModelKind.quantized_tflite]
    return common.model_copy(
        update={
            "validated": True,
            "tflite_float_accuracy": models[ModelKind.float_tflite].accuracy,
            "quantized_accuracy": quantized.accuracy,
            "accuracy_drop_pp": round((float_accuracy - quantized.accuracy) * 100, 6)
            if float_accuracy is not None and quantized.accuracy is not None
            else None,
            "agreement": quantized.agreement_with_float,
            "tflite_float_mae": models[ModelKind.float_tflite].mae,
            "quantized_mae": quantized.mae,
            "mae_increase_pct": increase_pct(float_mae, quantized.mae)
            if float_mae is not None and quantized.mae is not None
            else None,
            "sqnr_db": worst_sqnr(quantized.outputs),
            "outputs": quantized.outputs,
            "rerun_max_difference": rerun_max_difference(
                quantized_tflite, features, quant_out, params.batch_size, params.num_threads, inputs
            ),
            "models": models,
        }
    )


def per_layer_errors(
    keras_model: keras.Model, calibration: np.ndarray, options: ConversionParameters, batch_size: int
) -> tuple[list[LayerError], str | None]:
    """The debugger's per-layer figures for this conversion, or why there are none."""

    def batches():
        for start in range(0, len(calibration), batch_size):
            yield calibration[start : start + batch_size]

    try:
        return layer_errors(keras_model, batches, calibration, options), None
    except Exception as error:  # the debugger's failures are the converter's (e.g. Flex ops): report, not fail
        return [], f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]


@task(
    name="validate_with_interpreter",
    cache_policy=StageCachePolicy(module=__name__),
    persist_result=True,
    result_serializer="json",
)
@secrets_kept_out()
def validate_with_interpreter(
    store_url: str,
    dataset: SampledDataset,
    trained: TrainedModel,
    converted: ConvertedModels,
    params: ValidationParameters,
    calibration: CalibrationSet | None = None,
    conversion: ConversionParameters | None = None,
    repair: RepairResult | None = None,
    float_outputs: FloatOutputs | None = None,
) -> ValidationResult:
    """Evaluate the three models on the test split; with the calibration set and conversion options, also the
    per-layer quantization error; with a repair, the cost of what it kept in float. Writes report.json, .md and
    .html to the store. ``float_outputs``: the Keras model's outputs on this test split, if a stage (the sweep's)
    predicted them already."""
    store = ArtifactStore(store_url)
    with store.open(dataset.test) as f:
        test = read_parquet(f)
    keras_model = keras_model_from_bytes(store.read_bytes(trained.model))
    if float_outputs is not None:
        with store.open(float_outputs.outputs) as f:
            keras_outputs = read_parquet(f).features
    else:  # predicted once here: the evaluation and a repair's cost both compare with them
        keras_outputs = predict_keras(keras_model, test.features, params.batch_size, dataset.spec.inputs)
    metrics = evaluate_models(
        keras_model,
        store.read_bytes(converted.float_model),
        store.read_bytes(converted.quantized),
        test.features,
        test.labels,
        params,
        class_names=list(dataset.spec.class_names),
        keras_outputs=keras_outputs,
        task=dataset.spec.task,
    )
    layers: list[LayerError] = []
    layers_unavailable: str | None = "no calibration set given"
    if conversion is not None and conversion.scheme is not QuantizationScheme.full_integer:
        layers_unavailable = f"measured for full-integer quantization only (this model: {conversion.scheme.value})"
    elif calibration is not None and conversion is not None:
        report("validate_with_interpreter", "per-layer quantization error (QuantizationDebugger)")
        with store.open(calibration.table) as f:
            calibration_features = read_parquet(f).features
        layers, layers_unavailable = per_layer_errors(keras_model, calibration_features, conversion, 64)
    metrics = metrics.model_copy(update={"layers": layers, "layers_unavailable": layers_unavailable})
    if repair is not None:
        metrics = metrics.model_copy(
            update={
                "repair": repair_cost(
                    repair, store, keras_model, keras_outputs, test.features, test.labels, params, metrics
                )
            }
        )
    document = ValidationReport(
        dataset=dataset.manifest,
        model=trained.model,
        quantized_model=converted.quantized,
        float_tflite=converted.float_model,
        conversion=conversion.model_dump(mode="json") if conversion else None,
        metrics=metrics,
    )
    report_ref = store.put_json(document.model_dump(mode="json"))
    report("validate_with_interpreter", "writing report.md and report.html")
    markdown_ref = store.put_bytes(render_markdown(document).encode(), ".md")
    html_ref = store.put_bytes(render_html(document).encode(), ".html")
    logger = get_run_logger()
    if metrics.validated:
        logger.info("%s; full integer: %s", fidelity_in_words(metrics), metrics.audit.full_integer)
    else:
        logger.warning("not validated: %s", metrics.not_validated_reason)
    return ValidationResult(
        report=report_ref,
        report_md=markdown_ref,
        report_html=html_ref,
        validated=metrics.validated,
        not_validated_reason=metrics.not_validated_reason,
        float_tensors=tuple(metrics.audit.float_tensors),
        full_integer=metrics.audit.full_integer,
        worst_layers=tuple(
            WorstLayer(layer=layer.layer, op=layer.op, tensor=layer.tensor, badness=layer.badness)
            for layer in layers[:5]
        ),
        **metrics.model_dump(include=set(FidelityFigures.model_fields)),
        float_accuracy=metrics.float_accuracy,
        tflite_float_accuracy=metrics.tflite_float_accuracy,
        quantized_accuracy=metrics.quantized_accuracy,
        accuracy_drop_pp=metrics.accuracy_drop_pp,
        agreement=metrics.agreement,
        float_bytes=metrics.float_bytes,
        quantized_bytes=metrics.quantized_bytes,
        arena_bytes=metrics.device[ModelKind.quantized_tflite].arena_bytes
        if ModelKind.quantized_tflite in metrics.device
        else None,
        rerun_max_difference=metrics.rerun_max_difference,
    )


def repair_cost(
    repair: RepairResult,
    store: ArtifactStore,
    keras_model: keras.Model,
    keras_outputs: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray,
    params: ValidationParameters,
    metrics: ValidationMetrics,
) -> RepairCost:
    """What keeping layers in float cost and gained: the task's figure, size and latency of the repaired model
    against the fully quantized one, on the test split (``keras_outputs``: the float model's there)."""
    num_threads = params.num_threads or os.cpu_count() or 1
    unrepaired = store.read_bytes(repair.unrepaired)
    inputs = model_input_slots(keras_model)
    unrepaired_speed = tflite_speed(unrepaired, features, params.batch_size, num_threads, inputs=inputs)
    repaired: ModelMetrics | None = metrics.models.get(ModelKind.quantized_tflite)
    unrepaired_figures = task_figures(
        metrics.task,
        keras_outputs,
        predict_tflite(unrepaired, features, params.batch_size, num_threads, inputs=inputs),
        labels,
        model_outputs(keras_model),
    )
    return RepairCost(
        **repair.model_dump(mode="json", exclude={"repaired", "unrepaired"}),
        unrepaired_accuracy=unrepaired_figures.quantized_accuracy,
        repaired_accuracy=metrics.quantized_accuracy,
        unrepaired_fidelity=fidelity_in_words(unrepaired_figures),
        repaired_fidelity=fidelity_in_words(metrics),
        unrepaired_model=repair.unrepaired,
        unrepaired_bytes=len(unrepaired),
        repaired_bytes=metrics.quantized_bytes,
        unrepaired_latency_ms_p50=unrepaired_speed.latency_ms.p50,
        repaired_latency_ms_p50=repaired.speed.latency_ms.p50 if repaired and repaired.speed else None,
    )
