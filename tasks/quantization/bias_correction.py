"""``--bias-correction``: empirical bias correction (Nagel et al., 2019) before conversion.

Rounding a layer's weights to int8 shifts the mean of each of its output channels; the shifts of one layer feed the
next, and over twenty layers they add up. Layer by layer, in topological order, the mean of each output channel
over the calibration data is measured twice: in the float model, and in a copy whose weights are rounded as
TensorFlow Lite rounds them (symmetric int8, one scale per output channel, or per tensor with ``--per-tensor``, of
the weights after a following batch normalization is folded in) and whose earlier layers are already corrected.
The difference is added to the layer's bias, or taken from the following batch normalization's moving mean where
the layer has no bias. The float model stays the reference; the corrected copy is what is converted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ptqflow.tasks.models.feeds import keras_feed, model_input_slots
from ptqflow.tasks.models.keras_graph import (
    LayerGraph,
    activation_name,
    batch_norm_on_channels,
    clone_with_weights,
    layer_graph,
    walk,
)

if TYPE_CHECKING:
    import keras

INT8_LIMIT = 127  # TensorFlow Lite's int8 weights are symmetric in [-127, 127]


@dataclass
class CorrectedLayer:
    layer: Any
    kind: str
    batch_norm: Any | None  # the batch normalization that reads the layer alone
    folded: bool  # the converter folds that batch normalization into the layer's weights (no activation between)


def rounded_like_tflite(kernel: np.ndarray, kind: str, per_channel: bool, fold: np.ndarray | None) -> np.ndarray:
    """``kernel`` after int8 rounding as the converter does it; ``fold`` is the per-output-channel factor of a
    following batch normalization, which the converter multiplies into the weights before rounding them."""
    rank = kernel.ndim
    if kind == "depthwise":  # output channel i * multiplier + k lives on the last two axes
        factor = np.ones(kernel.shape[-2:], np.float64) if fold is None else fold.reshape(kernel.shape[-2:])
        folded = kernel.astype(np.float64) * factor
        axes: tuple[int, ...] = tuple(range(rank - 2))
    else:
        factor = np.ones(kernel.shape[-1], np.float64) if fold is None else fold.astype(np.float64)
        folded = kernel.astype(np.float64) * factor
        axes = tuple(range(rank - 1))
    largest = np.abs(folded).max(axis=axes, keepdims=True) if per_channel else np.abs(folded).max()
    step = np.where(largest > 0, largest / INT8_LIMIT, 1.0)
    rounded = np.clip(np.round(folded / step), -INT8_LIMIT, INT8_LIMIT) * step
    return (rounded / np.where(factor == 0, 1.0, factor)).astype(kernel.dtype)


def _fold_factor(batch_norm: Any | None) -> np.ndarray | None:
    if batch_norm is None:
        return None
    gamma = np.asarray(batch_norm.gamma, np.float64) if batch_norm.scale else 1.0
    return gamma / np.sqrt(np.asarray(batch_norm.moving_variance, np.float64) + batch_norm.epsilon)


def correctable_layers(graph: LayerGraph) -> list[CorrectedLayer]:
    layers = []
    for layer, kind in walk(graph):
        reader = graph.sole_consumer(graph.output_of[id(layer)])
        batch_norm = reader if reader is not None and batch_norm_on_channels(reader) else None
        folded = batch_norm is not None and activation_name(layer) in (None, "linear")
        layers.append(CorrectedLayer(layer, kind, batch_norm, folded))
    return layers


def round_weights(rounded: keras.Model, layers: list[CorrectedLayer], per_channel: bool) -> None:
    """Give ``rounded`` (a copy) the int8-rounded weights of ``layers`` (found in it by name)."""
    for item in layers:
        layer = rounded.get_layer(item.layer.name)
        fold = _fold_factor(item.batch_norm) if item.folded else None
        if item.kind == "separable":
            layer.depthwise_kernel.assign(
                rounded_like_tflite(np.asarray(layer.depthwise_kernel), "depthwise", per_channel, None)
            )
            layer.pointwise_kernel.assign(
                rounded_like_tflite(np.asarray(layer.pointwise_kernel), "conv", per_channel, fold)
            )
        else:
            layer.kernel.assign(rounded_like_tflite(np.asarray(layer.kernel), item.kind, per_channel, fold))


def channel_means(model: keras.Model, tensors: list[Any], batches: Iterable[np.ndarray]) -> list[np.ndarray]:
    """Each tensor's per-channel mean over the calibration data (every sample and position), in one pass."""
    import keras

    probe = keras.Model(model.input, tensors)
    totals: list[np.ndarray] = [np.zeros(int(t.shape[-1])) for t in tensors]
    rows = [0] * len(tensors)
    inputs = model_input_slots(model)
    for batch in batches:
        values = probe(keras_feed(np.asarray(batch), inputs), training=False)
        for index, value in enumerate(values if isinstance(values, (list, tuple)) else [values]):
            flat = np.asarray(value, np.float64).reshape(-1, np.shape(value)[-1])
            totals[index] += flat.sum(axis=0)
            rows[index] += len(flat)
    return [total / max(count, 1) for total, count in zip(totals, rows, strict=True)]


def _shift(model: keras.Model, item: CorrectedLayer, correction: np.ndarray) -> None:
    layer = model.get_layer(item.layer.name)
    if layer.use_bias:
        layer.bias.assign((np.asarray(layer.bias, np.float64) + correction).astype(np.float32))
    elif item.batch_norm is not None:
        batch_norm = model.get_layer(item.batch_norm.name)
        mean = np.asarray(batch_norm.moving_mean, np.float64)
        batch_norm.moving_mean.assign((mean - correction).astype(np.float32))


def correct_biases(
    model: keras.Model, calibration_batches: Callable[[], Iterable[np.ndarray]], per_channel: bool
) -> tuple[keras.Model, int]:
    """Pure stage function: a copy of ``model`` whose biases undo the mean shift of int8 weight rounding, and how
    many layers were corrected (a layer with neither a bias nor a batch normalization after it is left alone).

    Raises:
        ConversionFailed: the model is subclassed, or Keras cannot copy it.
    """
    # Copies with nested models inlined (tasks.models.keras_graph.flattened), so that every layer's output can be read:
    # the float reference, the copy corrected, and the copy rounded as the converter will round it. A layer with its own
    # activation is read after it, where the next layer sees it (reading before it, where its bias acts, was
    # measured on the digits CNN and gained less: +0.2 dB against +0.7 dB over min/max, two trainings).
    reference, corrected, rounded = (clone_with_weights(model) for _ in range(3))
    layers = [item for item in correctable_layers(layer_graph(reference)) if item.layer.use_bias or item.batch_norm]
    round_weights(rounded, correctable_layers(layer_graph(rounded)), per_channel)
    float_means = channel_means(reference, [item.layer.output for item in layers], calibration_batches())
    for item, wanted in zip(layers, float_means, strict=True):
        found = channel_means(rounded, [rounded.get_layer(item.layer.name).output], calibration_batches())[0]
        _shift(corrected, item, wanted - found)
        _shift(rounded, item, wanted - found)
    return corrected, len(layers)
