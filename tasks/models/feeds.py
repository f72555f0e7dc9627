"""What a model takes for packed samples: one array, or (a model with several inputs) one array per input; for a
``.tflite``, each input set with its own type, scale and zero point.

Samples travel through the pipeline as one array per split (``storage.tables``: several inputs' values packed side
by side); only where a model is run are they split, and inputs are matched by name, never by position: a Keras
model's inputs are named after the columns (``tasks.models.training``), and a ``.tflite`` model's input order is not its
Keras order, but its signature keeps the names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ptqflow.storage.tables import InputSlot, split_inputs
from ptqflow.tasks.models.outputs import flatten_outputs

if TYPE_CHECKING:
    import keras
    from ai_edge_litert.interpreter import Interpreter

KerasFeed = np.ndarray | dict[str, np.ndarray]


def keras_feed(features: np.ndarray, inputs: tuple[InputSlot, ...] = ()) -> KerasFeed:
    """``features`` as float32 for a Keras model: the array, or one array per input keyed by the input's name."""
    features = features.astype(np.float32, copy=False)
    if not inputs:
        return features
    return {slot.name: part for slot, part in zip(inputs, split_inputs(features, inputs))}


def predict_keras(
    model: keras.Model, features: np.ndarray, batch_size: int = 256, inputs: tuple[InputSlot, ...] = ()
) -> np.ndarray:
    """The model's outputs; several side by side, flattened, in its order (as ``predict_tflite`` gives them)."""
    outputs = model.predict(keras_feed(features, inputs), batch_size=batch_size, verbose=0)
    return flatten_outputs(list(outputs)) if isinstance(outputs, (list, tuple)) else np.asarray(outputs)


def input_parts(features: np.ndarray, inputs: tuple[InputSlot, ...] = ()) -> list[np.ndarray]:
    """``features`` as one array per input, in ``inputs`` order (the array itself for a one-input model)."""
    return split_inputs(features, inputs) if inputs else [features]


def quantize_input(values: np.ndarray, detail: dict) -> np.ndarray:
    """Map raw float values to the input tensor's type with its own (scale, zero point)."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return values.astype(dtype, copy=False)
    scale, zero_point = detail["quantization"]
    if scale == 0:
        raise ValueError(f"input tensor {detail['name']!r} is {dtype} but has no quantization scale")
    info = np.iinfo(dtype)
    return np.clip(np.round(values / scale + zero_point), info.min, info.max).astype(dtype)


def batch_dynamic(details: list[dict]) -> bool:
    """Whether every one of these inputs takes any batch size (else the model was converted for a fixed one)."""
    return all(int(d["shape_signature"][0]) == -1 for d in details)


def resize_inputs(interpreter: Interpreter, details: list[dict], rows: int) -> None:
    """Resize each of these inputs to a batch of ``rows`` (the caller allocates)."""
    for detail in details:
        interpreter.resize_tensor_input(detail["index"], [rows, *detail["shape"][1:]], strict=True)


def set_inputs(
    interpreter: Interpreter, details: list[dict], rows: np.ndarray, inputs: tuple[InputSlot, ...] = ()
) -> None:
    """Set each input (``details`` in ``inputs`` order) to its part of ``rows``, mapped to the tensor's type with
    its own scale and zero point."""
    for detail, part in zip(details, input_parts(rows, inputs)):
        interpreter.set_tensor(detail["index"], quantize_input(part, detail))


def tflite_input_indices(interpreter: Interpreter, inputs: tuple[InputSlot, ...] = ()) -> list[int]:
    """The tensor index of each of ``inputs`` (matched by its signature name), or of the model's one input.

    Raises:
        ValueError: the model's inputs are not these.
    """
    if not inputs:
        details = interpreter.get_input_details()
        if len(details) != 1:
            raise ValueError(f"the .tflite model has {len(details)} inputs, and the samples feed one")
        return [int(details[0]["index"])]
    by_name = {name: int(d["index"]) for name, d in interpreter.get_signature_runner().get_input_details().items()}
    if sorted(by_name) != sorted(slot.name for slot in inputs):
        raise ValueError(
            f"the .tflite model's inputs are {', '.join(sorted(by_name))}, and the samples feed "
            f"{', '.join(slot.name for slot in inputs)}"
        )
    return [by_name[slot.name] for slot in inputs]


def input_details(interpreter: Interpreter, indices: list[int]) -> list[dict]:
    """The input details of these tensors, as they are now (after a resize, shapes change)."""
    by_index = {int(d["index"]): d for d in interpreter.get_input_details()}
    return [by_index[i] for i in indices]


def model_input_slots(model: keras.Model) -> tuple[InputSlot, ...]:
    """A Keras model's inputs as slots of packed features, in its order (none for a one-input model): the stages
    that hold the model (conversion, equalization, bias correction) read the layout from it."""
    if len(model.inputs) == 1:
        return ()
    return tuple(InputSlot(str(t.name), tuple(int(d) for d in t.shape[1:])) for t in model.inputs)


def signature_input_name(detail_name: str) -> str:
    """The signature name of an input tensor named by the converter (``serving_default_<name>:0``)."""
    return detail_name.removeprefix("serving_default_").rsplit(":", 1)[0]
