"""Activation ranges chosen from the calibration data (``--calibration-method``), written into the converter's
calibrated model before its own quantizer runs, so the result is still a ``.tflite`` quantized by TensorFlow.

The converter calibrates every activation tensor with the plain minimum and maximum over the calibration set
(``minmax``): one outlier stretches a tensor's range, and its other values get a handful of int8 steps. The other
methods look at the whole distribution, as a histogram of each tensor's values over the calibration set:

- ``percentile``: the range holding ``--percentile`` percent of the values (the rest is clipped), as Intel Neural
  Compressor and TensorRT offer;
- ``mse``: the range that minimises the expected squared error of quantizing the values (rounding inside,
  clipping outside), each end searched from the tensor's min (max) inwards;
- ``kl``: the range whose quantized histogram is closest to the original in Kullback-Leibler divergence
  (TensorRT's entropy calibration), over the same candidates.

A range always contains 0 (TFLite's quantization needs zero exactly representable). Weights are untouched: the
quantizer gives them per-channel (or per-tensor) scales from their own values.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from ptqflow.storage.tables import InputSlot
from ptqflow.tasks.core.parameters import DEFAULT_PERCENTILE, CalibrationMethod
from ptqflow.tasks.models.feeds import batch_dynamic, input_details, resize_inputs, set_inputs, tflite_input_indices

BINS = 2048  # histogram resolution: 8 bins per int8 step of the full range
LEVELS = 256  # int8
SHRINK_CANDIDATES = np.linspace(0.05, 1.0, 40)  # the fractions of min (and of max) that mse and kl consider


@dataclass
class Histogram:
    """The values of one tensor over the calibration set, binned over its min/max range."""

    low: float
    high: float
    counts: np.ndarray

    @property
    def centres(self) -> np.ndarray:
        edges = np.linspace(self.low, self.high, len(self.counts) + 1)
        return (edges[:-1] + edges[1:]) / 2


def _quantization_error(hist: Histogram, low: float, high: float) -> float:
    """Expected squared error of quantizing the histogram's values to LEVELS steps over [low, high]: rounding
    (step^2 / 12) inside, the distance to the edge outside."""
    x, weight = hist.centres, hist.counts
    step = (high - low) / (LEVELS - 1)
    clipped = np.clip(x, low, high)
    return float(np.sum(weight * ((x - clipped) ** 2 + step**2 / 12)) / max(1.0, weight.sum()))


def _kl_divergence(hist: Histogram, low: float, high: float) -> float:
    """KL(P || Q), as TensorRT's entropy calibration measures it: P the histogram inside [low, high] with the
    values outside folded into its edge bins (what clipping does to them); Q the histogram inside alone, quantized
    to LEVELS steps and spread back evenly over the non-empty bins each step covers. Clipping costs through the
    folded mass Q lacks, rounding through the spreading."""
    x, counts = hist.centres, hist.counts.astype(np.float64)
    inside = (x >= low) & (x <= high)
    if inside.sum() < LEVELS:
        return float("inf")  # fewer bins than steps: nothing to measure the rounding by
    kept = counts[inside]
    p = kept.copy()
    p[0] += counts[x < low].sum()
    p[-1] += counts[x > high].sum()
    level = np.minimum(((x[inside] - low) / (high - low) * LEVELS).astype(int), LEVELS - 1)
    total = np.bincount(level, weights=kept, minlength=LEVELS)
    nonzero = np.bincount(level, weights=(kept > 0).astype(np.float64), minlength=LEVELS)
    q = np.where(kept > 0, total[level] / np.maximum(nonzero[level], 1), 0.0)
    if not q.sum():
        return float("inf")
    p, q = p / p.sum(), q / q.sum()
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


# A tensor's histogram and --percentile -> its range (containing 0).
RangeChooser = Callable[[Histogram, float], tuple[float, float]]


def _percentile_range(hist: Histogram, percentile: float) -> tuple[float, float]:
    # Values of one sign (a ReLU's) lose their whole tail at the top; others half at each end.
    tail = (100.0 - percentile) / 100.0 / (2 if hist.low < 0 else 1)
    cumulative = np.cumsum(hist.counts) / hist.counts.sum()
    centres = hist.centres
    last = len(centres) - 1
    lo = float(centres[min(int(np.searchsorted(cumulative, tail)), last)]) if hist.low < 0 else hist.low
    hi = float(centres[min(int(np.searchsorted(cumulative, 1 - tail)), last)])
    return min(lo, 0.0), max(hi, 0.0)


def _least(loss: Callable[[Histogram, float, float], float]) -> RangeChooser:
    """The range among the shrunk candidates with the least ``loss``."""

    def choose(hist: Histogram, percentile: float) -> tuple[float, float]:
        low, high = min(hist.low, 0.0), max(hist.high, 0.0)
        # Each end on its own (a tensor's outliers are often on one side); the widest range wins a tie.
        lows = [low * f for f in SHRINK_CANDIDATES] if low < 0 else [0.0]
        highs = [high * f for f in SHRINK_CANDIDATES] if high > 0 else [0.0]
        candidates = [(lo, hi) for lo in lows for hi in highs if hi > lo]
        best = min(candidates, key=lambda r: (loss(hist, r[0], r[1]), r[0] - r[1]))
        return float(best[0]), float(best[1])

    return choose


@dataclass(frozen=True)
class RangeMethod:
    """One way to choose the activation ranges (``--calibration-method``)."""

    label: str  # how the report and the sweep name it: "<label> activation ranges"
    choose: RangeChooser | None  # None: the converter's own min/max, kept as calibrated (no histogram pass)
    in_sweep: bool = True  # the sweep compares it (``tasks.sweep.grid``); the converter's own is the base row


# The slot for a new method: a CalibrationMethod member and its row here. The converter, the sweep's grid and the
# report take their methods from this table (a test checks that every member has a row).
RANGE_METHODS: dict[CalibrationMethod, RangeMethod] = {
    CalibrationMethod.minmax: RangeMethod("min/max", None, in_sweep=False),
    CalibrationMethod.percentile: RangeMethod("percentile", _percentile_range),
    CalibrationMethod.mse: RangeMethod("mse", _least(_quantization_error)),
    CalibrationMethod.kl: RangeMethod("kl", _least(_kl_divergence)),
}


def choose_range(
    hist: Histogram, method: CalibrationMethod, percentile: float = DEFAULT_PERCENTILE
) -> tuple[float, float]:
    """The range ``method`` chooses for a tensor whose values ``hist`` holds; always containing 0."""
    low, high = min(hist.low, 0.0), max(hist.high, 0.0)
    chooser = RANGE_METHODS[method].choose
    if chooser is None or high <= low or not hist.counts.sum():
        return low, high
    return chooser(hist, percentile)


def calibrated_tensors(calibrated: bytes) -> dict[int, tuple[float, float]]:
    """The activation tensors of the converter's calibrated model (index -> its min/max over the calibration
    set): those whose quantization parameters hold a min and a max."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(calibrated))
    found = {}
    for index, tensor in enumerate(model.subgraphs[0].tensors):
        q = tensor.quantization
        if q is not None and q.min is not None and q.max is not None and len(q.min) == 1 and len(q.max) == 1:
            found[index] = (float(q.min[0]), float(q.max[0]))
    return found


