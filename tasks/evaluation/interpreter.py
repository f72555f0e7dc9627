"""Running ``.tflite`` models with the LiteRT Interpreter: batched prediction, the tensor-type audit and timing.

Inputs are quantized and outputs dequantized with each tensor's own scale and zero point, read from the model;
never a hard-coded mapping such as the tutorial's ``x * 255 - 128``. The files ptqflow ships take one sample per
call (a device's shape); they are evaluated as they are, with the inputs quantized once for all rows. A
batch-dynamic model is resized to whole batches instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ptqflow.storage.tables import InputSlot
from ptqflow.tasks.core.artifacts import UnrunnableSamples
from ptqflow.tasks.core.native import native_output_silenced
from ptqflow.tasks.core.validation_report import LatencyPercentiles, Speed, TensorQuantization, TypeAudit
from ptqflow.tasks.models.feeds import (
    batch_dynamic,
    input_details,
    input_parts,
    keras_feed,
    quantize_input,
    resize_inputs,
    set_inputs,
    tflite_input_indices,
)
from ptqflow.tasks.models.outputs import flatten_outputs, tflite_output_order
from ptqflow.tasks.quantization.integer import FLOAT_TYPES, float_ops

if TYPE_CHECKING:
    import keras
    from ai_edge_litert.interpreter import Interpreter


_first_interpreter = threading.Lock()  # one thread allocates the first interpreter silenced; the others wait
_first_interpreter_done = False


def make_interpreter(model_bytes: bytes, num_threads: int | None = None) -> Interpreter:
    global _first_interpreter_done
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_bytes, num_threads=num_threads or os.cpu_count() or 1)
    if not _first_interpreter_done:
        # LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on fd 2 from C++ when the first
        # interpreter of a process allocates its tensors (once per process; no setting turns it off): that once,
        # allocate with the output silenced. Allocating again later (after a resize) is what callers do anyway.
        with _first_interpreter:
            if not _first_interpreter_done:
                with native_output_silenced(), contextlib.suppress(RuntimeError, ValueError):
                    interpreter.allocate_tensors()  # a model it cannot run fails again, reported, where it is used
                _first_interpreter_done = True
    return interpreter


def dequantize_output(values: np.ndarray, detail: dict) -> np.ndarray:
    """Map an output tensor back to float with its own (scale, zero point)."""
    if np.dtype(detail["dtype"]).kind == "f":
        return values.astype(np.float32, copy=False)
    scale, zero_point = detail["quantization"]
    return (values.astype(np.float32) - zero_point) * scale


@dataclass(frozen=True)
class RowFailure:
    """Rows ``start`` to ``stop`` (one call's) that the interpreter refused to run, with its message."""

    start: int
    stop: int
    message: str


def predict_tflite(
    model_bytes: bytes,
    features: np.ndarray,
    batch_size: int = 256,
    num_threads: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    inputs: tuple[InputSlot, ...] = (),
    failures: list[RowFailure] | None = None,
) -> np.ndarray:
    """Dequantized outputs of a ``.tflite`` model for raw ``features`` (several ``inputs`` packed side by side, fed
    by name); a model with several outputs gives them side by side, flattened, in the Keras model's order
    (``tasks.models.outputs``). A batch-dynamic model runs ``batch_size`` rows per call; a model of fixed batch (what
    ptqflow ships: batch 1) runs as it is, one call per batch of its size.

    With ``failures``, a call the interpreter refuses (a kernel's check on the values, e.g. an int8 DIV by its zero
    point) is recorded there and its rows' outputs are NaN, instead of raising (fixed-batch models only)."""
    predictor = TflitePredictor(model_bytes, batch_size, num_threads, inputs, expected_rows=len(features))
    return predictor.predict(features, on_batch, failures)


class TflitePredictor:
    """``predict_tflite`` over consecutive parts of the same rows (a split read window by window): one interpreter
    for all, and one thread trial (``expected_rows``: the rows there will be in all)."""

    def __init__(
        self,
        model_bytes: bytes,
        batch_size: int = 256,
        num_threads: int | None = None,
        inputs: tuple[InputSlot, ...] = (),
        expected_rows: int = 0,
    ) -> None:
        self._model_bytes, self._batch_size, self._inputs = model_bytes, batch_size, inputs
        self._interpreter = make_interpreter(model_bytes, num_threads)
        self._indices = tflite_input_indices(self._interpreter, inputs)
        self._fixed = not batch_dynamic(input_details(self._interpreter, self._indices))
        self._trial = (
            self._fixed and num_threads is None and expected_rows >= THREAD_TRIAL_ROWS and (os.cpu_count() or 1) > 1
        )
        self._allocated_for: int | None = None

    def predict(
        self,
        features: np.ndarray,
        on_batch: Callable[[int], None] | None = None,
        failures: list[RowFailure] | None = None,
    ) -> np.ndarray:
        """The outputs on ``features``; ``failures`` gets the refused calls, rows counted from ``features``'s
        first."""
        interpreter, indices, inputs = self._interpreter, self._indices, self._inputs
        if self._fixed:
            if self._trial and len(features):
                single = make_interpreter(self._model_bytes, 1)
                self._interpreter = interpreter = _faster(
                    interpreter, single, indices, features[:1].astype(np.float32), inputs
                )
                self._trial = False
            return _predict_fixed_batch(interpreter, indices, features, on_batch, inputs, failures)
        order = tflite_output_order(interpreter)
        outputs = []
        for start in range(0, len(features), self._batch_size):
            batch = features[start : start + self._batch_size].astype(np.float32)
            if len(batch) != self._allocated_for:
                resize_inputs(interpreter, input_details(interpreter, indices), len(batch))
                interpreter.allocate_tensors()
                self._allocated_for = len(batch)
            details = input_details(interpreter, indices)
            by_index = {d["index"]: d for d in interpreter.get_output_details()}
            outs = [by_index[i] for i in order]
            set_inputs(interpreter, details, batch, inputs)
            interpreter.invoke()
            results = [dequantize_output(interpreter.get_tensor(out["index"]), out) for out in outs]
            outputs.append(results[0] if len(results) == 1 else flatten_outputs(results))
            if on_batch:
                on_batch(start + len(batch))
        return np.concatenate(outputs)


def refused_rows(outputs: np.ndarray) -> np.ndarray:
    """The rows whose outputs are NaN: those ``predict_tflite`` recorded as refused."""
    return np.isnan(outputs.reshape(len(outputs), -1)).any(axis=1)


NODE_FAILED = re.compile(r"Node number (\d+) \((\w+)\) failed to invoke")
SHOWN_FAILURES = 5


def unrunnable_samples(model: str, failures: list[RowFailure], of_rows: int) -> UnrunnableSamples | None:
    """The rows ``model`` refused of the ``of_rows`` it was given, counted, with the operators that refused them and
    a few examples."""
    if not failures:
        return None
    operators = {
        f"{match.group(2)} (node {match.group(1)})"
        for failure in failures
        for match in NODE_FAILED.finditer(failure.message)
    }
    return UnrunnableSamples(
        model=model,
        count=sum(failure.stop - failure.start for failure in failures),
        of_rows=of_rows,
        operators=tuple(sorted(operators)),
        examples=tuple(f"row {f.start}: {' '.join(f.message.split())[:300]}" for f in failures[:SHOWN_FAILURES]),
    )


PROGRESS_ROWS = 256  # how often the fixed-batch loop reports progress, in rows
# One sample per call: on a small model, the threads' hand-off costs more than they save, on a large one they pay.
# Which holds is timed on the first row (TRIAL_CALLS calls each) when there are enough rows to repay the trial.
THREAD_TRIAL_ROWS = 256
TRIAL_CALLS = 16


def _faster(
    threaded: Interpreter, single: Interpreter, indices: list[int], row: np.ndarray, inputs: tuple[InputSlot, ...]
) -> Interpreter:
    """Whichever interpreter runs ``row`` faster (their outputs are the same: the threads split the work, not the
    sums); ``threaded`` when the row cannot run."""
    timings = []
    for interpreter in (threaded, single):
        try:
            interpreter.allocate_tensors()
            set_inputs(interpreter, input_details(interpreter, indices), row, inputs)
            calls = _timed(interpreter.invoke, budget_seconds=0.2, most=TRIAL_CALLS, least=3)
            timings.append(float(np.median(calls)))
        except RuntimeError:  # a row the model refuses: the loop records it
            return threaded
    return single if timings[1] < timings[0] else threaded


def _predict_fixed_batch(
    interpreter: Interpreter,
    indices: list[int],
    features: np.ndarray,
    on_batch: Callable[[int], None] | None,
    inputs: tuple[InputSlot, ...],
    failures: list[RowFailure] | None,
) -> np.ndarray:
    """``predict_tflite`` for a model of fixed batch: the inputs are quantized once, whole, and each call only
    copies its rows in and its outputs out (the per-call cost is what a batch-1 model's evaluation spends)."""
    interpreter.allocate_tensors()
    details = input_details(interpreter, indices)
    step = int(details[0]["shape"][0])
    rows = len(features)
    padded = -rows % step  # the last call's missing rows are zeros, and their outputs dropped
    parts = [
        quantize_input(np.pad(part.astype(np.float32), [(0, padded)] + [(0, 0)] * (part.ndim - 1)), detail)
        for detail, part in zip(details, input_parts(features, inputs))
    ]
    by_index = {d["index"]: d for d in interpreter.get_output_details()}
    outs = [by_index[i] for i in tflite_output_order(interpreter)]
    raw = [np.empty((rows + padded, *out["shape"][1:]), out["dtype"]) for out in outs]
    set_tensor, invoke, get_tensor = interpreter.set_tensor, interpreter.invoke, interpreter.get_tensor
    reported = 0
    refused: list[RowFailure] = []
    for start in range(0, rows, step):
        for detail, part in zip(details, parts):
            set_tensor(detail["index"], part[start : start + step])
        try:
            invoke()
        except RuntimeError as error:  # the kernel refused these values; the interpreter runs the next call
            if failures is None:
                raise
            # LiteRT's error reporter keeps earlier calls' messages in front of this one's: keep the last.
            message = [part for part in re.split(r"(?<=failed to invoke\.)", str(error)) if part.strip()][-1:]
            refused.append(RowFailure(start, min(start + step, rows), " ".join(message).strip() or str(error)))
            continue
        for out, values in zip(outs, raw):
            values[start : start + step] = get_tensor(out["index"])
        if on_batch and (start + step - reported >= PROGRESS_ROWS or start + step >= rows):
            reported = min(start + step, rows)
            on_batch(reported)
    results = [dequantize_output(values[:rows], out).astype(np.float32, copy=False) for out, values in zip(outs, raw)]
    for failure in refused:
        for result in results:
            result[failure.start : failure.stop] = np.nan
    if failures is not None:
        failures.extend(refused)
    return results[0] if len(results) == 1 else flatten_outputs(results)


def audit_tensor_types(model_bytes: bytes) -> TypeAudit:
    """Every tensor's type and every op, without running the model (so it works on models the Interpreter cannot
    run, e.g. with TensorFlow (Flex) ops)."""
    interpreter = make_interpreter(model_bytes, 1)
    details = interpreter.get_tensor_details()
    dtypes: dict[str, int] = {}
    floats: list[str] = []
    for d in details:
        name = np.dtype(d["dtype"]).name
        dtypes[name] = dtypes.get(name, 0) + 1
        if name in FLOAT_TYPES:
            floats.append(d["name"])
    ops = sorted({op["op_name"] for op in interpreter._get_ops_details() if op["op_name"] != "DELEGATE"})
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    named_inputs = (
        interpreter.get_signature_runner().get_input_details() if len(interpreter.get_input_details()) > 1 else {}
    )
    return TypeAudit(
        full_integer=not floats,
        float_tensors=floats,
        float_ops=float_ops(interpreter),
        flex_ops=[op for op in ops if op.startswith("Flex")],
        dtypes=dict(sorted(dtypes.items())),
        ops=ops,
        input=_quantization_of(inp),
        output=_quantization_of(out),
        inputs={name: _quantization_of(detail) for name, detail in sorted(named_inputs.items())},
        dynamic_tensors=[d["name"] for d in details if -1 in list(d["shape_signature"])],
    )


def _quantization_of(detail: dict) -> TensorQuantization:
    scale, zero_point = detail["quantization"]
    return TensorQuantization(dtype=np.dtype(detail["dtype"]).name, scale=float(scale), zero_point=int(zero_point))


def _percentiles(seconds: list[float]) -> LatencyPercentiles:
    ms = np.asarray(seconds) * 1000
    return LatencyPercentiles(
        p50=round(float(np.percentile(ms, 50)), 4), p95=round(float(np.percentile(ms, 95)), 4), runs=len(ms)
    )


def _timed(call: Callable[[], object], budget_seconds: float, most: int, least: int = 10) -> list[float]:
    for _ in range(3):  # warm-up: first invocations allocate and pack weights
        call()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < most and (len(times) < least or time.perf_counter() - started < budget_seconds):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def rerun_max_difference(
    model_bytes: bytes,
    features: np.ndarray,
    outputs: np.ndarray,
    batch_size: int,
    num_threads: int | None,
    inputs: tuple[InputSlot, ...] = (),
) -> float:
    """The largest difference between ``outputs`` and a second run on the first batch of ``features``: some
    LiteRT kernels give different outputs for the same input from one invoke to the next (measured: MobileNetV2
    under dynamic range with per-tensor weights, on every op resolver), and such a model is not one to ship."""
    rerun = predict_tflite(model_bytes, features[:batch_size], batch_size, num_threads, inputs=inputs)
    return float(np.max(np.abs(rerun - outputs[: len(rerun)]))) if rerun.size else 0.0


def tflite_speed(
    model_bytes: bytes,
    features: np.ndarray,
    batch_size: int,
    num_threads: int,
    budget_seconds: float = 1.0,
    inputs: tuple[InputSlot, ...] = (),
) -> Speed:
    """Latency at batch 1 (p50, p95) and throughput at ``batch_size``, on this machine, with ``num_threads``."""
    interpreter = make_interpreter(model_bytes, num_threads)
    indices = tflite_input_indices(interpreter, inputs)
    first = input_details(interpreter, indices)
    dynamic = batch_dynamic(first)

    def prepared(size: int) -> None:
        if dynamic:
            resize_inputs(interpreter, first, size)
        interpreter.allocate_tensors()
        details = input_details(interpreter, indices)
        set_inputs(interpreter, details, features[: int(details[0]["shape"][0])].astype(np.float32), inputs)

    prepared(1)
    latency = _percentiles(_timed(interpreter.invoke, budget_seconds, most=500))
    batch = min(batch_size, len(features)) if dynamic else int(first[0]["shape"][0])
    prepared(batch)
    per_batch = _timed(interpreter.invoke, budget_seconds, most=50, least=3)
    return Speed(
        latency_ms=latency, throughput_per_s=round(batch / float(np.median(per_batch)), 1), throughput_batch=batch
    )


def keras_speed(
    model: keras.Model,
    features: np.ndarray,
    batch_size: int,
    budget_seconds: float = 1.0,
    inputs: tuple[InputSlot, ...] = (),
) -> Speed:
    one = keras_feed(features[:1], inputs)
    batch = keras_feed(features[:batch_size], inputs)
    batch_rows = len(features[:batch_size])
    latency = _percentiles(_timed(lambda: model(one, training=False), budget_seconds, most=500))
    per_batch = _timed(lambda: model(batch, training=False), budget_seconds, most=50, least=3)
    return Speed(
        latency_ms=latency,
        throughput_per_s=round(batch_rows / float(np.median(per_batch)), 1),
        throughput_batch=batch_rows,
    )
