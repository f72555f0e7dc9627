"""Stage 5, validate_with_interpreter: float vs quantized accuracy with the LiteRT Interpreter, a dtype audit,
sizes, and the accuracy gate.

Inputs are quantized and outputs dequantized with each tensor's own scale and zero point, read from the model;
never a hard-coded mapping such as the tutorial's ``x * 255 - 128``. Evaluation is batched: the input tensor is
resized to a whole batch, so the Interpreter runs once per batch instead of once per sample.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from prefect import get_run_logger, task
from pydantic import BaseModel

from ptqflow.storage.keras_models import keras_model_from_bytes
from ptqflow.storage.store import ArtifactStore
from ptqflow.storage.tables import read_parquet
from ptqflow.tasks.artifacts import (
    CalibrationSet,
    ConvertedModels,
    FloatOutputs,
    RepairResult,
    SampledDataset,
    TrainedModel,
    ValidationResult,
    WorstLayer,
)
from ptqflow.tasks.caching import StageCachePolicy
from ptqflow.tasks.convert import native_output_silenced
from ptqflow.tasks.diagnose import LayerError, layer_errors
from ptqflow.tasks.parameters import ConversionParameters, QuantizationScheme, TargetOps, ValidationParameters
from ptqflow.tasks.progress import report
from ptqflow.tasks.report import REPORT_VERSION, render_html, render_markdown

if TYPE_CHECKING:
    import keras
    from ai_edge_litert.interpreter import Interpreter

FLOAT_TYPES = ("float16", "float32", "float64")


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


def dequantize_output(values: np.ndarray, detail: dict) -> np.ndarray:
    """Map an output tensor back to float with its own (scale, zero point)."""
    if np.dtype(detail["dtype"]).kind == "f":
        return values.astype(np.float32, copy=False)
    scale, zero_point = detail["quantization"]
    return (values.astype(np.float32) - zero_point) * scale


def predict_tflite(
    model_bytes: bytes,
    features: np.ndarray,
    batch_size: int = 256,
    num_threads: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Dequantized outputs of a ``.tflite`` model for raw ``features``, evaluated in batches."""
    interpreter = make_interpreter(model_bytes, num_threads)
    inp = interpreter.get_input_details()[0]
    batch_dynamic = int(inp["shape_signature"][0]) == -1
    step = batch_size if batch_dynamic else int(inp["shape"][0])
    outputs = []
    allocated_for = None
    for start in range(0, len(features), step):
        batch = features[start : start + step].astype(np.float32)
        if len(batch) != allocated_for:
            if batch_dynamic:
                interpreter.resize_tensor_input(inp["index"], [len(batch), *inp["shape"][1:]], strict=True)
            elif len(batch) != step:
                batch = np.concatenate([batch, np.zeros((step - len(batch), *batch.shape[1:]), np.float32)])
            interpreter.allocate_tensors()
            allocated_for = len(batch)
            inp = interpreter.get_input_details()[0]
            out = interpreter.get_output_details()[0]
        interpreter.set_tensor(inp["index"], quantize_input(batch, inp))
        interpreter.invoke()
        result = dequantize_output(interpreter.get_tensor(out["index"]), out)
        outputs.append(result[: min(step, len(features) - start)])
        if on_batch:
            on_batch(min(start + step, len(features)))
    return np.concatenate(outputs)


