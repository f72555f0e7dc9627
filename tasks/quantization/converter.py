"""Post-training quantization with ``tf.lite.TFLiteConverter``, as the conversion stage (``tasks.stages.convert``)
and the sweep run it.

Both ``.tflite`` files take one sample per call, as a device runs them: the Keras model is converted behind inputs
of batch 1 (``batch_one``), so the files have static shapes and none of the SHAPE / STRIDED_SLICE / PACK operators
a dynamic batch dimension adds (which TFLite Micro and Vela cannot place). Validation then judges the very file
that ships. The representative dataset streams batches from the calibration Parquet and hands the calibrator
their rows. The float ``.tflite`` (no optimizations) is written too, so validation can compare like with like.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from ptqflow.storage.store import ArtifactStore
from ptqflow.storage.tables import iter_feature_batches
from ptqflow.tasks.core.artifacts import CalibrationSet
from ptqflow.tasks.core.errors import ConversionFailed
from ptqflow.tasks.core.installation import NEWEST_TENSORFLOW, OLDEST_TENSORFLOW, missing_private_api
from ptqflow.tasks.core.native import native_output_silenced
from ptqflow.tasks.core.parameters import (
    DEFAULT_PERCENTILE,
    ConversionParameters,
    QuantizationScheme,
    TargetOps,
    TensorType,
)
from ptqflow.tasks.core.progress import report
from ptqflow.tasks.models.feeds import keras_feed, model_input_slots
from ptqflow.tasks.quantization.integer import require_integer
from ptqflow.tasks.quantization.ranges import RANGE_METHODS, activation_histograms, choose_range, with_ranges

if TYPE_CHECKING:
    import keras

CalibrationBatches = Callable[[], Iterable[np.ndarray]]


def tf_dtype(kind: TensorType):
    import tensorflow as tf

    return {
        TensorType.float32: tf.float32,
        TensorType.uint8: tf.uint8,
        TensorType.int8: tf.int8,
        TensorType.int16: tf.int16,
    }[kind]


def _ops_sets(options: ConversionParameters):
    import tensorflow as tf

    sets = {
        TargetOps.int8: [tf.lite.OpsSet.TFLITE_BUILTINS_INT8],
        TargetOps.builtins: [tf.lite.OpsSet.TFLITE_BUILTINS],
        TargetOps.select: [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS],
    }[options.ops]
    if options.scheme is QuantizationScheme.int16x8:
        # --ops int8 means "every op integer": only the 16x8 kernels; otherwise float fallback stays allowed.
        int16x8 = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        return int16x8 if options.ops is TargetOps.int8 else int16x8 + sets
    return sets


# The outer model's name scopes every converted tensor's name (``batch_one/<model>_1/<layer>_1/...``): fixed, so the
# tensors a repair keeps in float are named alike in every conversion of the model.
BATCH_ONE_MODEL = "batch_one"


def batch_one(model: keras.Model) -> keras.Model:
    """``model`` behind inputs of batch 1 (same names, types and sample shapes), or ``model`` itself where every
    input already has batch 1: the model a device runs, whose conversion has only static shapes.

    Raises:
        ConversionFailed: the model cannot be called on one sample.
    """
    import keras

    if all(tensor.shape[0] == 1 for tensor in model.inputs):
        return model

    def one_sample(tensor):
        return keras.Input(batch_shape=(1, *tensor.shape[1:]), dtype=tensor.dtype, name=str(tensor.name))

    inputs = keras.tree.map_structure(one_sample, model.input)
    try:
        outputs = model(inputs)
    except Exception as error:  # whatever the model's own layers raise on a batch of 1
        raise ConversionFailed(
            f"the model cannot be called on one sample ({_keras_reason(error)}): a device runs one sample per call, "
            "so give the model inputs whose batch dimension is free or 1"
        ) from error
    return keras.Model(inputs, outputs, name=BATCH_ONE_MODEL)


def _keras_reason(error: Exception) -> str:
    """The reason inside a Keras layer-call error, which wraps it between a header and the call's arguments (and
    bolds it with terminal escapes)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines()]
    wrapper = ("Exception encountered when calling", "Arguments received by", "•")
    reasons = [line for line in lines if line and not line.startswith(wrapper)]
    return reasons[0][:200] if reasons else type(error).__name__


def _converter(model: keras.Model):
    """A converter over ``batch_one(model)``."""
    import tensorflow as tf

    return tf.lite.TFLiteConverter.from_keras_model(batch_one(model))


