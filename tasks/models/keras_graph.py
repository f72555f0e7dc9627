"""The layer graph of a functional or Sequential Keras model, as the weight-adjusting methods (``--equalize``,
``--bias-correction``) need it: which layer produces a tensor, which layers consume it, and how a layer's output
channels map onto its weights.

Only channels-last layers whose weights ptqflow knows how to scale are handled; everything else (a nested model, a
shared layer, a custom layer) is opaque, and a method leaves the layers around it alone.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ptqflow.tasks.core.errors import ConversionFailed

if TYPE_CHECKING:
    import keras


@dataclass
class LayerGraph:
    """Producers and consumers of the model's tensors, by tensor identity, in the model's own topological order."""

    layers: list[Any]
    producer: dict[int, Any] = field(default_factory=dict)
    consumers: dict[int, list[Any]] = field(default_factory=lambda: defaultdict(list))
    inputs_of: dict[int, list[Any]] = field(default_factory=dict)  # id(layer) -> its input tensors
    output_of: dict[int, Any] = field(default_factory=dict)  # id(layer) -> its single output tensor
    model_outputs: set[int] = field(default_factory=set)

    def sole_consumer(self, tensor: Any) -> Any | None:
        """The one layer reading ``tensor``, or None when it has several readers or is a model output (scaling it
        would change what the others, or the user, see)."""
        readers = self.consumers.get(id(tensor), [])
        if len(readers) != 1 or id(tensor) in self.model_outputs:
            return None
        return readers[0]


def layer_graph(model: keras.Model) -> LayerGraph:
    """The graph of ``model``'s top-level layers. A layer called more than once (shared weights) is left out: a
    change to its weights would act at every call."""

    functional = graph_of(model)
    nodes_by_depth = getattr(functional, "_nodes_by_depth", None)
    if nodes_by_depth is None:
        raise ConversionFailed(
            f"--equalize and --bias-correction need a functional or Sequential Keras model; {type(model).__name__} is "
            "a subclassed model: rebuild it with the functional API, or drop those options"
        )
    calls: dict[int, int] = defaultdict(int)
    nodes = [node for depth in sorted(nodes_by_depth, reverse=True) for node in nodes_by_depth[depth]]
    for node in nodes:
        calls[id(node.operation)] += 1
    graph = LayerGraph(layers=[], model_outputs={id(t) for t in functional.outputs})
    for node in nodes:
        layer = node.operation
        for tensor in node.input_tensors:
            graph.consumers[id(tensor)].append(layer)
        if calls[id(layer)] != 1 or len(node.output_tensors) != 1:
            continue
        graph.layers.append(layer)
        graph.inputs_of[id(layer)] = list(node.input_tensors)
        graph.output_of[id(layer)] = node.output_tensors[0]
        graph.producer[id(node.output_tensors[0])] = layer
    return graph


def _nested(operation: Any) -> bool:
    import keras

    return isinstance(operation, keras.Model) and (
        isinstance(operation, keras.Sequential) or getattr(operation, "_nodes_by_depth", None) is not None
    )


def graph_of(model: keras.Model) -> Any:
    import keras

    return model._functional if isinstance(model, keras.Sequential) else model


def flattened(model: keras.Model) -> keras.Model:
    """``model`` with every functional or Sequential model nested in it inlined: one graph of layers, so that a
    base network behind a head (transfer learning) or behind ptqflow's input normalisation is reached too. The
    layers are ``model``'s own, called again; copy the result before changing weights. A model whose inlined layers
    would share a name is returned as it is (its nested models stay opaque)."""
    import keras

    graph = graph_of(model)
    if graph is None or not any(_nested(layer) for layer in graph.layers):
        return model

    def operation(op: Any) -> Any:
        if not _nested(op):
            return op
        inner = graph_of(op)

        def replay(inputs: Any, *args: Any, **kwargs: Any) -> Any:
            return inner._run_through_graph(inputs, operation_fn=operation)

        return replay

    try:
        return keras.Model(graph.input, graph._run_through_graph(graph.input, operation_fn=operation), name=model.name)
    except ValueError:  # duplicate layer names once inlined
        return model


def channels_last(layer: Any) -> bool:
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def activation_name(layer: Any) -> str | None:
    import keras

    function = getattr(layer, "activation", None)
    if function is None:
        return None
    try:
        name = keras.activations.serialize(function)
    except (ValueError, TypeError):
        return None
    return name if isinstance(name, str) else None


def linear_kind(layer: Any) -> str | None:
    """``dense``, ``conv``, ``depthwise`` or ``separable`` for the weight layers whose channels ptqflow can scale."""
    import keras

    if not channels_last(layer):
        return None
    if isinstance(layer, keras.layers.Dense):
        return "dense"
    if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        return "separable"
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        return "depthwise"
    transposed = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)
    if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)):
        return "conv" if getattr(layer, "groups", 1) == 1 and not isinstance(layer, transposed) else None
    return None


def batch_norm_on_channels(layer: Any) -> bool:
    import keras

    if not isinstance(layer, keras.layers.BatchNormalization):
        return False
    rank = len(layer.input.shape) if hasattr(layer, "input") else None
    axis = layer.axis[0] if isinstance(layer.axis, (list, tuple)) else layer.axis
    return axis == -1 or (rank is not None and axis == rank - 1)


def walk(graph: LayerGraph) -> Iterator[tuple[Any, str]]:
    """The model's weight layers with their kind, in topological order."""
    for layer in graph.layers:
        kind = linear_kind(layer)
        if kind is not None:
            yield layer, kind


def clone_with_weights(model: keras.Model) -> keras.Model:
    """A functional copy of ``model`` whose weights can change without touching the original (the float
    reference); a Sequential model's copy is functional, with the same layer names.

    Raises:
        ConversionFailed: the model is subclassed, or Keras cannot copy it.
    """
    import keras

    layer_graph(model)  # refuses a subclassed model, whose layers ptqflow cannot see
    functional = flattened(graph_of(model))
    try:
        copy = keras.models.clone_model(functional)
    except (ValueError, TypeError, NotImplementedError) as error:
        reason = next(iter(str(error).splitlines()), type(error).__name__)[:200]
        raise ConversionFailed(
            f"--equalize and --bias-correction need a model Keras can copy ({reason}); drop those options"
        ) from None
    copy.set_weights(functional.get_weights())
    return copy
