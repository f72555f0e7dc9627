"""Why a quantized model lost accuracy, and the repair: per-layer error from TensorFlow's
``tf.lite.experimental.QuantizationDebugger``, and selective quantization that keeps the worst layers in float.

Two figures per quantized tensor, both in units of that tensor's quantization step (its scale):

* ``rmse_over_scale``: the layer's error against its float result. Pure rounding of a well-resolved tensor gives
  1/sqrt(12) = 0.29 (TensorFlow's debugging guide flags layers above about 0.7).
* ``typical_steps``: the median non-zero float activation, in steps. Below 1, most activations round to zero or
  one step: the tensor's range is dominated by outliers and the quantized layer has almost no resolution left.
  Its own rounding error can look small while every consumer gets garbage, which is why both figures are kept.

``badness`` = max(rmse_over_scale * sqrt(12), 1 / typical_steps): 1 is as good as rounding gets; the report
ranks layers by it and repair keeps them in float in that order.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Collection, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ptqflow.tasks.core.errors import ConversionFailed
from ptqflow.tasks.core.installation import NEWEST_TENSORFLOW, OLDEST_TENSORFLOW, missing_private_api
from ptqflow.tasks.core.native import native_output_silenced
from ptqflow.tasks.core.parameters import ConversionParameters, TensorType
from ptqflow.tasks.core.validation_report import LayerError
from ptqflow.tasks.evaluation.interpreter import make_interpreter
from ptqflow.tasks.models.feeds import input_parts, model_input_slots, signature_input_name
from ptqflow.tasks.quantization.converter import CalibrationBatches, quantization_converter, tf_dtype

if TYPE_CHECKING:
    import keras

UNIFORM_ROUNDING_RMSE = 1 / math.sqrt(12)
FIXED_RANGE_OPS = {"SOFTMAX", "LOGISTIC", "TANH", "LOG_SOFTMAX"}
DEBUG_SAMPLES = 64  # the debugger runs one sample per invocation; 64 settle its statistics for small layers


def _typical_steps(
    float_values: Sequence[np.ndarray], quantized: Sequence[np.ndarray], scale: float, zero_point: int
) -> float:
    values = np.abs(np.concatenate([np.ravel(v) for v in float_values])) if len(float_values) else np.zeros(0)
    nonzero = values[values > 0]
    if not len(nonzero) or not scale:
        return math.inf
    return float(np.median(nonzero) / scale)


def layer_names(model: keras.Model) -> tuple[list[str], set[str]]:
    """Every layer's name, those inside nested models too (a model behind ``--input-scale`` is one), and the
    names of the nested models themselves, ``model``'s own among them: the converter sees it nested in its batch-1
    model (``tasks.quantization.converter.batch_one``)."""
    names, nested = _nested_layer_names(model)
    return [model.name, *names], {model.name, *nested}


def _nested_layer_names(model: keras.Model) -> tuple[list[str], set[str]]:
    import keras

    names: list[str] = []
    nested: set[str] = set()
    for layer in model.layers:
        names.append(layer.name)
        if isinstance(layer, keras.Model):
            nested.add(layer.name)
            inner, inner_nested = _nested_layer_names(layer)
            names += inner
            nested |= inner_nested
    return names, nested


def keras_layer_of(tensor_name: str, layer_names: Sequence[str], nested: Collection[str] = ()) -> str:
    """The Keras layer a converted tensor comes from: the converter names tensors ``model/layer_N/Op;...``, and
    ``model/inner_N/layer_N/Op`` inside a nested model (``nested``: such models' names)."""
    for part in tensor_name.split(";"):
        for scope in part.split("/")[1:]:
            candidate = re.sub(r"_\d+$", "", scope)
            name = candidate if candidate in layer_names else scope if scope in layer_names else None
            if name is None:
                break
            if name not in nested:
                return name
    # The model's output tensor is named after the traced function, not a layer.
    return "model output" if tensor_name.startswith("StatefulPartitionedCall") else tensor_name.split(";")[0]


def _debugger(
    model: keras.Model,
    calibration_batches: CalibrationBatches,
    debug_features: np.ndarray,
    options: ConversionParameters,
    float_tensors: Sequence[str] = (),
    with_metrics: bool = False,
):
    import tensorflow as tf

    if not hasattr(tf.lite.experimental, "QuantizationDebugger"):  # experimental: may move in a later release
        raise ConversionFailed(
            missing_private_api(
                "tf.lite.experimental.QuantizationDebugger (per-layer error and repair)",
                f"TensorFlow {OLDEST_TENSORFLOW} to {NEWEST_TENSORFLOW}",
            )
        )

    inputs = model_input_slots(model)
    # The debugger sets its inputs from a list in its model's input order, which is not the Keras model's: known
    # once it has converted, so read then (by each input's signature name).
    order: list[int] = []

    def debug_dataset() -> Iterator[list[np.ndarray]]:
        for sample in debug_features[:DEBUG_SAMPLES]:
            parts = input_parts(sample[np.newaxis].astype(np.float32), inputs)
            yield [parts[i] for i in order] if inputs else parts

    debug_options = tf.lite.experimental.QuantizationDebugOptions(
        layer_direct_compare_metrics={"typical_steps": _typical_steps} if with_metrics else None,
        denylisted_nodes=list(float_tensors) or None,
    )
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=quantization_converter(model, calibration_batches, options),
        debug_dataset=debug_dataset,
        debug_options=debug_options,
    )
    if inputs:
        names = [slot.name for slot in inputs]
        # The debugger's own interpreter (no public accessor): the one its _set_input_tensors feeds.
        details = debugger._quant_interpreter.get_input_details()
        order.extend(names.index(signature_input_name(d["name"])) for d in details)
    return debugger


