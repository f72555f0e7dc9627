"""Repair after a failed gate: keep the worst layers in float, one more at a time, until the quantized model passes
its task's gate on the validation split (accuracy drop, MAE rise, or SQNR against float) or the limit of float
layers is reached.

The choice is made on the validation split, not the test split, so the gate's final verdict (on the test split,
by the validation stage) is not tuned on the data that judges it. Only ``--ops builtins`` allows it: with
``TFLITE_BUILTINS_INT8`` every op must be integer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ptqflow.tasks.core.artifacts import RepairStep
from ptqflow.tasks.core.parameters import ConversionParameters, GateParameters, ModelTask
from ptqflow.tasks.core.progress import report
from ptqflow.tasks.core.validation_report import LayerError, ranking_margin
from ptqflow.tasks.evaluation.diagnose import float_unit, keras_layer_of, layer_names, quantize_keeping_float
from ptqflow.tasks.evaluation.fidelity import judge_fidelity
from ptqflow.tasks.evaluation.interpreter import predict_tflite, refused_rows
from ptqflow.tasks.evaluation.metrics import task_figures
from ptqflow.tasks.models.feeds import model_input_slots, predict_keras
from ptqflow.tasks.models.outputs import model_outputs
from ptqflow.tasks.quantization.converter import CalibrationBatches

if TYPE_CHECKING:
    import keras

WORSE_THAN_ROUNDING = 1.0  # layers at or below this badness lose no more than rounding does: never worth float


def keep_worst_layers_float(
    model: keras.Model,
    calibration_batches: CalibrationBatches,
    debug_features: np.ndarray,
    options: ConversionParameters,
    quantized_tflite: bytes,
    ranked: list[LayerError],
    validation_features: np.ndarray,
    validation_labels: np.ndarray,
    gate: GateParameters,
    max_float_layers: int,
    task: ModelTask = ModelTask.classification,
) -> tuple[bytes | None, list[RepairStep], str]:
    """Pure function: the first selectively quantized model, keeping 1, 2, ... of the ``ranked`` layers in float
    (each with its output's consumers, so that its output is never requantized), that passes the task's gate on the
    validation split (``tasks.evaluation.fidelity``); None if none within ``max_float_layers``. Returns the model, every
    step, and a message."""
    inputs = model_input_slots(model)
    float_outputs = predict_keras(model, validation_features, inputs=inputs)
    layout = model_outputs(model)
    candidates = [layer for layer in ranked if layer.badness > WORSE_THAN_ROUNDING][:max_float_layers]
    if not candidates:
        return None, [], "repair found no layer worse than plain rounding to keep in float"
    margin = ranking_margin(ranked)
    order = f" ({margin})" if margin else ""
    names, nested = layer_names(model)
    float_tensors: list[str] = []
    steps: list[RepairStep] = []
    for layer in candidates:
        if layer.tensor in float_tensors:
            continue
        float_tensors += [t for t in float_unit(quantized_tflite, layer.tensor) if t not in float_tensors]
        report("repair_quantization", f"keeping {len(steps) + 1} layer(s) in float: {layer.layer}")
        candidate = quantize_keeping_float(model, calibration_batches, debug_features, options, float_tensors)
        outputs = predict_tflite(candidate, validation_features, inputs=inputs, failures=[])
        ran = ~refused_rows(outputs)  # judged, as validation is, on the samples it can run
        figures = task_figures(task, float_outputs[ran], outputs[ran], validation_labels[ran], layout)
        verdict = judge_fidelity(figures, gate)
        if verdict is None:  # the figures are computed just above: never missing
            raise ValueError(f"no {task.value} figures for a repair candidate")
        float_layers = tuple(dict.fromkeys(keras_layer_of(t, names, nested) for t in float_tensors))
        steps.append(
            RepairStep(
                layer=layer.layer,
                float_layers=float_layers,
                float_tensors=tuple(float_tensors),
                validation_drop_pp=figures.accuracy_drop_pp,
                validation=verdict.figure,
                quantized_bytes=len(candidate),
            )
        )
        if verdict.passed:
            return (
                candidate,
                steps,
                f"repair kept {_kept(steps)} in float: validation {verdict.figure}, within the gate ({verdict.limit})"
                + order,
            )
    return (
        None,
        steps,
        f"repair kept {_kept(steps)} in float and the validation figure is still {steps[-1].validation}" + order,
    )


def _kept(steps: list[RepairStep]) -> str:
    chosen = [step.layer for step in steps]
    readers = [name for name in steps[-1].float_layers if name not in chosen]
    return ", ".join(chosen) + (f" (with {', '.join(readers)}, which read its output)" if readers else "")
