"""Scheme ``mixed16``: int8 activations, raised to int16 layer by layer where int8 is not faithful enough.

Which layers need int16 is measured, not guessed: each layer is raised to int16 with the layers that read its
output, and the model's outputs compared with the float model's on calibration rows; the raises that help most
alone go first, each kept only if it helps on top of those already made, until the outputs are within
``--int16-within-db`` of whole-model int16's or ``--max-int16-fraction`` of the layers is spent.

Google's quantizer for ``.tflite`` (``litert_quantizer``) writes each model from the float ``.tflite`` with a
per-layer recipe; a boundary between an int8 and an int16 layer is one integer QUANTIZE (int16 and int8 requantize
into each other), and ``tasks.quantization.integer`` checks that the result holds no float tensor.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np

from ptqflow.storage.store import ArtifactRef
from ptqflow.tasks.core.artifacts import Int16Layer, MixedPrecisionChoice
from ptqflow.tasks.core.errors import ConversionFailed
from ptqflow.tasks.core.native import native_output_silenced
from ptqflow.tasks.core.parameters import ConversionParameters, QuantizationScheme
from ptqflow.tasks.core.progress import report
from ptqflow.tasks.evaluation.interpreter import predict_tflite, refused_rows
from ptqflow.tasks.evaluation.metrics import output_metrics, worst_sqnr
from ptqflow.tasks.models.feeds import keras_feed, model_input_slots
from ptqflow.tasks.models.outputs import model_outputs
from ptqflow.tasks.quantization.converter import (
    CalibrationBatches,
    convert_float,
    held_if_small,
    prepared_for_rounding,
    quantize,
)
from ptqflow.tasks.quantization.integer import require_integer
from ptqflow.tasks.quantization.ranges import DEFAULT_PERCENTILE, RANGE_METHODS, activation_histograms, choose_range

if TYPE_CHECKING:
    import keras

# Rows of the calibration set the search compares outputs on: enough for a stable SQNR, few enough that a search
# over a MobileNet's layers stays within a minute or two.
SEARCH_ROWS = 128
# The quantizer's op names for operators that only move, pick or reshape values: raising them alone changes
# nothing (they take their input's type), so they are not layers the search spends its budget on.
PASS_THROUGH_OPS = frozenset(
    {"RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "GATHER", "SLICE", "STRIDED_SLICE", "PACK", "UNPACK", "SPLIT",
     "SPLIT_V", "PAD", "PADV2", "MAX_POOL_2D", "CONCATENATION", "DEPTH_TO_SPACE", "SPACE_TO_DEPTH", "BROADCAST_TO"}
)  # fmt: skip


@dataclass(frozen=True)
class MixedPrecision:
    """What the search chose and measured (on ``rows`` calibration rows, against the float ``.tflite``)."""

    quantized: bytes
    int8_model: bytes  # the all-int8 model the search started from: the cost is measured against it
    # the raised layers that compute, most sensitive first (operator scopes of the float .tflite); the reshapes and
    # pooling between them follow them into int16 and are not counted
    int16_layers: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]  # each raised layer's Keras layer and TFLite operator
    layers: int  # the layers the search could raise
    int8_sqnr: float | None  # worst output SQNR in dB (None: identical to float)
    int16_sqnr: float | None  # whole-model int16's
    reached_sqnr: float | None
    int8_refused: int  # comparison rows the all-int8 model cannot run
    reached_refused: int
    target_met: bool
    rows: int

    def choice(self, max_int16_fraction: float, int8_model: ArtifactRef) -> MixedPrecisionChoice:
        """What the search chose, as the stages record it; ``int8_model``: the stored baseline of its cost."""
        return MixedPrecisionChoice(
            int16_layers=tuple(
                Int16Layer(layer=layer, op=op, tensor=scope)
                for (layer, op), scope in zip(self.labels, self.int16_layers, strict=True)
            ),
            layers=self.layers,
            max_int16_fraction=max_int16_fraction,
            int8_sqnr_db=self.int8_sqnr,
            int16_sqnr_db=self.int16_sqnr,
            reached_sqnr_db=self.reached_sqnr,
            int8_refused_rows=self.int8_refused,
            refused_rows=self.reached_refused,
            target_met=self.target_met,
            search_rows=self.rows,
            int8_model=int8_model,
        )


def _recipe(name: str) -> list[dict[str, Any]]:
    text = resources.files("litert_quantizer").joinpath("recipes").joinpath(name).read_text()
    return list(json.loads(text))


@functools.cache
def _builtin_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def _op_name(model: Any, op: Any) -> str:
    code = model.operatorCodes[op.opcodeIndex]
    return _builtin_names()[max(int(code.builtinCode), int(code.deprecatedBuiltinCode))]


def raisable_layers(float_tflite: bytes) -> dict[str, tuple[str, ...]]:
    """The operator scopes (the quantizer's names for layers: their output tensors' names) of the float model's
    operators that compute something, in graph order, each with the operators that read its output: the computing
    ones, and on the way to them the reshapes, pooling and the like, which the quantizer would otherwise give int8
    (rounding the int16 activation to int8 before it arrives)."""
    from litert_quantizer.utils import tfl_flatbuffer_utils as flatbuffers

    model = flatbuffers.read_model(bytearray(float_tflite))
    graph = model.subgraphs[0]
    readers: dict[int, list[Any]] = {}
    for op in graph.operators:
        for tensor in op.inputs:
            readers.setdefault(int(tensor), []).append(op)

    def readers_of(op: Any) -> list[str]:
        found: list[str] = []
        for tensor in op.outputs:
            for reader in readers.get(int(tensor), []):
                found.append(flatbuffers.get_op_scope(reader, graph.tensors))
                if _op_name(model, reader) in PASS_THROUGH_OPS:
                    found += readers_of(reader)
        return found

    return {
        flatbuffers.get_op_scope(op, graph.tensors): tuple(dict.fromkeys(readers_of(op)))
        for op in graph.operators
        if _op_name(model, op) not in PASS_THROUGH_OPS
    }


def general_int16_scales(quantized: bytes) -> bytes:
    """``quantized`` with each int16 ADD and SUB told to take any scales, as the converter's int16x8 writes them.

    The schema's default (``pot_scale_int16``: true), which the quantizer leaves, sends LiteRT to its power-of-two
    kernel whenever an add's three scales round to powers of two (ranges of exactly 1, 2, 4 ...), and that kernel
    cannot scale an input down: LiteRT refuses the model (``add.cc input1_shift <= 0``), as it did a16w8 on every
    MobileNetV2-style network we measured. The general kernel computes the same sum for any scales."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(quantized))
    changed = False
    for graph, op in ((subgraph, op) for subgraph in model.subgraphs for op in subgraph.operators):
        if _op_name(model, op) in ("ADD", "SUB") and graph.tensors[op.outputs[0]].type == schema.TensorType.INT16:
            if op.builtinOptions is None:  # absent options read as the defaults
                op.builtinOptionsType, op.builtinOptions = (
                    (schema.BuiltinOptions.AddOptions, schema.AddOptionsT())
                    if _op_name(model, op) == "ADD"
                    else (schema.BuiltinOptions.SubOptions, schema.SubOptionsT())
                )
            changed |= bool(op.builtinOptions.potScaleInt16)
            op.builtinOptions.potScaleInt16 = False
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)) if changed else quantized


