"""What the validation stage (``tasks.stages.validate``) measures: float vs quantized figures with the LiteRT
Interpreter, a dtype audit, sizes, speed and per-layer error, as a typed ``ValidationReport``.

The gate that judges it is ``tasks.evaluation.gate``; running ``.tflite`` models is ``tasks.evaluation.interpreter``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ptqflow.storage.store import ArtifactStore
from ptqflow.storage.tables import InputSlot
from ptqflow.tasks.core.artifacts import MixedPrecisionChoice, ModelOutput, RepairResult, TflmFigures
from ptqflow.tasks.core.parameters import ConversionParameters, DeviceTarget, ModelTask, ValidationParameters
from ptqflow.tasks.core.progress import report
from ptqflow.tasks.core.validation_report import (
    LayerError,
    MixedPrecisionCost,
    ModelKind,
    ModelMetrics,
    RepairCost,
    ValidationMetrics,
)
from ptqflow.tasks.evaluation.device import device_footprint
from ptqflow.tasks.evaluation.diagnose import layer_errors
from ptqflow.tasks.evaluation.fidelity import TaskFigures, fidelity_in_words, refusals
from ptqflow.tasks.evaluation.interpreter import (
    RowFailure,
    audit_tensor_types,
    keras_speed,
    predict_tflite,
    refused_rows,
    rerun_max_difference,
    tflite_speed,
    unrunnable_samples,
)
from ptqflow.tasks.evaluation.metrics import (
    accuracy,
    increase_pct,
    mean_absolute_error,
    model_metrics,
    task_figures,
    worst_sqnr,
)
from ptqflow.tasks.evaluation.tflm import TflmRows, tflm_figures
from ptqflow.tasks.evaluation.vela import VelaCompilation, compile_for_npu
from ptqflow.tasks.models.feeds import model_input_slots, predict_keras
from ptqflow.tasks.models.outputs import model_outputs

if TYPE_CHECKING:
    import keras

    from ptqflow.tasks.evaluation.shards import Predictions


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
    predictions: Predictions | None = None,
) -> ValidationMetrics:
    """Pure stage function: every figure of the validation report but the per-layer ones. ``keras_outputs``, the
    float Keras model's outputs on ``features`` when they are known already, saves predicting them again;
    ``predictions``, all three models' (``tasks.evaluation.shards``, made elsewhere), saves predicting at all.

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
    if predictions is not None:
        keras_outputs = predictions.keras
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
    refused: dict[ModelKind, list[RowFailure]] = {ModelKind.float_tflite: [], ModelKind.quantized_tflite: []}
    if predictions is not None:
        float_out, quant_out = predictions.float_tflite, predictions.quantized_tflite
        refused[ModelKind.float_tflite] += predictions.float_refused
        refused[ModelKind.quantized_tflite] += predictions.quantized_refused
    else:
        float_out = predict_tflite(
            float_tflite,
            features,
            params.batch_size,
            params.num_threads,
            progress("float .tflite"),
            inputs,
            refused[ModelKind.float_tflite],
        )
        quant_out = predict_tflite(
            quantized_tflite,
            features,
            params.batch_size,
            params.num_threads,
            progress("quantized .tflite"),
            inputs,
            refused[ModelKind.quantized_tflite],
        )
    unrunnable = tuple(
        found
        for kind, rows in refused.items()
        if (found := unrunnable_samples(kind.value, rows, len(features))) is not None
    )
    if unrunnable:
        # Judged on the rows every model ran; the gate weighs the others (--max-unrunnable-fraction).
        ran = ~(refused_rows(float_out) | refused_rows(quant_out))
        common = common.model_copy(update={"unrunnable": unrunnable, "unrunnable_rows": int((~ran).sum())})
        if not ran.any():
            return common.model_copy(
                update={"not_validated_reason": f"no test sample ran on both .tflite models: {refusals(common)}"}
            )
        features, labels, keras_out = features[ran], labels[ran], keras_out[ran]
        float_out, quant_out = float_out[ran], quant_out[ran]
        float_accuracy = accuracy(keras_out, labels) if classification else None
        float_mae = mean_absolute_error(keras_out, labels) if task is ModelTask.regression else None
        common = common.model_copy(
            update={"samples": int(len(labels)), "float_accuracy": float_accuracy, "float_mae": float_mae}
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


def measure_on_targets(
    quantized_tflite: bytes,
    features: np.ndarray,
    labels: np.ndarray,
    keras_outputs: np.ndarray,
    params: ValidationParameters,
    task: ModelTask,
    layout: tuple[ModelOutput, ...] = (),
    inputs: tuple[InputSlot, ...] = (),
    tflm_ran: TflmRows | None = None,
) -> tuple[TflmFigures | None, list[VelaCompilation]]:
    """The quantized model on each device target the run names besides LiteRT: run by TFLite Micro on the test
    split (``tasks.evaluation.tflm``; ``tflm_ran``: its outputs, when the flow ran it shard by shard), compiled by
    Vela for each Ethos-U (``tasks.evaluation.vela``)."""
    tflm = None
    if DeviceTarget.tflm in params.targets:
        report("validate_with_interpreter", "running the test split on TensorFlow Lite Micro")
        tflm = tflm_figures(
            quantized_tflite, features, labels, keras_outputs, task, layout, inputs, params.tflm_samples, tflm_ran
        )
    compilations = []
    for target in params.npu_targets:
        report("validate_with_interpreter", f"compiling for {target.value} with Vela")
        compilations.append(
            compile_for_npu(quantized_tflite, target, params.vela_system_config, params.vela_memory_mode)
        )
    return tflm, compilations


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


REFUSED_EVERYTHING = "refused every test sample"


@dataclass(frozen=True)
class Judged:
    """Another ``.tflite`` judged as validation judges the shipped one: on the test samples it can run."""

    figures: TaskFigures | None  # None: it refused every sample
    latency_ms_p50: float | None

    @property
    def fidelity(self) -> str:
        return fidelity_in_words(self.figures) if self.figures is not None else REFUSED_EVERYTHING


def judged(
    model_bytes: bytes,
    keras_model: keras.Model,
    keras_outputs: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray,
    params: ValidationParameters,
    task: ModelTask,
) -> Judged:
    """``model_bytes``'s task figures against the float model (``keras_outputs``) and its latency, both on the
    samples it can run (timing a refused sample would raise)."""
    num_threads = params.num_threads or os.cpu_count() or 1
    inputs = model_input_slots(keras_model)
    outputs = predict_tflite(model_bytes, features, params.batch_size, num_threads, inputs=inputs, failures=[])
    ran = ~refused_rows(outputs)
    if not ran.any():
        return Judged(None, None)
    speed = tflite_speed(model_bytes, features[ran], params.batch_size, num_threads, inputs=inputs)
    figures = task_figures(task, keras_outputs[ran], outputs[ran], labels[ran], model_outputs(keras_model))
    return Judged(figures, speed.latency_ms.p50)


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
    unrepaired = store.read_bytes(repair.unrepaired)
    before = judged(unrepaired, keras_model, keras_outputs, features, labels, params, metrics.task)
    repaired: ModelMetrics | None = metrics.models.get(ModelKind.quantized_tflite)
    return RepairCost(
        **repair.model_dump(mode="json", exclude={"repaired", "unrepaired", "mixed"}),
        unrepaired_accuracy=before.figures.quantized_accuracy if before.figures is not None else None,
        repaired_accuracy=metrics.quantized_accuracy,
        unrepaired_fidelity=before.fidelity,
        repaired_fidelity=fidelity_in_words(metrics),
        unrepaired_model=repair.unrepaired,
        unrepaired_bytes=len(unrepaired),
        repaired_bytes=metrics.quantized_bytes,
        unrepaired_latency_ms_p50=before.latency_ms_p50,
        repaired_latency_ms_p50=repaired.speed.latency_ms.p50 if repaired and repaired.speed else None,
    )


def mixed_cost(
    choice: MixedPrecisionChoice,
    store: ArtifactStore,
    keras_model: keras.Model,
    keras_outputs: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray,
    params: ValidationParameters,
    metrics: ValidationMetrics,
    mixed_bytes: bytes,
) -> MixedPrecisionCost:
    """What scheme mixed16's int16 layers cost and gained against the all-int8 model the search started from:
    fidelity and latency on the test split (``keras_outputs``: the float model's there), and the arena TFLM's own
    allocator records for each file."""
    from ptqflow.tasks.evaluation.tflm import TflmCannotRun, recorded_arena

    int8_bytes = store.read_bytes(choice.int8_model)
    int8 = judged(int8_bytes, keras_model, keras_outputs, features, labels, params, metrics.task)
    arenas: list[int | None] = [None, None]
    unavailable = None
    try:
        arenas = [recorded_arena(model).recorded_bytes for model in (int8_bytes, mixed_bytes)]
    except ImportError:
        unavailable = "TensorFlow Lite Micro is not installed here (its wheel is for Linux x86-64)"
    except TflmCannotRun as error:
        unavailable = f"TFLM cannot allocate the model: {error}"
    mixed = metrics.models.get(ModelKind.quantized_tflite)
    return MixedPrecisionCost(
        choice=choice,
        int8_fidelity=int8.fidelity,
        mixed_fidelity=fidelity_in_words(metrics),
        int8_bytes=len(int8_bytes),
        mixed_bytes=len(mixed_bytes),
        int8_latency_ms_p50=int8.latency_ms_p50,
        mixed_latency_ms_p50=mixed.speed.latency_ms.p50 if mixed and mixed.speed else None,
        int8_arena_bytes=arenas[0],
        mixed_arena_bytes=arenas[1],
        arena_unavailable=unavailable,
    )
