"""The sweep's stages: the model quantized under one configuration, that model evaluated, and every configuration
judged and ranked side by side.

Each task reads its inputs from the artifact store and writes its outputs there, handing on small references: it
can run on any Dask worker that reaches the store. Evaluation is lighter than ``validate_with_interpreter`` (no
per-layer debugger, no HTML report): the configuration the sweep picks is validated in full afterwards.
"""

from __future__ import annotations

import io
import math
import os
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from ptqflow.storage.keras_models import keras_model_from_bytes
from ptqflow.storage.store import ArtifactRef, ArtifactStore
from ptqflow.storage.tables import InputSlot, TensorTable, read_parquet, write_parquet_bytes
from ptqflow.tasks.artifacts import (
    CalibrationSet,
    FloatOutputs,
    ModelOutput,
    SampledDataset,
    StageOutput,
    TrainedModel,
)
from ptqflow.tasks.caching import StageCachePolicy
from ptqflow.tasks.convert import convert_float, quantize, stored_calibration_batches
from ptqflow.tasks.device import budget_problems, device_footprint
from ptqflow.tasks.errors import PtqflowError, secrets_kept_out
from ptqflow.tasks.feeds import predict_keras
from ptqflow.tasks.fidelity import LOSS_LABEL, TaskFigures, fidelity_loss, judge_fidelity
from ptqflow.tasks.interpreter import (
    audit_tensor_types,
    predict_tflite,
    rerun_max_difference,
    tflite_speed,
)
from ptqflow.tasks.metrics import accuracy, increase_pct, mean_absolute_error, model_metrics, worst_sqnr
from ptqflow.tasks.parameters import (
    CalibrationMethod,
    ConversionParameters,
    GateParameters,
    ModelTask,
    QuantizationScheme,
    RankBy,
    TargetOps,
    TensorType,
)

FLOAT_REFERENCE = "float32"
# Each configuration's latency and throughput are measured for this long (each): enough for a stable median at
# batch 1 on small models, short enough for a grid of a dozen.
SPEED_BUDGET_SECONDS = 0.5