def layer_labels(float_tflite: bytes, scopes: tuple[str, ...], model: keras.Model) -> list[tuple[str, str]]:
    """Each scope's Keras layer and TFLite operator, for the report."""
    from litert_quantizer.utils import tfl_flatbuffer_utils as flatbuffers

    from ptqflow.tasks.evaluation.diagnose import keras_layer_of, layer_names

    names, nested = layer_names(model)
    flat = flatbuffers.read_model(bytearray(float_tflite))
    tensors = flat.subgraphs[0].tensors
    ops = {flatbuffers.get_op_scope(op, tensors): _op_name(flat, op) for op in flat.subgraphs[0].operators}
    return [(keras_layer_of(scope.rstrip(";"), names, nested), ops.get(scope, "?")) for scope in scopes]


def _calibration_rows(
    calibration_batches: CalibrationBatches, slots: tuple, signature_inputs: list[str]
) -> Iterator[dict[str, np.ndarray]]:
    for batch in calibration_batches():
        rows = np.asarray(batch)
        for row in range(len(rows)):
            feed = keras_feed(rows[row : row + 1], slots)
            yield feed if isinstance(feed, dict) else {signature_inputs[0]: feed}


def _calibrated(
    float_tflite: bytes, recipe: list[dict[str, Any]], rows: list[dict[str, np.ndarray]]
) -> dict[str, dict[str, np.ndarray]]:
    """Each tensor's min and max over the calibration rows, as the converter's calibrator takes them. The
    quantizer's own calibration averages each row's min and max instead (a moving average): every range is then
    clipped to a typical row's, which costs int16 as much as int8 (11 dB against the float model's logits on a
    separable CNN whose int8 conversion keeps 31 dB)."""
    from litert_quantizer import calibrator, recipe_manager
    from litert_quantizer.utils import qsv_utils

    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(recipe)
    with native_output_silenced():  # a progress bar and the interpreter's notes
        calibration = calibrator.Calibrator(
            bytearray(float_tflite), num_threads=1, qsv_update_func=qsv_utils.min_max_update
        )
        calibration.calibrate({"serving_default": rows}, manager)
    return dict(calibration.get_model_qsvs())