def predict_keras(model: keras.Model, features: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.asarray(model.predict(features.astype(np.float32), batch_size=batch_size, verbose=0))


@dataclass(frozen=True)
class TensorTypeAudit:
    """Element types inside a ``.tflite``: a full-integer model has no float tensor at all."""

    dtypes: dict[str, int]
    float_tensors: tuple[str, ...]
    ops: tuple[str, ...]
    float_ops: tuple[dict[str, str], ...]
    flex_ops: tuple[str, ...]
    input_type: str
    output_type: str
    input_quantization: tuple[float, int]
    output_quantization: tuple[float, int]

    @property
    def full_integer(self) -> bool:
        return not self.float_tensors


def audit_tensor_types(model_bytes: bytes) -> TensorTypeAudit:
    """Every tensor's type and every op, without running the model (so it works on models the Interpreter cannot
    run, e.g. with TensorFlow (Flex) ops)."""
    interpreter = make_interpreter(model_bytes, 1)
    details = interpreter.get_tensor_details()
    dtypes: dict[str, int] = {}
    floats = []
    dtype_of = {}
    for d in details:
        name = np.dtype(d["dtype"]).name
        dtype_of[d["index"]] = (name, d["name"])
        dtypes[name] = dtypes.get(name, 0) + 1
        if name in FLOAT_TYPES:
            floats.append(d["name"])
    # _get_ops_details is the only op listing the Python Interpreter offers; it is stable across LiteRT releases.
    op_details = [op for op in interpreter._get_ops_details() if op["op_name"] != "DELEGATE"]
    ops = sorted({op["op_name"] for op in op_details})
    float_ops = []
    for op in op_details:
        tensors = [dtype_of[i] for i in [*op["inputs"], *op["outputs"]] if i in dtype_of]
        if any(dtype in FLOAT_TYPES for dtype, _ in tensors):
            output = next((dtype_of[i][1] for i in op["outputs"] if i in dtype_of), "")
            float_ops.append({"op": op["op_name"], "output": output})
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    return TensorTypeAudit(
        dtypes=dict(sorted(dtypes.items())),
        float_tensors=tuple(floats),
        ops=tuple(ops),
        float_ops=tuple(float_ops),
        flex_ops=tuple(op for op in ops if op.startswith("Flex")),
        input_type=np.dtype(inp["dtype"]).name,
        output_type=np.dtype(out["dtype"]).name,
        input_quantization=(float(inp["quantization"][0]), int(inp["quantization"][1])),
        output_quantization=(float(out["quantization"][0]), int(out["quantization"][1])),
    )


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float((probabilities.argmax(axis=1) == labels).mean())


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    return np.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def sqnr_db(reference: np.ndarray, output: np.ndarray) -> float | None:
    """Signal-to-quantization-noise ratio of ``output`` against ``reference``; None when they are identical."""
    noise = float(np.sum((output.astype(np.float64) - reference) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return None if noise == 0 else round(10 * np.log10(signal / noise), 4)


def _percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {
        "p50": round(float(np.percentile(ms, 50)), 4),
        "p95": round(float(np.percentile(ms, 95)), 4),
        "runs": len(ms),
    }


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
    model_bytes: bytes, features: np.ndarray, outputs: np.ndarray, batch_size: int, num_threads: int | None
) -> float:
    """The largest difference between ``outputs`` and a second run on the first batch of ``features``: some
    LiteRT kernels give different outputs for the same input from one invoke to the next (measured: MobileNetV2
    under dynamic range with per-tensor weights, on every op resolver), and such a model is not one to ship."""
    rerun = predict_tflite(model_bytes, features[:batch_size], batch_size, num_threads)
    return float(np.max(np.abs(rerun - outputs[: len(rerun)]))) if rerun.size else 0.0


def tflite_speed(
    model_bytes: bytes, features: np.ndarray, batch_size: int, num_threads: int, budget_seconds: float = 1.0
) -> dict:
    """Latency at batch 1 (p50, p95) and throughput at ``batch_size``, on this machine, with ``num_threads``."""
    interpreter = make_interpreter(model_bytes, num_threads)
    inp = interpreter.get_input_details()[0]
    batch_dynamic = int(inp["shape_signature"][0]) == -1

    def prepared(size: int) -> None:
        if batch_dynamic:
            interpreter.resize_tensor_input(inp["index"], [size, *inp["shape"][1:]], strict=True)
        interpreter.allocate_tensors()
        detail = interpreter.get_input_details()[0]
        rows = features[: int(detail["shape"][0])].astype(np.float32)
        interpreter.set_tensor(detail["index"], quantize_input(rows, detail))

    prepared(1)
    latency = _percentiles(_timed(interpreter.invoke, budget_seconds, most=500))
    batch = min(batch_size, len(features)) if batch_dynamic else int(inp["shape"][0])
    prepared(batch)
    per_batch = _timed(interpreter.invoke, budget_seconds, most=50, least=3)
    return {
        "latency_ms": latency,
        "throughput_per_s": round(batch / float(np.median(per_batch)), 1),
        "throughput_batch": batch,
    }


def keras_speed(model: keras.Model, features: np.ndarray, batch_size: int, budget_seconds: float = 1.0) -> dict:
    one = features[:1].astype(np.float32)
    batch = features[:batch_size].astype(np.float32)
    latency = _percentiles(_timed(lambda: model(one, training=False), budget_seconds, most=500))
    per_batch = _timed(lambda: model(batch, training=False), budget_seconds, most=50, least=3)
    return {
        "latency_ms": latency,
        "throughput_per_s": round(len(batch) / float(np.median(per_batch)), 1),
        "throughput_batch": len(batch),
    }


def model_metrics(outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, per-class accuracy, confusion matrix, and agreement and output error against the float model."""
    predicted = outputs.argmax(axis=1)
    matrix = confusion_matrix(predicted, labels, len(class_names))
    per_class = {
        name: (round(float(matrix[i, i] / matrix[i].sum()), 6) if matrix[i].sum() else None)
        for i, name in enumerate(class_names)
    }
    return {
        "accuracy": accuracy(outputs, labels),
        "per_class_accuracy": per_class,
        "confusion_matrix": matrix.tolist(),
        "agreement_with_float": float((predicted == reference.argmax(axis=1)).mean()),
        "output_mae": round(float(np.mean(np.abs(outputs - reference))), 9),
        "output_sqnr_db": sqnr_db(reference, outputs),
    }


def _audit_json(audit: TensorTypeAudit) -> dict:
    return {
        "full_integer": audit.full_integer,
        "float_tensors": list(audit.float_tensors),
        "float_ops": list(audit.float_ops),
        "flex_ops": list(audit.flex_ops),
        "dtypes": audit.dtypes,
        "ops": list(audit.ops),
        "input": {
            "dtype": audit.input_type,
            "scale": audit.input_quantization[0],
            "zero_point": audit.input_quantization[1],
        },
        "output": {
            "dtype": audit.output_type,
            "scale": audit.output_quantization[0],
            "zero_point": audit.output_quantization[1],
        },
    }


def evaluate_models(
    keras_model: keras.Model,
    float_tflite: bytes,
    quantized_tflite: bytes,
    features: np.ndarray,
    labels: np.ndarray,
    params: ValidationParameters,
    class_names: list[str] | None = None,
    measure_speed: bool = True,
    keras_outputs: np.ndarray | None = None,
) -> dict:
    """Pure stage function: every metric of the validation report, as a JSON-ready dict. ``keras_outputs``, the
    float Keras model's outputs on ``features`` when they are known already, saves predicting them again.

    A model with TensorFlow (Flex) ops cannot run in the Python LiteRT Interpreter: it is reported as not
    validated, with its audit, never as a pass."""

    def progress(model_name):
        return lambda done: report(
            "validate_with_interpreter", f"{model_name}: {done}/{len(features)} samples", done, len(features)
        )

    names = class_names or [str(i) for i in range(int(labels.max()) + 1)]
    num_threads = params.num_threads or os.cpu_count() or 1
    audit = audit_tensor_types(quantized_tflite)
    float_audit = audit_tensor_types(float_tflite)
    keras_out = predict_keras(keras_model, features, params.batch_size) if keras_outputs is None else keras_outputs
    float_accuracy = accuracy(keras_out, labels)
    common = {
        "samples": int(len(labels)),
        "class_names": names,
        "float_accuracy": float_accuracy,
        "float_bytes": len(float_tflite),
        "quantized_bytes": len(quantized_tflite),
        "size_ratio": round(len(float_tflite) / len(quantized_tflite), 4),
        "num_threads": num_threads,
        "audit": _audit_json(audit),
    }
    flex = sorted(set(audit.flex_ops) | set(float_audit.flex_ops))
    if flex:
        return {
            **common,
            "validated": False,
            "not_validated_reason": (
                f"the model uses TensorFlow (Flex) ops ({', '.join(flex)}), which the Python LiteRT Interpreter "
                "cannot run: validate it on a runtime linked with the Flex delegate, or replace those ops"
            ),
            "tflite_float_accuracy": None,
            "quantized_accuracy": None,
            "accuracy_drop_pp": None,
            "agreement": None,
            "rerun_max_difference": None,
            "models": {"float_keras": {**model_metrics(keras_out, keras_out, labels, names), "bytes": None}},
        }
    float_out = predict_tflite(float_tflite, features, params.batch_size, params.num_threads, progress("float .tflite"))
    quant_out = predict_tflite(
        quantized_tflite, features, params.batch_size, params.num_threads, progress("quantized .tflite")
    )
    quantized_accuracy = accuracy(quant_out, labels)
    models = {
        "float_keras": {**model_metrics(keras_out, keras_out, labels, names), "bytes": None},
        "float_tflite": {**model_metrics(float_out, keras_out, labels, names), "bytes": len(float_tflite)},
        "quantized_tflite": {**model_metrics(quant_out, keras_out, labels, names), "bytes": len(quantized_tflite)},
    }
    if measure_speed:
        report("validate_with_interpreter", "measuring latency and throughput")
        models["float_keras"]["speed"] = keras_speed(keras_model, features, params.batch_size)
        models["float_tflite"]["speed"] = tflite_speed(float_tflite, features, params.batch_size, num_threads)
        models["quantized_tflite"]["speed"] = tflite_speed(quantized_tflite, features, params.batch_size, num_threads)
    return {
        **common,
        "validated": True,
        "not_validated_reason": None,
        "tflite_float_accuracy": accuracy(float_out, labels),
        "quantized_accuracy": quantized_accuracy,
        "accuracy_drop_pp": round((float_accuracy - quantized_accuracy) * 100, 6),
        "agreement": models["quantized_tflite"]["agreement_with_float"],
        "rerun_max_difference": rerun_max_difference(
            quantized_tflite, features, quant_out, params.batch_size, params.num_threads
        ),
        "models": models,
    }


def per_layer_errors(
    keras_model: keras.Model, calibration: np.ndarray, options: ConversionParameters, batch_size: int
) -> tuple[list[LayerError], str | None]:
    """The debugger's per-layer figures for this conversion, or why there are none."""

    def batches():
        for start in range(0, len(calibration), batch_size):
            yield calibration[start : start + batch_size]

    try:
        return layer_errors(keras_model, batches, calibration, options), None
    except Exception as error:  # the debugger's failures are the converter's (e.g. Flex ops): report, not fail
        return [], f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]


@task(
    name="validate_with_interpreter",
    cache_policy=StageCachePolicy(module=__name__),
    persist_result=True,
    result_serializer="json",
)
def validate_with_interpreter(
    store_url: str,
    dataset: SampledDataset,
    trained: TrainedModel,
    converted: ConvertedModels,
    params: ValidationParameters,
    calibration: CalibrationSet | None = None,
    conversion: ConversionParameters | None = None,
    repair: RepairResult | None = None,
    float_outputs: FloatOutputs | None = None,
) -> ValidationResult:
    """Evaluate the three models on the test split; with the calibration set and conversion options, also the
    per-layer quantization error; with a repair, the cost of what it kept in float. Writes report.json, .md and
    .html to the store. ``float_outputs``: the Keras model's outputs on this test split, if a stage (the sweep's)
    predicted them already."""
    store = ArtifactStore(store_url)
    with store.open(dataset.test) as f:
        test = read_parquet(f)
    keras_outputs = None
    if float_outputs is not None:
        with store.open(float_outputs.outputs) as f:
            keras_outputs = read_parquet(f).features
    keras_model = keras_model_from_bytes(store.read_bytes(trained.model))
    metrics = evaluate_models(
        keras_model,
        store.read_bytes(converted.float_model),
        store.read_bytes(converted.quantized),
        test.features,
        test.labels,
        params,
        class_names=list(dataset.spec.class_names),
        keras_outputs=keras_outputs,
    )
    layers, layers_unavailable = [], "no calibration set given"
    if conversion is not None and conversion.scheme is not QuantizationScheme.full_integer:
        layers_unavailable = f"measured for full-integer quantization only (this model: {conversion.scheme.value})"
    elif calibration is not None and conversion is not None:
        report("validate_with_interpreter", "per-layer quantization error (QuantizationDebugger)")
        with store.open(calibration.table) as f:
            calibration_features = read_parquet(f).features
        layers, layers_unavailable = per_layer_errors(keras_model, calibration_features, conversion, 64)
    metrics["layers"] = [layer.model_dump() for layer in layers]
    metrics["layers_unavailable"] = layers_unavailable
    if repair is not None:
        metrics["repair"] = repair_cost(repair, store, test.features, test.labels, params, metrics)
    document = {
        "kind": "ptqflow.validation_report",
        "report_version": REPORT_VERSION,
        "dataset": dataset.manifest.model_dump(),
        "model": trained.model.model_dump(),
        "quantized_model": converted.quantized.model_dump(),
        "float_tflite": converted.float_model.model_dump(),
        "conversion": conversion.model_dump(mode="json") if conversion else None,
        "metrics": metrics,
    }
    report_ref = store.put_json(document)
    report("validate_with_interpreter", "writing report.md and report.html")
    markdown_ref = store.put_bytes(render_markdown(document).encode(), ".md")
    html_ref = store.put_bytes(render_html(document).encode(), ".html")
    logger = get_run_logger()
    if metrics["validated"]:
        logger.info(
            "float %.4f, quantized %.4f (drop %.2f pp), full integer: %s",
            metrics["float_accuracy"],
            metrics["quantized_accuracy"],
            metrics["accuracy_drop_pp"],
            metrics["audit"]["full_integer"],
        )
    else:
        logger.warning("not validated: %s", metrics["not_validated_reason"])
    return ValidationResult(
        report=report_ref,
        report_md=markdown_ref,
        report_html=html_ref,
        validated=metrics["validated"],
        not_validated_reason=metrics["not_validated_reason"],
        float_tensors=tuple(metrics["audit"]["float_tensors"]),
        full_integer=metrics["audit"]["full_integer"],
        worst_layers=tuple(
            WorstLayer(layer=layer.layer, op=layer.op, tensor=layer.tensor, badness=layer.badness)
            for layer in layers[:5]
        ),
        **{
            k: metrics[k]
            for k in (
                "float_accuracy",
                "tflite_float_accuracy",
                "quantized_accuracy",
                "accuracy_drop_pp",
                "agreement",
                "float_bytes",
                "quantized_bytes",
                "rerun_max_difference",
            )
        },
    )


def repair_cost(
    repair: RepairResult,
    store: ArtifactStore,
    features: np.ndarray,
    labels: np.ndarray,
    params: ValidationParameters,
    metrics: dict,
) -> dict:
    """What keeping layers in float cost: size and latency of the repaired model against the fully quantized one."""
    num_threads = params.num_threads or os.cpu_count() or 1
    unrepaired = store.read_bytes(repair.unrepaired)
    unrepaired_speed = tflite_speed(unrepaired, features, params.batch_size, num_threads)
    repaired_speed = metrics.get("models", {}).get("quantized_tflite", {}).get("speed", {})
    return {
        "unrepaired_accuracy": accuracy(predict_tflite(unrepaired, features, params.batch_size, num_threads), labels),
        "repaired_accuracy": metrics["quantized_accuracy"],
        **repair.model_dump(mode="json", exclude={"repaired", "unrepaired"}),
        "unrepaired_model": repair.unrepaired.model_dump(),
        "unrepaired_bytes": len(unrepaired),
        "repaired_bytes": metrics["quantized_bytes"],
        "unrepaired_latency_ms_p50": unrepaired_speed["latency_ms"]["p50"],
        "repaired_latency_ms_p50": repaired_speed.get("latency_ms", {}).get("p50"),
    }


class GateResult(BaseModel):
    """The accuracy gate: a named check with its threshold and observation, reported whether it passes or not.

    ``status`` is ``passed``, ``failed``, or ``not_validated`` (the model could not be run here; never a pass)."""

    name: str
    status: str = "passed"
    passed: bool
    observed_drop_pp: float | None
    max_drop_pp: float
    message: str


def _layer_list(result: ValidationResult, count: int = 3) -> str:
    return ", ".join(f"{w.layer} ({w.op}, badness {w.badness:.1f})" for w in result.worst_layers[:count])


def check_accuracy_gate(
    result: ValidationResult,
    max_accuracy_drop: float,
    ops: TargetOps | None = None,
    repair: RepairResult | None = None,
) -> GateResult:
    """Judge a validation: pass within ``max_accuracy_drop``; on failure name the worst layers and what would help
    (with ``--ops int8`` no layer can stay float, so repair is impossible and the message says which options allow
    it); after a repair, say what stayed float."""
    if not result.validated or result.accuracy_drop_pp is None:
        return GateResult(
            name="accuracy_drop",
            status="not_validated",
            passed=False,
            observed_drop_pp=None,
            max_drop_pp=max_accuracy_drop,
            message=f"not validated: {result.not_validated_reason}",
        )
    if result.rerun_max_difference:
        return GateResult(
            name="repeatable",
            status="failed",
            passed=False,
            observed_drop_pp=result.accuracy_drop_pp,
            max_drop_pp=max_accuracy_drop,
            message=f"gate failed: the quantized model's outputs differ by up to {result.rerun_max_difference:.3g} "
            "between two runs on the same input (a LiteRT kernel is not deterministic for this model): quantize it "
            "another way, e.g. with per-channel weights or full integer (`ptqflow sweep` compares them)",
        )
    passed = result.accuracy_drop_pp <= max_accuracy_drop
    observed = (
        f"quantized accuracy {result.quantized_accuracy:.2%} is {result.accuracy_drop_pp:.2f} pp below float "
        f"({result.float_accuracy:.2%})"
    )
    repaired = repair is not None and repair.succeeded
    if passed:
        message = (
            f"accuracy gate passed{' after repair' if repaired else ''}: {observed}, within {max_accuracy_drop} pp"
        )
        if repaired:
            message += f"; kept in float: {', '.join(repair.float_layers)}"
    else:
        message = f"accuracy gate failed: {observed}, more than the {max_accuracy_drop} pp allowed"
        if result.worst_layers:
            message += f"; worst layers: {_layer_list(result)}"
        if ops is TargetOps.int8:
            message += (
                "; --ops int8 cannot keep a layer in float, so it cannot be repaired: rerun with --ops builtins "
                "(repair then keeps the worst layers in float), calibrate on more samples (--calibration-size), "
                "or raise --max-accuracy-drop"
            )
        elif repair is not None:
            message += (
                f"; {repair.message}: allow more float layers (--max-float-layers), calibrate on more samples "
                "(--calibration-size), or raise --max-accuracy-drop"
            )
        else:
            message += (
                ": calibrate on more samples (--calibration-size), keep the worst layers in float (--ops builtins "
                "--repair), or raise --max-accuracy-drop"
            )
    return GateResult(
        name="accuracy_drop",
        status="passed" if passed else "failed",
        passed=passed,
        observed_drop_pp=result.accuracy_drop_pp,
        max_drop_pp=max_accuracy_drop,
        message=message,
    )
