"""The full-integer promise: with ``--ops int8`` a calibrated conversion yields a model with no float tensor, except
the inputs and outputs the user asked to be float (``--input-type`` / ``--output-type float32``), or fails.

The converter does not keep that promise by itself: given ``TFLITE_BUILTINS_INT8``, it still keeps an operator it
does not quantize (SQUARE, NEG) in float, wrapped in DEQUANTIZE / QUANTIZE, on its own path and on the range
methods' (``--calibration-method``), and may leave an output float. So every conversion's result is checked here,
whatever path made it.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import numpy as np

from ptqflow.tasks.core.errors import ConversionFailed
from ptqflow.tasks.core.native import native_output_silenced
from ptqflow.tasks.core.parameters import ConversionParameters, QuantizationScheme, TargetOps, TensorType
from ptqflow.tasks.core.validation_report import FloatOp

if TYPE_CHECKING:
    from ai_edge_litert.interpreter import Interpreter

FLOAT_TYPES = ("float16", "float32", "float64")
SHOWN_OPS = 6  # operators an error names before "..."
CONVERSIONS = ("QUANTIZE", "DEQUANTIZE")  # what wraps an operator left in float


def float_ops(interpreter: Interpreter, allowed: Collection[int] = ()) -> list[FloatOp]:
    """Every operator that reads or writes a float tensor other than those in ``allowed`` (tensor indices)."""
    details = interpreter.get_tensor_details()
    names = {int(d["index"]): d["name"] for d in details}
    floats = {int(d["index"]) for d in details if np.dtype(d["dtype"]).name in FLOAT_TYPES} - set(allowed)
    found = []
    # _get_ops_details is the only op listing the Python Interpreter offers; it is stable across LiteRT releases.
    for op in interpreter._get_ops_details():
        if op["op_name"] != "DELEGATE" and floats & {int(i) for i in [*op["inputs"], *op["outputs"]]}:
            output = next((names[int(i)] for i in op["outputs"] if int(i) in names), "")
            found.append(FloatOp(op=op["op_name"], output=output))
    return found


def asks_full_integer(options: ConversionParameters) -> bool:
    """Whether ``options`` promise a model with integer operators only: a calibrated scheme under ``--ops int8``."""
    # mixed16 is integer-only by what it is, whatever the op sets allow.
    return options.scheme is QuantizationScheme.mixed16 or (options.scheme.calibrated and options.ops is TargetOps.int8)


def floats_not_asked_for(model_bytes: bytes, options: ConversionParameters) -> list[FloatOp]:
    """The operators of ``model_bytes`` that touch a float tensor ``options`` did not ask for: anything but a float
    model input (``--input-type float32``) or output (``--output-type float32``)."""
    from ai_edge_litert.interpreter import Interpreter

    with native_output_silenced():  # LiteRT announces its delegate on fd 2 for a process's first interpreter
        interpreter: Any = Interpreter(model_content=model_bytes, num_threads=1)
        allowed: set[int] = set()
        if options.input_type is TensorType.float32:
            allowed |= {int(d["index"]) for d in interpreter.get_input_details()}
        if options.output_type is TensorType.float32:
            allowed |= {int(d["index"]) for d in interpreter.get_output_details()}
        return float_ops(interpreter, allowed)


def require_integer(model_bytes: bytes, options: ConversionParameters) -> bytes:
    """``model_bytes`` when it keeps the promise of ``options`` (or ``options`` promise nothing).

    Raises:
        ConversionFailed: under ``--ops int8`` an operator stayed float; the message names them and the options
            that would work.
    """
    if not asks_full_integer(options):
        return model_bytes
    stayed = floats_not_asked_for(model_bytes, options)
    if not stayed:
        return model_bytes
    culprits = [op for op in stayed if op.op not in CONVERSIONS] or stayed
    fix = (
        "choose --scheme full_integer or int16x8 (the converter has integer kernels for more operators than the "
        "quantizer mixed16 uses)"
        if options.scheme is QuantizationScheme.mixed16
        else "allow float operators with --ops builtins"
    )
    kinds = sorted({op.op for op in culprits})
    named = ", ".join(kinds[:SHOWN_OPS]) + (", ..." if len(kinds) > SHOWN_OPS else "")
    raise ConversionFailed(
        f"conversion under --ops int8 left {named} in float ({len(stayed)} operators with float tensors, the "
        f"DEQUANTIZE and QUANTIZE around them counted; the first writes {culprits[0].output!r}), which an "
        f"integer-only device cannot run: replace those ops in the model, or {fix}"
    )