def _finite(
    minmax: dict[str, dict[str, np.ndarray]], float_tflite: bytes, rows: list[dict[str, np.ndarray]]
) -> dict[str, dict[str, np.ndarray]]:
    """``minmax`` with each non-finite range replaced by the range of the tensor's finite values. A division by a
    window's maximum gives 0/0 on a silent window: the quantizer's calibrator then records NaN, which would become a
    NaN scale (LiteRT refuses such a model, or crashes on it). The converter's calibrator skips such values too."""
    broken = [
        name for name, r in minmax.items() if not (np.all(np.isfinite(r["min"])) and np.all(np.isfinite(r["max"])))
    ]
    if not broken:
        return minmax
    from ai_edge_litert.interpreter import Interpreter

    with native_output_silenced():  # "intended for debugging purposes only": reading every tensor is the point
        interpreter = Interpreter(model_content=float_tflite, experimental_preserve_all_tensors=True, num_threads=1)
    runner = interpreter.get_signature_runner("serving_default")
    indices = {d["name"]: d["index"] for d in interpreter.get_tensor_details() if d["name"] in broken}
    low = {name: np.inf for name in indices}
    high = {name: -np.inf for name in indices}
    for row in rows:
        runner(**row)
        for name, index in indices.items():
            values = interpreter.get_tensor(index)
            values = values[np.isfinite(values)]
            if values.size:
                low[name], high[name] = min(low[name], float(values.min())), max(high[name], float(values.max()))
    fixed = dict(minmax)
    for name in indices:
        shape = np.shape(minmax[name]["min"])
        lo, hi = (low[name], high[name]) if low[name] <= high[name] else (0.0, 0.0)
        fixed[name] = {"min": np.full(shape, min(lo, 0.0), np.float32), "max": np.full(shape, max(hi, 0.0), np.float32)}
    return fixed


