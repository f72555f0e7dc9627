"""A model's outputs, by name: what each is (its shape, whether it holds class scores), and how the outputs of a
model with several are carried through the pipeline.

A model with several outputs (a detector's boxes and scores) is predicted as one array per sample: each output
flattened, side by side in the Keras model's output order (``tasks.evaluation.interpreter``). Everything that compares
two models' outputs (SQNR, error, the rerun check, the sweep's stored float outputs) works on that array as it is, and
``split_outputs`` gives each output back by name for its own figures.

The ``.tflite`` model lists its output tensors in an order of the converter's choosing; its serving signature
names them ``output_0``, ``output_1``, ... in the Keras model's order, which is what ``tflite_output_order``
follows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ptqflow.storage.keras_models import signature_order
from ptqflow.tasks.core.artifacts import ModelOutput

if TYPE_CHECKING:
    import keras

CLASS_SCORE_ACTIVATIONS = ("softmax", "sigmoid")


def _origin(tensor: Any) -> tuple[str, bool]:
    """The name of the layer that produces ``tensor`` and whether it gives class scores (softmax or sigmoid),
    looking through nested models (a model behind its input normalisation is one)."""
    import keras

    operation, _, index = tensor._keras_history
    if isinstance(operation, keras.Model) and hasattr(operation, "outputs") and operation.outputs:
        return _origin(operation.outputs[index])
    activation = getattr(getattr(operation, "activation", None), "__name__", "")
    return operation.name, activation in CLASS_SCORE_ACTIVATIONS or isinstance(operation, keras.layers.Softmax)


def model_outputs(model: keras.Model) -> tuple[ModelOutput, ...]:
    """Every output of ``model`` in its order: the producing layer's name (made unique), one sample's shape, and
    whether it holds class scores (a softmax or sigmoid; logits are compared by their values alone)."""
    found = []
    seen: dict[str, int] = {}
    for tensor in model.outputs:
        try:
            name, class_scores = _origin(tensor)
        except (AttributeError, IndexError, TypeError):  # a layer whose history Keras does not keep (TFSMLayer)
            name, class_scores = "output", False
        seen[name] = seen.get(name, 0) + 1
        unique = name if seen[name] == 1 else f"{name}_{seen[name]}"
        shape = tuple(int(d) for d in tensor.shape[1:])
        found.append(ModelOutput(name=unique, shape=shape, class_scores=class_scores))
    return tuple(found)


def split_outputs(outputs: np.ndarray, layout: tuple[ModelOutput, ...]) -> dict[str, np.ndarray]:
    """Each output of a prediction by name, as (samples, values): a single output as it is (flattened), several
    from their side-by-side columns."""
    rows = outputs.reshape(len(outputs), -1)
    if len(layout) <= 1:
        return {layout[0].name if layout else "output": rows}
    parts, start = {}, 0
    for output in layout:
        width = int(np.prod(output.shape)) if output.shape else 1
        parts[output.name] = rows[:, start : start + width]
        start += width
    if start != rows.shape[1]:
        raise ValueError(f"outputs of {rows.shape[1]} values per sample do not fit the model's outputs ({start})")
    return parts


def flatten_outputs(outputs: list[np.ndarray]) -> np.ndarray:
    """Several outputs as one array: each flattened per sample, side by side."""
    return np.concatenate([np.asarray(o).reshape(len(o), -1) for o in outputs], axis=1)


def tflite_output_order(interpreter: Any) -> list[int]:
    """The tensor indices of a ``.tflite`` model's outputs in the Keras model's order (its serving signature's
    ``output_0``, ``output_1``, ...). One output: its index. Several without a signature cannot be matched.

    Raises:
        ValueError: several outputs and no signature to order them by.
    """
    details = interpreter.get_output_details()
    if len(details) == 1:
        return [details[0]["index"]]
    signatures = interpreter._get_full_signature_list() or {}
    if len(signatures) != 1:
        raise ValueError(
            f"the .tflite model has {len(details)} outputs and {len(signatures)} signatures: convert it from the Keras "
            "model (ptqflow does), whose serving signature orders them"
        )
    named = next(iter(signatures.values()))["outputs"]
    return [named[name] for name in signature_order(named)]