def _explain(error: Exception, options: ConversionParameters) -> ConversionFailed:
    """Turn the converter's MLIR diagnostics into one line naming the ops and the options that would work."""
    text = str(error)
    # Ops with no TensorFlow Lite kernel at all: only the Flex delegate (SELECT_TF_OPS) can run them.
    not_builtin = sorted(set(re.findall(r"'tf\.([A-Za-z0-9_]+)' op is neither a custom op nor a flex op", text)))
    # Builtin ops without an int8 kernel: TFLITE_BUILTINS can keep them in float.
    not_quantizable = sorted(set(re.findall(r"[Qq]uantization not yet supported for op: '([^']+)'", text)))
    problems, fixes = [], []
    if "Select TensorFlow op(s), included in the given model, is(are) not supported by this interpreter" in text:
        # Calibration runs the model in the TFLite calibrator, which has no Flex delegate since TensorFlow 2.20.
        return ConversionFailed(
            f"conversion failed under --ops {options.ops.value}: the model needs TensorFlow (Flex) ops, which "
            "calibration cannot run: integer quantization needs a TensorFlow Lite kernel for every op; "
            "replace those ops in the model"
        )
    if not_builtin:
        problems.append(f"{', '.join(not_builtin)} has no TensorFlow Lite builtin kernel")
        if options.ops is not TargetOps.select:
            fixes.append("--ops select runs it as a TensorFlow op (Flex delegate)")
    if not_quantizable:
        problems.append(f"{', '.join(not_quantizable)} has no int8 kernel")
        if options.ops is TargetOps.int8:
            fixes.append("--ops builtins keeps it in float")
    if not problems:
        detail = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
        problems.append(f"the converter stopped: {detail[:300]}")
    fixes.append("or replace it in the model" if fixes else "replace it in the model")
    return ConversionFailed(
        f"conversion failed under --ops {options.ops.value}: {'; '.join(problems)}: {', '.join(fixes)}"
    )


def _convert(converter, options: ConversionParameters) -> bytes:
    # from_keras_model's SavedModel export prints on stdout; keep stdout for the CLI's output (--json).
    with native_output_silenced(), warnings.catch_warnings():
        # "Statistics for quantized inputs were expected": the I/O scale comes from calibration, as intended.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs", category=UserWarning)
        try:
            return bytes(converter.convert())
        except Exception as error:  # ConverterError and friends carry the op names in their text
            raise _explain(error, options) from error