def layer_errors(
    model: keras.Model,
    calibration_batches: CalibrationBatches,
    debug_features: np.ndarray,
    options: ConversionParameters,
) -> list[LayerError]:
    """Pure function: every quantized layer's error for this conversion, worst first."""
    with native_output_silenced():
        debugger = _debugger(model, calibration_batches, debug_features, options, with_metrics=True)
        debugger.run()
        dump = io.StringIO()
        debugger.layer_statistics_dump(dump)
    dump.seek(0)
    names, nested = layer_names(model)
    errors = []
    for row in csv.DictReader(dump):
        scale = float(row["scale"])
        rmse_over_scale = math.sqrt(max(float(row["mean_squared_error"]), 0.0)) / scale if scale else 0.0
        # These ops' output ranges are fixed by the op (softmax: 1/256 steps over 0..1), not by calibration, so
        # their resolution says nothing about the model: only their error counts.
        steps = math.inf if row["op_name"] in FIXED_RANGE_OPS else float(row["typical_steps"])
        errors.append(
            LayerError(
                layer=keras_layer_of(row["tensor_name"], names, nested),
                op=row["op_name"],
                tensor=row["tensor_name"],
                scale=scale,
                rmse_over_scale=round(rmse_over_scale, 6),
                mean_abs_error=round(abs(float(row["mean_error"])), 9),
                typical_steps=round(steps, 6) if math.isfinite(steps) else None,
                badness=round(max(rmse_over_scale / UNIFORM_ROUNDING_RMSE, 1 / steps if steps > 0 else math.inf), 6),
            )
        )
    return sorted(errors, key=lambda e: -e.badness)


def float_unit(quantized_tflite: bytes, tensor: str) -> list[str]:
    """What must stay float so that ``tensor`` is never quantized: the op that produces it and every op that
    consumes it (a float producer alone still hands its consumers a requantized tensor)."""
    interpreter = make_interpreter(quantized_tflite, 1)
    names = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
    index = next((i for i, name in names.items() if name == tensor), None)
    unit = [tensor]
    if index is None:
        return unit
    for op in (
        interpreter._get_ops_details()
    ):  # the Python Interpreter's only op listing (see tasks/evaluation/interpreter.py)
        if index in list(op["inputs"]):
            unit += [names[o] for o in op["outputs"] if names.get(o) and names[o] not in unit]
    return unit


def quantize_keeping_float(
    model: keras.Model,
    calibration_batches: CalibrationBatches,
    debug_features: np.ndarray,
    options: ConversionParameters,
    float_tensors: Sequence[str],
) -> bytes:
    """Pure function: the quantized ``.tflite`` with the ops producing ``float_tensors`` left in float
    (selective quantization through the debugger's ``denylisted_nodes``), with the asked I/O types."""
    # The converter's own helper for integer I/O (it strips the boundary QUANTIZE / DEQUANTIZE ops); the debugger
    # quantizes with float I/O.
    try:
        from tensorflow.lite.python.util import modify_model_io_type
    except ImportError:
        raise ConversionFailed(
            missing_private_api(
                "the converter's modify_model_io_type (integer I/O for a repaired model)",
                f"TensorFlow {OLDEST_TENSORFLOW} to {NEWEST_TENSORFLOW}",
            )
            + "; or repair with --input-type float32 --output-type float32"
        ) from None

    with native_output_silenced():
        debugger = _debugger(model, calibration_batches, debug_features, options, float_tensors)
        selective = debugger.get_nondebug_quantized_model()
    if options.input_type is TensorType.float32 and options.output_type is TensorType.float32:
        return bytes(selective)
    return bytes(modify_model_io_type(selective, tf_dtype(options.input_type), tf_dtype(options.output_type)))