class SweepConfiguration(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    description: str
    conversion: ConversionParameters
    calibration_size: int | None = Field(description="Calibration samples; None for schemes without calibration.")


def sweep_grid(base_calibration_size: int, calibration_sizes: Iterable[int]) -> list[SweepConfiguration]:
    """The configurations a sweep compares: full int8 with each I/O type, per-tensor weights and each calibration
    size; int8 with float fallback; int16 activations with int8 weights; dynamic range; float16."""
    f32, u8, i16 = TensorType.float32, TensorType.uint8, TensorType.int16
    builtins = TargetOps.builtins
    int16x8, dynamic = QuantizationScheme.int16x8, QuantizationScheme.dynamic_range
    base = base_calibration_size
    rows: list[tuple[str, str, dict[str, Any], int | None]] = [
        ("int8", "full int8, int8 I/O", {}, base),
        *[(f"int8-cal{n}", "full int8, int8 I/O", {}, n) for n in sorted(set(calibration_sizes)) if n != base],
        ("int8-uint8-io", "full int8, uint8 I/O", {"input_type": u8, "output_type": u8}, base),
        ("int8-float-io", "full int8, float32 I/O", {"input_type": f32, "output_type": f32}, base),
        ("int8-per-tensor", "full int8, per-tensor weight scales", {"per_channel": False}, base),
        *[
            (f"int8-{m.value}", f"full int8, {m.value} activation ranges", {"calibration_method": m}, base)
            for m in (CalibrationMethod.percentile, CalibrationMethod.mse, CalibrationMethod.kl)
        ],
        ("int8-equalize", "full int8, equalized activation channels", {"equalize": True}, base),
        ("int8-bias-correction", "full int8, corrected biases", {"bias_correction": True}, base),
        (
            "int8-equalize-bias-correction",
            "full int8, equalized channels and corrected biases",
            {"equalize": True, "bias_correction": True},
            base,
        ),
        ("int8-fallback", "int8, float fallback (TFLITE_BUILTINS)", {"ops": builtins}, base),
        (
            "int8-fallback-float-io",
            "int8, float fallback, float32 I/O",
            {"ops": builtins, "input_type": f32, "output_type": f32},
            base,
        ),
        (
            "int16x8",
            "int16 activations, int8 weights, float32 I/O",
            {"scheme": int16x8, "input_type": f32, "output_type": f32},
            base,
        ),
        (
            "int16x8-int16-io",
            "int16 activations, int8 weights, int16 I/O",
            {"scheme": int16x8, "input_type": i16, "output_type": i16},
            base,
        ),
        (
            "int16x8-per-tensor",
            "int16x8, per-tensor weight scales",
            {"scheme": int16x8, "input_type": f32, "output_type": f32, "per_channel": False},
            base,
        ),
        (
            "dynamic-range",
            "int8 weights, float activations",
            {"scheme": dynamic, "ops": builtins, "input_type": f32, "output_type": f32},
            None,
        ),
        (
            "dynamic-range-per-tensor",
            "dynamic range, per-tensor weight scales",
            {"scheme": dynamic, "ops": builtins, "input_type": f32, "output_type": f32, "per_channel": False},
            None,
        ),
        (
            "float16",
            "float16 weights",
            {"scheme": QuantizationScheme.float16, "ops": builtins, "input_type": f32, "output_type": f32},
            None,
        ),
    ]
    return [
        SweepConfiguration(
            name=name, description=description, conversion=ConversionParameters(**options), calibration_size=size
        )
        for name, description, options, size in rows
    ]


def select_configurations(grid: Sequence[SweepConfiguration], names: Sequence[str] | None) -> list[SweepConfiguration]:
    """The configurations called ``names`` (all of them for None), in grid order."""
    if names is None:
        return list(grid)
    known = {c.name for c in grid}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise PtqflowError(
            f"unknown sweep configuration {', '.join(map(repr, unknown))}: choose from {', '.join(sorted(known))} "
            "(`ptqflow sweep --list`)"
        )
    return [c for c in grid if c.name in set(names)]


class CandidateModel(StageOutput):
    model: ArtifactRef = Field(description="A converted .tflite (quantized, or the float reference).")
    conversion_seconds: float = Field(description="How long the conversion took (calibration included).")


class ConfigurationMetrics(StageOutput):
    """One configuration's figures on the test split, with the float Keras model as reference."""

    model: ArtifactRef
    conversion_seconds: float
    bytes: int
    arena_bytes: int | None = Field(None, description="Its tensor arena, batch 1 (tasks.device).")
    validated: bool
    not_validated_reason: str | None = None
    task: ModelTask = ModelTask.classification
    float_accuracy: float | None = Field(description="Classification only, as are accuracy and its drop.")
    accuracy: float | None
    accuracy_drop_pp: float | None
    agreement: float | None
    float_mae: float | None = Field(None, description="Regression: the float Keras model's MAE.")
    mae: float | None = Field(None, description="Regression: this model's MAE against the targets.")
    mae_increase_pct: float | None = Field(None, description="Regression: its MAE's rise over float, in percent.")
    output_sqnr_db: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    throughput_per_s: float | None
    num_threads: int
    measured_on: str = Field(description="Host and process that measured it: latency belongs to that machine.")
    rerun_max_difference: float | None = Field(
        None,
        description="Largest output difference between two identical runs on the first test batch; 0 when repeatable.",
    )
    full_integer: bool
    float_tensors: int
    input_type: str
    output_type: str
    ops: tuple[str, ...]

    def figures(self) -> TaskFigures:
        """The figures its task's gate reads (``tasks.fidelity``)."""
        return TaskFigures(
            task=self.task,
            float_accuracy=self.float_accuracy,
            quantized_accuracy=self.accuracy,
            accuracy_drop_pp=self.accuracy_drop_pp,
            agreement=self.agreement,
            float_mae=self.float_mae,
            quantized_mae=self.mae,
            mae_increase_pct=self.mae_increase_pct,
            sqnr_db=self.output_sqnr_db,
        )


def configuration_metrics(
    reference: np.ndarray,
    model_bytes: bytes,
    features: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    num_threads: int,
    class_names: list[str],
    task: ModelTask = ModelTask.classification,
    layout: tuple[ModelOutput, ...] = (),
    inputs: tuple[InputSlot, ...] = (),
) -> dict[str, Any]:
    """Pure: the task's figures (accuracy, or MAE against the targets), agreement with float, output error, latency
    and the dtype audit of one ``.tflite``; ``reference`` is the float Keras model's outputs on ``features``."""
    audit = audit_tensor_types(model_bytes)
    float_accuracy = accuracy(reference, labels) if task is ModelTask.classification else None
    float_mae = mean_absolute_error(reference, labels) if task is ModelTask.regression else None
    common = {
        "task": task,
        "float_mae": float_mae,
        "bytes": len(model_bytes),
        "arena_bytes": device_footprint(model_bytes).arena_bytes,
        "num_threads": num_threads,
        "full_integer": audit.full_integer,
        "float_tensors": len(audit.float_tensors),
        "input_type": audit.input.dtype,
        "output_type": audit.output.dtype,
        "ops": tuple(audit.ops),
        "float_accuracy": float_accuracy,
    }
    if audit.flex_ops:
        return {
            **common,
            "validated": False,
            "accuracy": None,
            "accuracy_drop_pp": None,
            "agreement": None,
            "output_sqnr_db": None,
            "latency_p50_ms": None,
            "latency_p95_ms": None,
            "throughput_per_s": None,
            "not_validated_reason": f"TensorFlow (Flex) ops {', '.join(audit.flex_ops)} cannot run in the LiteRT "
            "Interpreter",
        }
    outputs = predict_tflite(model_bytes, features, batch_size, num_threads, inputs=inputs)
    metrics = model_metrics(outputs, reference, labels, class_names, layout=layout)
    speed = tflite_speed(model_bytes, features, batch_size, num_threads, SPEED_BUDGET_SECONDS, inputs)
    return {
        **common,
        "validated": True,
        "accuracy": metrics.accuracy,
        "accuracy_drop_pp": round((float_accuracy - metrics.accuracy) * 100, 6)
        if float_accuracy is not None and metrics.accuracy is not None
        else None,
        "mae": metrics.mae,
        "mae_increase_pct": increase_pct(float_mae, metrics.mae)
        if float_mae is not None and metrics.mae is not None
        else None,
        "agreement": metrics.agreement_with_float,
        "output_sqnr_db": worst_sqnr(metrics.outputs),
        "latency_p50_ms": speed.latency_ms.p50,
        "latency_p95_ms": speed.latency_ms.p95,
        "throughput_per_s": speed.throughput_per_s,
        "rerun_max_difference": rerun_max_difference(model_bytes, features, outputs, batch_size, num_threads, inputs),
    }


_STAGE_OPTIONS: dict[str, Any] = {"persist_result": True, "result_serializer": "json"}


@task(name="quantize_configuration", cache_policy=StageCachePolicy(module=__name__), **_STAGE_OPTIONS)
@secrets_kept_out()
def quantize_configuration(
    store_url: str, trained: TrainedModel, calibration: CalibrationSet | None, params: ConversionParameters
) -> CandidateModel:
    """The model quantized under ``params`` (``calibration`` is None for schemes that take none)."""
    store = ArtifactStore(store_url)
    model = keras_model_from_bytes(store.read_bytes(trained.model))

    def no_batches() -> Iterator[np.ndarray]:
        return iter(())

    batches = (
        stored_calibration_batches(store, calibration, params.calibration_batch_size, "quantize_configuration")
        if calibration is not None
        else no_batches
    )
    started = time.perf_counter()
    model_bytes = quantize(model, batches, params)
    seconds = round(time.perf_counter() - started, 3)
    return CandidateModel(model=store.put_bytes(model_bytes, ".tflite"), conversion_seconds=seconds)


@task(name="convert_float_reference", cache_policy=StageCachePolicy(module=__name__), **_STAGE_OPTIONS)
@secrets_kept_out()
def convert_float_reference(store_url: str, trained: TrainedModel) -> CandidateModel:
    """The float ``.tflite``: the row every configuration is compared with."""
    store = ArtifactStore(store_url)
    model = keras_model_from_bytes(store.read_bytes(trained.model))
    started = time.perf_counter()
    model_bytes = convert_float(model)
    seconds = round(time.perf_counter() - started, 3)
    return CandidateModel(model=store.put_bytes(model_bytes, ".tflite"), conversion_seconds=seconds)


@task(name="predict_float_outputs", cache_policy=StageCachePolicy(module=__name__), **_STAGE_OPTIONS)
@secrets_kept_out()
def predict_float_outputs(
    store_url: str, dataset: SampledDataset, trained: TrainedModel, batch_size: int
) -> FloatOutputs:
    """The float Keras model's outputs on the test split, once: what every configuration is compared with."""
    store = ArtifactStore(store_url)
    with store.open(dataset.test) as f:
        test = read_parquet(f)
    model = keras_model_from_bytes(store.read_bytes(trained.model))
    outputs = predict_keras(model, test.features, batch_size, test.inputs)
    table = TensorTable(features=np.ascontiguousarray(outputs, dtype=np.float32), labels=test.labels)
    return FloatOutputs(outputs=store.put_bytes(write_parquet_bytes(table), ".parquet"))


@task(name="evaluate_configuration", cache_policy=StageCachePolicy(module=__name__), **_STAGE_OPTIONS)
@secrets_kept_out()
def evaluate_configuration(
    store_url: str,
    dataset: SampledDataset,
    reference: FloatOutputs,
    candidate: CandidateModel,
    batch_size: int,
    num_threads: int,
    outputs: tuple[ModelOutput, ...] = (),
) -> ConfigurationMetrics:
    """One configuration's figures; ``outputs``: the float model's (``TrainedModel.outputs``)."""
    store = ArtifactStore(store_url)
    with store.open(dataset.test) as f:
        test = read_parquet(f)
    with store.open(reference.outputs) as f:
        float_outputs = read_parquet(f).features
    metrics = configuration_metrics(
        float_outputs,
        store.read_bytes(candidate.model),
        test.features,
        test.labels,
        batch_size,
        num_threads,
        list(dataset.spec.class_names),
        dataset.spec.task,
        outputs,
        dataset.spec.inputs,
    )
    return ConfigurationMetrics(
        model=candidate.model,
        conversion_seconds=candidate.conversion_seconds,
        measured_on=f"{socket.gethostname()} pid {os.getpid()}",
        **metrics,
    )


class SweepRow(BaseModel):
    """One line of the comparison table."""

    name: str
    description: str
    scheme: str | None
    ops: str | None
    input_type: str
    output_type: str
    per_channel: bool | None
    calibration_size: int | None
    reference: bool = False
    metrics: ConfigurationMetrics | None
    error: str | None = Field(None, description="Why the configuration produced no model (the converter's message).")
    passed: bool = False
    verdict: str = ""
    rank: int | None = None

    def measured(self) -> ConfigurationMetrics:
        """The figures of a row that was measured (every row that passed, and the float reference)."""
        if self.metrics is None:
            raise ValueError(f"configuration {self.name} produced no model: {self.error}")
        return self.metrics


def configuration_row(
    configuration: SweepConfiguration, metrics: ConfigurationMetrics | None, error: str | None = None
) -> SweepRow:
    c = configuration.conversion
    return SweepRow(
        name=configuration.name,
        description=configuration.description,
        scheme=c.scheme.value,
        ops=c.ops.value,
        input_type=c.input_type.value,
        output_type=c.output_type.value,
        per_channel=c.per_channel,
        calibration_size=configuration.calibration_size,
        metrics=metrics,
        error=error,
    )


def reference_row(metrics: ConfigurationMetrics) -> SweepRow:
    return SweepRow(
        name=FLOAT_REFERENCE,
        description="float .tflite, no optimizations (reference)",
        scheme=None,
        ops=None,
        input_type="float32",
        output_type="float32",
        per_channel=None,
        calibration_size=None,
        reference=True,
        metrics=metrics,
    )


def judge(row: SweepRow, gate: GateParameters, require_full_integer: bool) -> SweepRow:
    """The gate for one configuration: validated, repeatable, within its task's gate (``tasks.fidelity``), full
    integer if required, and within the device budgets."""
    m = row.metrics
    fidelity = judge_fidelity(m.figures(), gate) if m is not None and m.validated else None
    if row.error is not None:
        verdict = f"no model: {row.error}"
    elif m is None or fidelity is None:
        verdict = f"not validated: {m.not_validated_reason if m else 'no metrics'}"
    elif m.rerun_max_difference:
        verdict = (
            f"not repeatable: outputs differ by up to {m.rerun_max_difference:.3g} between two runs on the same input"
        )
    elif not fidelity.passed:
        verdict = fidelity.short
    elif require_full_integer and not m.full_integer:
        verdict = f"not full integer ({m.float_tensors} float tensors)"
    elif not row.reference and (problems := budget_problems(m.bytes, m.arena_bytes, gate)):
        verdict = "does not fit: " + "; ".join(what for what, _ in problems)
    elif row.reference:
        verdict = "reference"
    else:
        return row.model_copy(update={"passed": True, "verdict": "passed"})
    return row.model_copy(update={"passed": False, "verdict": verdict})


def _sort_key(row: SweepRow, rank_by: RankBy) -> tuple:
    m = row.metrics
    size = m.bytes if m else float("inf")
    latency = m.latency_p50_ms if m and m.latency_p50_ms is not None else float("inf")
    loss = fidelity_loss(m.figures()) if m and m.validated else None
    drop = float("inf") if loss is None else loss
    order = {
        RankBy.size: (size, latency, drop),
        RankBy.latency: (latency, size, drop),
        RankBy.accuracy: (drop, size, latency),
    }[rank_by]
    return (*order, row.name)


def rank(rows: Sequence[SweepRow], rank_by: RankBy) -> list[SweepRow]:
    """Passing configurations first, best first by ``rank_by`` (the other two break ties; accuracy is the task's
    own figure, ``tasks.fidelity.fidelity_loss``), numbered; then the float reference and the failing ones, least
    lost first."""
    passing = sorted((r for r in rows if r.passed), key=lambda r: _sort_key(r, rank_by))
    rest = sorted((r for r in rows if not r.passed), key=lambda r: (not r.reference, _sort_key(r, RankBy.accuracy)))
    return [r.model_copy(update={"rank": i}) for i, r in enumerate(passing, 1)] + rest


def render_sweep_plot(rows: Sequence[SweepRow]) -> bytes:
    """PNG: size against what quantizing cost by the task's figure (passing configurations in green), and latency
    per configuration."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a batch job
    from matplotlib import pyplot as plt

    measured = [
        (r, m, loss)
        for r in rows
        if (m := r.metrics) is not None
        and m.validated
        and (loss := fidelity_loss(m.figures())) is not None
        and math.isfinite(loss)
    ]
    task = measured[0][1].task if measured else ModelTask.classification
    figure, (scatter, bars) = plt.subplots(1, 2, figsize=(13, 5))
    for r, m, loss in measured:
        colour = "#8c8c8c" if r.reference else "#55a868" if r.passed else "#c44e52"
        scatter.scatter(m.bytes / 1024, loss, color=colour, s=40)
        scatter.annotate(
            r.name,
            (m.bytes / 1024, loss),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    scatter.set_xlabel("model size (KiB)")
    scatter.set_ylabel(LOSS_LABEL[task])
    scatter.set_title("size vs fidelity (green: passes the gate)")
    timed = [(r, m) for r, m, _ in measured if m.latency_p50_ms is not None]
    bars.barh(
        [r.name for r, _ in timed][::-1],
        [m.latency_p50_ms for _, m in timed][::-1],
        color=["#8c8c8c" if r.reference else "#55a868" if r.passed else "#c44e52" for r, _ in timed][::-1],
    )
    bars.set_xlabel("latency at batch 1, p50 (ms)")
    bars.set_title("latency")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


class SweepReport(BaseModel):
    table: ArtifactRef = Field(description="sweep.json: every row, ranked.")
    markdown: ArtifactRef = Field(description="sweep.md: the comparison table.")
    plot: ArtifactRef = Field(description="sweep.png: size vs accuracy drop, and latency.")

    def artifacts(self) -> dict[str, ArtifactRef]:
        """The sweep's files by the names runs record them under."""
        return {"sweep": self.table, "sweep_md": self.markdown, "sweep_plot": self.plot}


@task(name="write_sweep_report", cache_policy=NO_CACHE, persist_result=False)
@secrets_kept_out()
def write_sweep_report(store_url: str, document: dict[str, Any], markdown: str) -> SweepReport:
    """Write the ranked table (JSON and Markdown) and the plot to the store."""
    store = ArtifactStore(store_url)
    rows = [SweepRow.model_validate(row) for row in document["rows"]]
    return SweepReport(
        table=store.put_json(document),
        markdown=store.put_bytes(markdown.encode(), ".md"),
        plot=store.put_bytes(render_sweep_plot(rows), ".png"),
    )