class _Search:
    """The float model, its calibration and the comparison rows, shared by every model the search writes."""

    def __init__(self, model: keras.Model, float_tflite: bytes, calibration_batches: CalibrationBatches, options):
        from ai_edge_litert.interpreter import Interpreter

        self.float_tflite = float_tflite
        self.options: ConversionParameters = options
        self.slots = model_input_slots(model)
        signature = Interpreter(model_content=float_tflite).get_signature_list()["serving_default"]
        self.int8_recipe = _recipe("default_a8w8_recipe.json")
        self.int16_config = _recipe("default_a16w8_recipe.json")[0]
        rows = list(_calibration_rows(calibration_batches, self.slots, list(signature["inputs"])))
        self.minmax = _finite(_calibrated(float_tflite, self.int8_recipe, rows), float_tflite, rows)
        self.int8_ranges = self._method_ranges(calibration_batches)
        features = np.concatenate([np.asarray(b) for b in _head(calibration_batches, SEARCH_ROWS)])[:SEARCH_ROWS]
        self.features = features.astype(np.float32)
        self.layout = model_outputs(model)
        self.reference = predict_tflite(float_tflite, self.features, num_threads=1, inputs=self.slots, failures=[])

    def _method_ranges(self, calibration_batches: CalibrationBatches) -> dict[str, dict[str, np.ndarray]]:
        """The calibration's min/max, with ``--calibration-method`` choosing each activation's int8 range from its
        histogram as for the other schemes (min/max: as calibrated)."""
        method = self.options.calibration_method
        if RANGE_METHODS[method].choose is None:
            return self.minmax
        from litert_quantizer.utils import tfl_flatbuffer_utils as flatbuffers

        model = flatbuffers.read_model(bytearray(self.float_tflite))
        names = [flatbuffers.get_tensor_name(t) for t in model.subgraphs[0].tensors]
        calibrated = {
            i: (float(np.min(self.minmax[n]["min"])), float(np.max(self.minmax[n]["max"])))
            for i, n in enumerate(names)
            if n in self.minmax
        }
        histograms = activation_histograms(self.float_tflite, calibration_batches(), self.slots, calibrated)
        percentile = self.options.percentile or DEFAULT_PERCENTILE
        chosen = dict(self.minmax)
        for index, hist in histograms.items():
            low, high = choose_range(hist, method, percentile)
            shape = np.shape(self.minmax[names[index]]["min"])
            chosen[names[index]] = {"min": np.full(shape, low, np.float32), "max": np.full(shape, high, np.float32)}
        return chosen

    def quantize(self, int16_layers: tuple[str, ...] | None) -> bytes:
        """The model with ``int16_layers`` in int16 (None: every layer), the rest int8. Raised layers keep their
        min/max ranges: int16 has the resolution for them, and clipping would only cost."""
        from litert_quantizer import Quantizer

        if int16_layers is None:
            recipe, ranges = [dict(self.int16_config)], self.minmax
        else:
            recipe = self.int8_recipe + [dict(self.int16_config, regex=f"^{re.escape(s)}$") for s in int16_layers]
            ranges = dict(self.int8_ranges)
            for scope in int16_layers:
                for name in scope.rstrip(";").split(";"):
                    if name in self.minmax:
                        ranges[name] = self.minmax[name]
        with native_output_silenced():
            quantizer = Quantizer(bytearray(self.float_tflite), recipe)
            return general_int16_scales(bytes(quantizer.quantize(ranges, enable_progress_report=False).quantized_model))

    def score(self, quantized: bytes) -> Score:
        """How faithful ``quantized`` is on the comparison rows: how many it refuses (an int8 DIV by its zero point:
        int16 can hold a divisor int8 rounds to 0), then the worst output's SQNR against the float ``.tflite`` on the
        rows both run."""
        outputs = predict_tflite(quantized, self.features, num_threads=1, inputs=self.slots, failures=[])
        refused = refused_rows(outputs)
        ran = ~(refused | refused_rows(self.reference))
        if not ran.any():
            return Score(int(refused.sum()), -np.inf)
        return Score(int(refused.sum()), worst_sqnr(output_metrics(outputs[ran], self.reference[ran], self.layout)))


@dataclass(frozen=True)
class Score:
    refused: int  # comparison rows the model cannot run
    sqnr: float | None  # worst output's SQNR in dB on the others (None: identical to float)

    @property
    def rank(self) -> tuple[int, float]:
        """Smaller is better: fewer refused rows first, then a higher SQNR."""
        return (self.refused, -_db(self.sqnr))

    def reaches(self, target: Score | None, within_db: float) -> bool:
        if target is None:
            return False
        return self.refused <= target.refused and _db(self.sqnr) >= _db(target.sqnr) - within_db


def _head(calibration_batches: CalibrationBatches, rows: int) -> Iterator[np.ndarray]:
    taken = 0
    for batch in calibration_batches():
        yield np.asarray(batch)
        taken += len(batch)
        if taken >= rows:
            return


def _db(value: float | None) -> float:
    return float("inf") if value is None else value


