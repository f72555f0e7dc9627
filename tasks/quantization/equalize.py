"""``--equalize``: cross-layer equalization of activation ranges before conversion, exact in float.

TensorFlow Lite quantizes each activation tensor with one scale; its weights have one scale per output channel. A
tensor whose channels have very different ranges (the depthwise outputs of every separable convolution, the
channels after a batch normalization) leaves its small channels a handful of int8 steps. Where a tensor lies
between a layer whose output channels can be scaled (a batch normalization, or a convolution or dense layer with a
ReLU-like activation or none) and one weight layer that reads it, through layers that commute with a positive
per-channel scale (ReLU, LeakyReLU, pooling, padding, dropout), channel ``j`` is divided by ``s_j`` where it is made
and multiplied back by ``s_j`` in the reader's weights. The float model computes the same function (ReLU(x/s) =
ReLU(x)/s for s > 0), checked on the calibration data after the change.

Each channel is scaled to the tensor's largest: ``s_j = a_j / max a``, with ``a_j`` the channel's largest magnitude
on the calibration data, so every channel of the tensor gets the whole int8 range. The reader's weights for a small
channel shrink; TensorFlow Lite's per-channel weight scales keep that cheap, and bias correction removes the mean
error it leaves. SmoothQuant's migration, which shares the scale between the activation and the reader's weights
(``s_j = a_j^0.5 / w_j^0.5``), was measured too and lost 1.2 to 1.7 dB output SQNR against this, alone, on the
tests' digits CNN (two trainings) and the benchmark's separable CNN. Inside a separable convolution, the depthwise
output (a tensor TensorFlow Lite quantizes; Keras never shows it) is equalized into the pointwise kernel the same
way. ReLU6 does not commute with scaling, so layers joined by it are left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ptqflow.tasks.core.errors import ConversionFailed
from ptqflow.tasks.models.feeds import keras_feed, model_input_slots
from ptqflow.tasks.models.keras_graph import (
    LayerGraph,
    activation_name,
    batch_norm_on_channels,
    channels_last,
    clone_with_weights,
    layer_graph,
    linear_kind,
    walk,
)

if TYPE_CHECKING:
    import keras

# Activations f with f(x/s) = f(x)/s for every s > 0.
HOMOGENEOUS_ACTIVATIONS = frozenset({"linear", "relu", "leaky_relu"})
# A scale far from 1 buys nothing more and costs float precision in the weights.
SCALE_LIMITS = (1e-3, 1e3)
# How far the equalized float model's outputs may move, relative to their largest magnitude (float32 rounding).
EXACTNESS_TOLERANCE = 1e-4


@dataclass
class EqualizedPair:
    """One activation tensor equalized: where its channels are made (``producer``), read (``reader``), and the
    tensors whose per-channel magnitudes chose the scales."""

    producer: Any
    producer_kind: str  # "batch_norm", a linear kind, or "separable_depthwise" (inside a separable convolution)
    reader: Any
    reader_kind: str  # a linear kind, or "pointwise" (inside a separable convolution)
    tensors: list[Any]


def _commutes_with_channel_scale(layer: Any) -> bool:
    import keras

    if not channels_last(layer):
        return False
    if isinstance(layer, keras.layers.ReLU):
        return layer.max_value is None and float(layer.threshold) == 0.0
    if isinstance(layer, (keras.layers.LeakyReLU, keras.layers.Activation)):
        return isinstance(layer, keras.layers.LeakyReLU) or activation_name(layer) in HOMOGENEOUS_ACTIVATIONS
    passthrough = (
        keras.layers.MaxPooling1D,
        keras.layers.MaxPooling2D,
        keras.layers.AveragePooling1D,
        keras.layers.AveragePooling2D,
        keras.layers.GlobalMaxPooling1D,
        keras.layers.GlobalMaxPooling2D,
        keras.layers.GlobalAveragePooling1D,
        keras.layers.GlobalAveragePooling2D,
        keras.layers.ZeroPadding1D,
        keras.layers.ZeroPadding2D,
        keras.layers.Cropping1D,
        keras.layers.Cropping2D,
        keras.layers.Dropout,
        keras.layers.SpatialDropout1D,
        keras.layers.SpatialDropout2D,
    )
    return isinstance(layer, passthrough)


def _pair_into(graph: LayerGraph, reader: Any, reader_kind: str) -> EqualizedPair | None:
    """The pair whose activation ``reader`` reads, walking back through layers that commute with the scale."""
    inputs = graph.inputs_of[id(reader)]
    if len(inputs) != 1:
        return None
    tensor, consumer, tensors = inputs[0], reader, []
    while True:
        if graph.sole_consumer(tensor) is not consumer:
            return None
        tensors.append(tensor)
        layer = graph.producer.get(id(tensor))
        if layer is None:
            return None
        if _commutes_with_channel_scale(layer) and len(graph.inputs_of[id(layer)]) == 1:
            tensor, consumer = graph.inputs_of[id(layer)][0], layer
            continue
        if batch_norm_on_channels(layer) and layer.scale:
            return EqualizedPair(layer, "batch_norm", reader, reader_kind, tensors)
        kind = linear_kind(layer)
        if kind is not None and activation_name(layer) in HOMOGENEOUS_ACTIVATIONS:
            return EqualizedPair(layer, kind, reader, reader_kind, tensors)
        return None


def equalizable_pairs(graph: LayerGraph) -> list[EqualizedPair]:
    pairs = []
    for layer, kind in walk(graph):
        pair = _pair_into(graph, layer, kind)
        if pair is not None:
            pairs.append(pair)
        if kind == "separable":
            inside = [graph.inputs_of[id(layer)][0]]  # its depthwise output is computed from its input
            pairs.append(EqualizedPair(layer, "separable_depthwise", layer, "pointwise", inside))
    return pairs


def _depthwise_output(layer: Any, inputs: Any) -> Any:
    """What a separable convolution's depthwise half gives, before its pointwise kernel."""
    import keras

    return keras.ops.depthwise_conv(
        inputs,
        layer.depthwise_kernel,
        strides=layer.strides,
        padding=layer.padding,
        data_format=layer.data_format,
        dilation_rate=layer.dilation_rate,
    )