def quantization_converter(model: keras.Model, calibration_batches: CalibrationBatches, options: ConversionParameters):
    """The converter for post-training quantization of ``model`` under ``options.scheme``, calibrated on
    ``calibration_batches`` when the scheme quantizes activations (also what the quantization debugger takes, so its
    per-layer figures describe this very conversion)."""
    import tensorflow as tf

    def representative_dataset() -> Iterator[list[np.ndarray] | dict[str, np.ndarray]]:
        inputs = model_input_slots(model)
        for batch in calibration_batches():
            rows = np.asarray(batch)
            for row in range(len(rows)):  # the converted model takes one sample per call
                feed = keras_feed(rows[row : row + 1], inputs)
                yield feed if isinstance(feed, dict) else [feed]  # several inputs: by signature name

    converter = _converter(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if options.scheme.calibrated:
        converter.representative_dataset = representative_dataset
    if options.scheme is QuantizationScheme.float16:
        converter.target_spec.supported_types = [tf.float16]
    converter.target_spec.supported_ops = _ops_sets(options)
    converter.inference_input_type = tf_dtype(options.input_type)
    converter.inference_output_type = tf_dtype(options.output_type)
    if not options.per_channel:
        # The converter's only switch for per-tensor weight scales (private, present since TF 2.5). Setting an
        # attribute the converter no longer reads would silently give per-channel scales, so check it is there.
        if not hasattr(converter, "_experimental_disable_per_channel"):
            raise ConversionFailed(
                missing_private_api(
                    "per-tensor weight scales (the converter's _experimental_disable_per_channel)",
                    f"TensorFlow {OLDEST_TENSORFLOW} to {NEWEST_TENSORFLOW}",
                )
                + "; or choose a per-channel scheme"
            )
        converter._experimental_disable_per_channel = True
    return converter


def quantize(model: keras.Model, calibration_batches: CalibrationBatches, options: ConversionParameters) -> bytes:
    """Pure stage function: the quantized ``.tflite`` of ``model``, by the converter. (Scheme mixed16 measures
    which layers need int16: ``tasks.evaluation.mixed.quantization`` runs it, and every scheme.)

    Args:
        model: the float Keras model (takes raw values as float32).
        calibration_batches: a callable returning a fresh iterable of raw feature batches (any batch size).
        options: I/O types and op sets.

    Raises:
        ConversionFailed: the converter refused, or under ``--ops int8`` an operator stayed float; the message names
            the ops and the options that would work.
    """
    if options.scheme is QuantizationScheme.mixed16:
        raise ValueError("scheme mixed16 is a search: quantize with tasks.evaluation.mixed.quantization")
    model = prepared_for_rounding(model, calibration_batches, options)
    if RANGE_METHODS[options.calibration_method].choose is None:  # the converter's own ranges
        quantized = _convert(quantization_converter(model, calibration_batches, options), options)
    else:
        quantized = quantize_with_ranges(model, calibration_batches, options)
    return require_integer(quantized, options)  # whichever path made it


def prepared_for_rounding(
    model: keras.Model, calibration_batches: CalibrationBatches, options: ConversionParameters
) -> keras.Model:
    """``model``, or a copy with its activation channels equalized (``--equalize``) and then its biases corrected
    for int8 weight rounding (``--bias-correction``). Equalization comes first: it moves the weights that bias
    correction then rounds. The float model the quantized one is validated against stays ``model``."""
    if options.equalize or options.bias_correction:
        calibration_batches = held_if_small(calibration_batches)
    if options.equalize:
        from ptqflow.tasks.quantization.equalize import equalize

        model, equalized = equalize(model, calibration_batches)
        report("convert_to_tflite", f"equalized the channels of {equalized} activation tensors")
    if options.bias_correction:
        from ptqflow.tasks.quantization.bias_correction import correct_biases

        model, corrected = correct_biases(model, calibration_batches, options.per_channel)
        report("convert_to_tflite", f"corrected the biases of {corrected} layers for int8 weight rounding")
    return model


# Bias correction reads the calibration set once per weight layer: a set this small is held in memory for it
# instead of being streamed from the store again each time.
HELD_CALIBRATION_BYTES = 512 << 20


def held_if_small(calibration_batches: CalibrationBatches, limit: int = HELD_CALIBRATION_BYTES) -> CalibrationBatches:
    """``calibration_batches``, read once and held in memory when the whole set takes at most ``limit`` bytes;
    otherwise streamed as before."""
    held: list[np.ndarray] = []
    size = 0
    for batch in calibration_batches():
        size += np.asarray(batch).nbytes
        if size > limit:
            return calibration_batches
        held.append(np.asarray(batch))
    return lambda: held


def quantize_with_ranges(
    model: keras.Model, calibration_batches: CalibrationBatches, options: ConversionParameters
) -> bytes:
    """The converter's own steps, with ``options.calibration_method`` choosing each activation's range in between:
    calibrate only (the converter records each activation's min/max), choose the ranges from each activation's
    histogram over the calibration set (``tasks.quantization.ranges``), then the converter's own quantizer. With min/max
    ranges this gives the normal conversion's model, output for output (a test checks it)."""

    try:
        from tensorflow.lite.python.lite import _mlir_quantize
    except ImportError:
        raise ConversionFailed(
            missing_private_api(
                "the converter's quantizer (tensorflow.lite.python.lite._mlir_quantize)",
                f"TensorFlow {OLDEST_TENSORFLOW} to {NEWEST_TENSORFLOW}",
            )
            + "; or use --calibration-method minmax"
        ) from None
    converter = quantization_converter(model, calibration_batches, options)
    converter._experimental_calibrate_only = True
    calibrated = _convert(converter, options)
    report("convert_to_tflite", f"choosing activation ranges ({options.calibration_method.value})")
    histograms = activation_histograms(calibrated, calibration_batches(), model_input_slots(model))
    ranges = {
        index: choose_range(hist, options.calibration_method, options.percentile or DEFAULT_PERCENTILE)
        for index, hist in histograms.items()
    }
    with native_output_silenced():
        try:
            quantized = _mlir_quantize(
                with_ranges(calibrated, ranges),
                not options.per_channel,
                input_data_type=tf_dtype(options.input_type),
                output_data_type=tf_dtype(options.output_type),
            )
        except Exception as error:  # the quantizer's errors name the ops, as the converter's do
            raise _explain(error, options) from error
    return bytes(quantized)


def convert_float(model: keras.Model) -> bytes:
    """The float ``.tflite`` of ``model``: no optimizations, float32 I/O."""
    return _convert(_converter(model), ConversionParameters(ops=TargetOps.builtins))


def stored_calibration_batches(
    store: ArtifactStore, calibration: CalibrationSet, batch_size: int, stage: str
) -> CalibrationBatches:
    """Calibration batches streamed from the stored Parquet (a fresh pass on every call), with progress."""

    def batches() -> Iterator[np.ndarray]:
        seen = 0
        with store.open(calibration.table) as f:
            for batch in iter_feature_batches(f, batch_size):
                seen += len(batch)
                report(stage, f"calibrating {seen}/{calibration.samples} samples", seen, calibration.samples)
                yield batch

    return batches