def search_mixed(
    model: keras.Model, float_tflite: bytes, calibration_batches: CalibrationBatches, options: ConversionParameters
) -> MixedPrecision:
    """Scheme ``mixed16``'s search: the integer-only model with int16 activations in the layers
    that need them most, and what the search measured.

    Raises:
        ConversionFailed: the quantizer cannot write the model in int8, or LiteRT cannot run what it wrote.
    """
    search = _Search(model, float_tflite, calibration_batches, options)
    layers = raisable_layers(float_tflite)
    try:
        int8_model = search.quantize(())
        int8 = search.score(int8_model)
    except Exception as error:  # the quantizer's or LiteRT's refusal, in its own words
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ConversionFailed(
            f"scheme mixed16: the quantizer's int8 model of it cannot be written or run ({reason[:300]}): choose "
            "--scheme full_integer or int16x8"
        ) from error
    try:
        int16: Score | None = search.score(search.quantize(None))
    except Exception:  # an operator without an int16 kernel: the target is then the best any one layer reaches
        int16 = None
    budget = int(np.floor(options.max_int16_fraction * len(layers) + 1e-9))
    report("convert_to_tflite", f"mixed16: measuring how much each of {len(layers)} layers gains in int16")
    # A layer is raised with the layers that read its output: an int16 activation read by an int8 layer is
    # requantized to int8 at once, and keeps nothing of its precision (a divisor int8 rounds to 0 stays 0).
    gains: list[tuple[tuple[int, float], int, tuple[str, ...]]] = []
    for position, (scope, readers) in enumerate(layers.items()):
        unit = (scope, *readers)
        try:
            gains.append((search.score(search.quantize(unit)).rank, position, unit))
        except Exception:  # no int16 kernel for one of them here: they stay int8
            continue
    target = int16
    if target is None and gains:
        refused, negative_db = min(gains)[0]
        target = Score(refused, None if negative_db == -np.inf else -negative_db)
    chosen: tuple[str, ...] = ()
    quantized, reached = int8_model, int8
    # Best alone first; each raise is kept only if it helps on top of those already raised, so a unit that gains
    # nothing alone (a layer whose precision its int8 reader throws away) still gets its turn once its reader is up.
    for _, _, unit in sorted(gains):
        if reached.reaches(target, options.int16_within_db):
            break
        candidate = tuple(dict.fromkeys((*chosen, *unit)))
        if sum(scope in layers for scope in candidate) > budget or candidate == chosen:
            continue  # over the budget (reshapes and the like not counted): a smaller raise may still fit
        try:
            candidate_model = search.quantize(candidate)
            score = search.score(candidate_model)
        except Exception:  # together they meet an int16 kernel's limit (e.g. ADD's on its scales): skip this one
            continue
        if score.rank < reached.rank:
            chosen, quantized, reached = candidate, candidate_model, score
    return MixedPrecision(
        quantized=quantized,
        int8_model=int8_model,
        int16_layers=(computing := tuple(scope for scope in chosen if scope in layers)),
        labels=tuple(layer_labels(float_tflite, computing, model)),
        layers=len(layers),
        int8_sqnr=int8.sqnr,
        int16_sqnr=None if int16 is None else int16.sqnr,
        reached_sqnr=reached.sqnr,
        int8_refused=int8.refused,
        reached_refused=reached.refused,
        target_met=reached.reaches(target, options.int16_within_db),  # no target: no int16 layer could run
        rows=len(search.features),
    )


def quantize_int16(
    model: keras.Model, float_tflite: bytes, calibration_batches: CalibrationBatches, options: ConversionParameters
) -> bytes:
    """Every layer's activations in int16 (the quantizer's a16w8 recipe, int8 weights): the reference mixed16 aims
    at, for operators the converter's int16x8 has no kernel for (DIV, for one)."""
    return _Search(model, float_tflite, calibration_batches, options).quantize(None)


def quantization(
    model: keras.Model, calibration_batches: CalibrationBatches, options: ConversionParameters
) -> tuple[bytes, MixedPrecision | None]:
    """Pure stage function: the quantized ``.tflite`` of ``model`` under any scheme, and under mixed16 what the
    search chose and measured (every other scheme is the converter's ``quantize``).

    Raises:
        ConversionFailed: as ``quantize``; for mixed16 also the quantizer missing, or an operator it cannot write
            in integer (named).
    """
    if options.scheme is not QuantizationScheme.mixed16:
        return quantize(model, calibration_batches, options), None
    import importlib.util

    if importlib.util.find_spec("litert_quantizer") is None:
        raise ConversionFailed(
            "scheme mixed16 needs Google's quantizer for .tflite (litert-quantizer), which is not installed: "
            "pip install 'ptqflow[mixed]' (it needs ai-edge-litert 2.3), or choose --scheme full_integer or int16x8"
        )
    model = prepared_for_rounding(model, calibration_batches, options)
    search = search_mixed(model, convert_float(model), held_if_small(calibration_batches), options)
    return require_integer(search.quantized, options), search