def channel_magnitudes(
    model: keras.Model, pairs: list[EqualizedPair], batches: Iterable[np.ndarray]
) -> list[np.ndarray]:
    """Per pair, each channel's largest magnitude over the calibration data, in one pass."""
    import keras

    tensors = [tensor for pair in pairs for tensor in pair.tensors]
    probe = keras.Model(model.input, tensors)
    largest: list[np.ndarray | None] = [None] * len(pairs)
    inputs = model_input_slots(model)
    for batch in batches:
        values = probe(keras_feed(np.asarray(batch), inputs), training=False)
        values = values if isinstance(values, (list, tuple)) else [values]
        position = 0
        for index, pair in enumerate(pairs):
            found = values[position : position + len(pair.tensors)]
            position += len(pair.tensors)
            if pair.producer_kind == "separable_depthwise":
                found = [_depthwise_output(pair.producer, found[0])]
            channels = [np.abs(np.asarray(v)).reshape(-1, np.shape(v)[-1]).max(axis=0) for v in found]
            current = np.max(channels, axis=0)
            previous = largest[index]
            largest[index] = current if previous is None else np.maximum(previous, current)
    return [np.zeros(0) if m is None else m for m in largest]


def _reader_weights(pair: EqualizedPair) -> tuple[Any, int]:
    """The reader's kernel variable and the axis along which it reads the activation's channels."""
    reader = pair.reader
    if pair.reader_kind == "pointwise":
        return reader.pointwise_kernel, -2
    if pair.reader_kind == "separable":
        return reader.depthwise_kernel, -2
    return reader.kernel, -2


def _along(values: np.ndarray, axis: int, rank: int) -> np.ndarray:
    shape = [1] * rank
    shape[axis] = -1
    return values.reshape(shape)


def _divide_output(pair: EqualizedPair, scales: np.ndarray) -> None:
    producer = pair.producer
    if pair.producer_kind == "batch_norm":
        producer.gamma.assign(np.asarray(producer.gamma) / scales)
        if producer.center:
            producer.beta.assign(np.asarray(producer.beta) / scales)
        return
    if pair.producer_kind == "separable_depthwise":
        kernel = np.asarray(producer.depthwise_kernel)
        producer.depthwise_kernel.assign(kernel / scales.reshape(kernel.shape[-2], kernel.shape[-1]))
        return
    variable = producer.pointwise_kernel if pair.producer_kind == "separable" else producer.kernel
    kernel = np.asarray(variable)
    if pair.producer_kind == "depthwise":
        variable.assign(kernel / scales.reshape(kernel.shape[-2], kernel.shape[-1]))
    else:
        variable.assign(kernel / _along(scales, -1, kernel.ndim))
    if producer.use_bias:
        producer.bias.assign(np.asarray(producer.bias) / scales)


def equalization_scales(magnitudes: np.ndarray) -> np.ndarray:
    """``s_j`` for each channel (see the module's docstring); 1 for a channel that is always zero, where any scale is
    as good."""
    scales = np.ones_like(magnitudes, dtype=np.float64)
    live = magnitudes > 0
    if live.any():
        scales[live] = magnitudes[live] / magnitudes[live].max()
    return np.clip(scales, *SCALE_LIMITS)


def equalize_pair(pair: EqualizedPair, magnitudes: np.ndarray) -> None:
    variable, axis = _reader_weights(pair)
    kernel = np.asarray(variable)
    scales = equalization_scales(magnitudes.astype(np.float64))
    _divide_output(pair, scales.astype(np.float32))
    variable.assign(kernel * _along(scales, axis, kernel.ndim).astype(np.float32))


def outputs_of(model: keras.Model, batch: np.ndarray) -> list[np.ndarray]:
    outputs = model(keras_feed(np.asarray(batch), model_input_slots(model)), training=False)
    return [np.asarray(o) for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


def check_unchanged(original: keras.Model, changed: keras.Model, batch: np.ndarray, method: str) -> None:
    """The changed model must compute what the original does: a layer whose semantics ptqflow misread would show
    here, before any quantized model is written."""
    for before, after in zip(outputs_of(original, batch), outputs_of(changed, batch), strict=True):
        scale = max(float(np.abs(before).max()), 1e-12)
        drift = float(np.abs(after - before).max()) / scale
        if drift > EXACTNESS_TOLERANCE:
            raise ConversionFailed(
                f"{method} changed the float model's outputs (by {drift:.2g} of their range): a layer in it does not "
                f"behave as its type says; drop {method}"
            )


def equalize(model: keras.Model, calibration_batches: Callable[[], Iterable[np.ndarray]]) -> tuple[keras.Model, int]:
    """Pure stage function: a copy of ``model`` with its activation ranges equalized, and how many tensors were.

    Raises:
        ConversionFailed: the model is subclassed, or the copy does not compute what the model does.
    """
    equalized = clone_with_weights(model)
    pairs = equalizable_pairs(layer_graph(equalized))
    if not pairs:
        return equalized, 0
    magnitudes = channel_magnitudes(equalized, pairs, calibration_batches())
    for pair, channels in zip(pairs, magnitudes, strict=True):
        equalize_pair(pair, channels)
    first = next(iter(calibration_batches()))
    check_unchanged(model, equalized, first, "--equalize")
    return equalized, len(pairs)
