"""Stage 5, validate_with_interpreter: float vs quantized accuracy with the LiteRT Interpreter, a dtype audit,
sizes, and the accuracy gate.

Inputs are quantized and outputs dequantized with each tensor's own scale and zero point, read from the model;
never a hard-coded mapping such as the tutorial's ``x * 255 - 128``. Evaluation is batched: the input tensor is
resized to a whole batch, so the Interpreter runs once per batch instead of once per sample.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from prefect import get_run_logger, task
from pydantic import BaseModel

from storage.keras_models import keras_model_from_bytes
from storage.store import ArtifactStore
from storage.tables import read_parquet
from tasks.artifacts import ConvertedModels, SampledDataset, TrainedModel, ValidationResult
from tasks.caching import StageCachePolicy
from tasks.parameters import ValidationParameters
from tasks.progress import report

if TYPE_CHECKING:
    import keras
    from ai_edge_litert.interpreter import Interpreter

FLOAT_TYPES = ("float16", "float32", "float64")


def make_interpreter(model_bytes: bytes, num_threads: int | None = None) -> Interpreter:
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=model_bytes, num_threads=num_threads or os.cpu_count() or 1)


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
    input_type: str
    output_type: str
    input_quantization: tuple[float, int]
    output_quantization: tuple[float, int]

    @property
    def full_integer(self) -> bool:
        return not self.float_tensors


def audit_tensor_types(model_bytes: bytes) -> TensorTypeAudit:
    interpreter = make_interpreter(model_bytes, 1)
    details = interpreter.get_tensor_details()
    dtypes: dict[str, int] = {}
    floats = []
    for d in details:
        name = np.dtype(d["dtype"]).name
        dtypes[name] = dtypes.get(name, 0) + 1
        if name in FLOAT_TYPES:
            floats.append(d["name"])
    # _get_ops_details is the only op listing the Python Interpreter offers; it is stable across LiteRT releases.
    ops = sorted({op["op_name"] for op in interpreter._get_ops_details()} - {"DELEGATE"})
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    return TensorTypeAudit(
        dtypes=dict(sorted(dtypes.items())),
        float_tensors=tuple(floats),
        ops=tuple(ops),
        input_type=np.dtype(inp["dtype"]).name,
        output_type=np.dtype(out["dtype"]).name,
        input_quantization=(float(inp["quantization"][0]), int(inp["quantization"][1])),
        output_quantization=(float(out["quantization"][0]), int(out["quantization"][1])),
    )


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float((probabilities.argmax(axis=1) == labels).mean())


def evaluate_models(
    keras_model: keras.Model,
    float_tflite: bytes,
    quantized_tflite: bytes,
    features: np.ndarray,
    labels: np.ndarray,
    params: ValidationParameters,
) -> dict:
    """Pure stage function: every metric of the validation report, as a JSON-ready dict.

    Deterministic for the same models and data (no timings), so identical runs store one report blob."""
    def progress(model_name):
        return lambda done: report("validate_with_interpreter", f"{model_name}: {done}/{len(features)} samples", done, len(features))

    keras_out = predict_keras(keras_model, features, params.batch_size)
    float_out = predict_tflite(float_tflite, features, params.batch_size, params.num_threads, progress("float .tflite"))
    quant_out = predict_tflite(
        quantized_tflite, features, params.batch_size, params.num_threads, progress("quantized .tflite")
    )
    float_accuracy = accuracy(keras_out, labels)
    quantized_accuracy = accuracy(quant_out, labels)
    audit = audit_tensor_types(quantized_tflite)
    return {
        "samples": int(len(labels)),
        "float_accuracy": float_accuracy,
        "tflite_float_accuracy": accuracy(float_out, labels),
        "quantized_accuracy": quantized_accuracy,
        "accuracy_drop_pp": round((float_accuracy - quantized_accuracy) * 100, 6),
        "agreement": float((keras_out.argmax(1) == quant_out.argmax(1)).mean()),
        "float_bytes": len(float_tflite),
        "quantized_bytes": len(quantized_tflite),
        "size_ratio": round(len(float_tflite) / len(quantized_tflite), 4),
        "num_threads": params.num_threads or os.cpu_count() or 1,
        "audit": {
            "full_integer": audit.full_integer,
            "float_tensors": list(audit.float_tensors),
            "dtypes": audit.dtypes,
            "ops": list(audit.ops),
            "input": {"dtype": audit.input_type, "scale": audit.input_quantization[0],
                      "zero_point": audit.input_quantization[1]},
            "output": {"dtype": audit.output_type, "scale": audit.output_quantization[0],
                       "zero_point": audit.output_quantization[1]},
        },
    }


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
) -> ValidationResult:
    store = ArtifactStore(store_url)
    with store.open(dataset.test) as f:
        test = read_parquet(f)
    metrics = evaluate_models(
        keras_model_from_bytes(store.read_bytes(trained.model)),
        store.read_bytes(converted.float_model),
        store.read_bytes(converted.quantized),
        test.features,
        test.labels,
        params,
    )
    report_ref = store.put_json(
        {
            "kind": "ptqflow.validation_report",
            "dataset": dataset.manifest.model_dump(),
            "model": trained.model.model_dump(),
            "quantized_model": converted.quantized.model_dump(),
            "float_tflite": converted.float_model.model_dump(),
            "metrics": metrics,
        }
    )
    get_run_logger().info(
        "float %.4f, quantized %.4f (drop %.2f pp), full integer: %s",
        metrics["float_accuracy"], metrics["quantized_accuracy"], metrics["accuracy_drop_pp"],
        metrics["audit"]["full_integer"],
    )
    return ValidationResult(
        report=report_ref,
        float_tensors=tuple(metrics["audit"]["float_tensors"]),
        full_integer=metrics["audit"]["full_integer"],
        **{k: metrics[k] for k in (
            "float_accuracy", "tflite_float_accuracy", "quantized_accuracy", "accuracy_drop_pp", "agreement",
            "float_bytes", "quantized_bytes")},
    )


class GateResult(BaseModel):
    """The accuracy gate: a named check with its threshold and observation, reported whether it passes or not."""

    name: str
    passed: bool
    observed_drop_pp: float
    max_drop_pp: float
    message: str


def check_accuracy_gate(result: ValidationResult, max_accuracy_drop: float) -> GateResult:
    passed = result.accuracy_drop_pp <= max_accuracy_drop
    if passed:
        message = (
            f"accuracy gate passed: quantized accuracy {result.quantized_accuracy:.2%} is "
            f"{result.accuracy_drop_pp:.2f} pp below float ({result.float_accuracy:.2%}), within {max_accuracy_drop} pp"
        )
    else:
        message = (
            f"accuracy gate failed: quantized accuracy {result.quantized_accuracy:.2%} is "
            f"{result.accuracy_drop_pp:.2f} pp below float ({result.float_accuracy:.2%}), more than the "
            f"{max_accuracy_drop} pp allowed: calibrate on more samples (--calibration-size), keep unquantizable "
            "ops in float (--ops builtins), or raise --max-accuracy-drop"
        )
    return GateResult(
        name="accuracy_drop",
        passed=passed,
        observed_drop_pp=result.accuracy_drop_pp,
        max_drop_pp=max_accuracy_drop,
        message=message,
    )