def activation_histograms(
    calibrated: bytes,
    batches: Iterable[np.ndarray],
    inputs: tuple[InputSlot, ...] = (),
    ranges: dict[int, tuple[float, float]] | None = None,
) -> dict[int, Histogram]:
    """Each calibrated activation's non-zero values over ``batches`` (the calibration set again, several ``inputs``
    packed side by side), binned over its calibrated min/max: the calibrated model is run as the float model it is,
    keeping every tensor. ``ranges``: the tensors' min/max when they come from elsewhere than the model's own
    quantization parameters (a float model calibrated by another tool)."""
    from ai_edge_litert.interpreter import Interpreter

    ranges = calibrated_tensors(calibrated) if ranges is None else ranges
    histograms = {i: Histogram(lo, hi, np.zeros(BINS, np.int64)) for i, (lo, hi) in ranges.items() if hi > lo}
    with warnings.catch_warnings():  # "intended for debugging purposes only": reading every tensor is the point
        warnings.simplefilter("ignore")
        interpreter = Interpreter(model_content=calibrated, experimental_preserve_all_tensors=True, num_threads=1)
    indices = tflite_input_indices(interpreter, inputs)
    first = input_details(interpreter, indices)
    dynamic = batch_dynamic(first)
    allocated = None
    for batch in batches:
        step = len(batch) if dynamic else int(first[0]["shape"][0])
        for start in range(0, len(batch), step):
            rows = np.asarray(batch[start : start + step], np.float32)
            if len(rows) != allocated:
                if dynamic:
                    resize_inputs(interpreter, first, len(rows))
                interpreter.allocate_tensors()
                allocated = len(rows)
            if len(rows) < step and not dynamic:  # a fixed batch: pad, and count only the real rows
                rows = np.concatenate([rows, np.zeros((step - len(rows), *rows.shape[1:]), np.float32)])
            set_inputs(interpreter, input_details(interpreter, indices), rows, inputs)  # float inputs: as they are
            interpreter.invoke()
            real = min(step, len(batch) - start)
            for index, hist in histograms.items():
                values = interpreter.get_tensor(index)[:real].ravel()
                # Zeros are exact at any range (the zero point is an integer): only the others weigh in. So the
                # half of a ReLU's outputs that are 0 do not pull its range in. Clipped: a value the interpreter
                # computes a rounding beyond the calibrator's min/max still counts.
                values = np.clip(values[values != 0], hist.low, hist.high)
                hist.counts += np.histogram(values, bins=BINS, range=(hist.low, hist.high))[0]
    return histograms


def with_ranges(calibrated: bytes, ranges: dict[int, tuple[float, float]]) -> bytes:
    """The calibrated model with these min/max ranges in place of the calibrated ones."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(calibrated))
    tensors = model.subgraphs[0].tensors
    for index, (low, high) in ranges.items():
        tensors[index].quantization.min = [low]
        tensors[index].quantization.max = [high]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))
