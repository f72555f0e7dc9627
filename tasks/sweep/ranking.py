"""The sweep's figures and verdicts: each configuration's metrics (``configuration_metrics``), its row, judged by
the gate, and every row ranked side by side. The tasks that run them on Dask are ``tasks.stages.sweep``.

Evaluation is lighter than ``validate_with_interpreter`` (no
per-layer debugger, no HTML report): the configuration the sweep picks is validated in full afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import AliasChoices, BaseModel, Field

from ptqflow.storage.store import ArtifactRef
from ptqflow.storage.tables import InputSlot
from ptqflow.tasks.core.artifacts import (
    ModelOutput,
    NpuFigures,
    OutputFigures,
    StageOutput,
    TflmFigures,
    UnrunnableSamples,
)
from ptqflow.tasks.core.parameters import DeviceTarget, GateParameters, ModelTask, RankBy, ValidationParameters
from ptqflow.tasks.evaluation.device import Footprint, device_footprint, footprint_problems
from ptqflow.tasks.evaluation.fidelity import fidelity_loss, judge_fidelity, unrunnable_share
from ptqflow.tasks.evaluation.gate import GATE_OPTION, GateResult, GateStatus, target_footprints, target_problems
from ptqflow.tasks.evaluation.interpreter import (
    RowFailure,
    audit_tensor_types,
    predict_tflite,
    refused_rows,
    rerun_max_difference,
    tflite_speed,
    unrunnable_samples,
)
from ptqflow.tasks.evaluation.metrics import accuracy, increase_pct, mean_absolute_error, model_metrics, worst_sqnr
from ptqflow.tasks.evaluation.tflm import tflm_figures
from ptqflow.tasks.evaluation.vela import compile_for_npu
from ptqflow.tasks.sweep.grid import FLOAT_REFERENCE, SweepConfiguration

# Each configuration's latency and throughput are measured for this long (each): enough for a stable median at
# batch 1 on small models, short enough for a grid of a dozen.
SPEED_BUDGET_SECONDS = 0.5


class CandidateModel(StageOutput):
    model: ArtifactRef = Field(description="A converted .tflite (quantized, or the float reference).")
    conversion_seconds: float = Field(description="How long the conversion took (calibration included).")


class ConfigurationMetrics(StageOutput):
    """One configuration's figures on the test split, with the float Keras model as reference."""

    model: ArtifactRef
    conversion_seconds: float
    bytes: int
    arena_bytes: int | None = Field(None, description="Its tensor arena, batch 1 (tasks.evaluation.device).")
    validated: bool
    not_validated_reason: str | None = None
    task: ModelTask = ModelTask.classification
    # The figures carry the names a run's figures (``ValidationFigures``) give them, so both are the same
    # ``Figures`` to the gate; the aliases read sweep.json and cached results written before that (0.1: accuracy,
    # mae, output_sqnr_db).
    float_accuracy: float | None = Field(description="Classification only, as are the accuracy and its drop.")
    quantized_accuracy: float | None = Field(validation_alias=AliasChoices("quantized_accuracy", "accuracy"))
    accuracy_drop_pp: float | None
    agreement: float | None
    float_mae: float | None = Field(None, description="Regression: the float Keras model's MAE.")
    quantized_mae: float | None = Field(
        None,
        validation_alias=AliasChoices("quantized_mae", "mae"),
        description="Regression: this model's MAE against the targets.",
    )
    mae_increase_pct: float | None = Field(None, description="Regression: its MAE's rise over float, in percent.")
    sqnr_db: float | None = Field(
        validation_alias=AliasChoices("sqnr_db", "output_sqnr_db"),
        description="SQNR against the float model of its worst output, in dB; None when identical.",
    )
    outputs: dict[str, OutputFigures] = Field(
        default_factory=dict, description="Each output by name, against the float model's."
    )
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
    targets: tuple[DeviceTarget, ...] = Field(
        (DeviceTarget.litert,), description="The device targets measured (--target); the float reference: LiteRT."
    )
    tflm: TflmFigures | None = None
    npu: tuple[NpuFigures, ...] = ()
    unrunnable_rows: int = Field(0, description="Test samples left out of the figures: the model refused them.")
    unrunnable: tuple[UnrunnableSamples, ...] = ()


# A configuration that could not run on the test split has none of these figures.
NOT_RUN = {
    "validated": False,
    "quantized_accuracy": None,
    "accuracy_drop_pp": None,
    "agreement": None,
    "sqnr_db": None,
    "latency_p50_ms": None,
    "latency_p95_ms": None,
    "throughput_per_s": None,
}


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
    devices: ValidationParameters | None = None,
) -> dict[str, Any]:
    """Pure: the task's figures (accuracy, or MAE against the targets), agreement with float, output error, latency
    and the dtype audit of one ``.tflite``; ``reference`` is the float Keras model's outputs on ``features``. With
    ``devices``, also its figures on each device target named there (TFLite Micro's run, Vela's compilation)."""
    audit = audit_tensor_types(model_bytes)
    float_accuracy = accuracy(reference, labels) if task is ModelTask.classification else None
    float_mae = mean_absolute_error(reference, labels) if task is ModelTask.regression else None
    common: dict[str, Any] = {
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
            **NOT_RUN,
            "not_validated_reason": f"TensorFlow (Flex) ops {', '.join(audit.flex_ops)} cannot run in the LiteRT "
            "Interpreter",
        }
    failures: list[RowFailure] = []
    outputs = predict_tflite(model_bytes, features, batch_size, num_threads, inputs=inputs, failures=failures)
    refused = unrunnable_samples("quantized_tflite", failures, len(features))
    if refused is not None:  # judged on the rows it ran, as a run's validation is
        ran = ~refused_rows(outputs)
        common |= {"unrunnable_rows": int((~ran).sum()), "unrunnable": (refused,)}
        if not ran.any():
            return {**common, **NOT_RUN, "not_validated_reason": f"no test sample ran: {refused.examples[0]}"}
        features, labels, reference, outputs = features[ran], labels[ran], reference[ran], outputs[ran]
        common["float_accuracy"] = float_accuracy = accuracy(reference, labels) if float_accuracy is not None else None
        common["float_mae"] = float_mae = mean_absolute_error(reference, labels) if float_mae is not None else None
    metrics = model_metrics(outputs, reference, labels, class_names, layout=layout)
    speed = tflite_speed(model_bytes, features, batch_size, num_threads, SPEED_BUDGET_SECONDS, inputs)
    return {
        **common,
        "validated": True,
        "quantized_accuracy": metrics.accuracy,
        "accuracy_drop_pp": round((float_accuracy - metrics.accuracy) * 100, 6)
        if float_accuracy is not None and metrics.accuracy is not None
        else None,
        "quantized_mae": metrics.mae,
        "mae_increase_pct": increase_pct(float_mae, metrics.mae)
        if float_mae is not None and metrics.mae is not None
        else None,
        "agreement": metrics.agreement_with_float,
        "sqnr_db": worst_sqnr(metrics.outputs),
        "outputs": metrics.outputs,
        "latency_p50_ms": speed.latency_ms.p50,
        "latency_p95_ms": speed.latency_ms.p95,
        "throughput_per_s": speed.throughput_per_s,
        "rerun_max_difference": rerun_max_difference(model_bytes, features, outputs, batch_size, num_threads, inputs),
        **(device_figures(model_bytes, features, labels, reference, task, layout, inputs, devices) if devices else {}),
    }


def device_figures(
    model_bytes: bytes,
    features: np.ndarray,
    labels: np.ndarray,
    reference: np.ndarray,
    task: ModelTask,
    layout: tuple[ModelOutput, ...],
    inputs: tuple[InputSlot, ...],
    devices: ValidationParameters,
) -> dict[str, Any]:
    """A configuration on each device target: TFLite Micro's figures, and Vela's (the compiled model itself is kept
    only for the configuration the sweep picks, by its full validation)."""
    tflm = None
    if DeviceTarget.tflm in devices.targets:
        tflm = tflm_figures(model_bytes, features, labels, reference, task, layout, inputs, devices.tflm_samples)
    npu = tuple(
        compile_for_npu(model_bytes, target, devices.vela_system_config, devices.vela_memory_mode).figures
        for target in devices.npu_targets
    )
    return {"targets": devices.targets, "tflm": tflm, "npu": npu}


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
    """The gate for one configuration: validated, repeatable, within its task's gate (``tasks.evaluation.fidelity``),
    "full
    integer if required, and within the device budgets."""
    m = row.metrics
    fidelity = judge_fidelity(m, gate) if m is not None and m.validated else None
    if row.error is not None:
        verdict = f"no model: {row.error}"
    elif m is None or fidelity is None:
        verdict = f"not validated: {m.not_validated_reason if m else 'no metrics'}"
    elif m.rerun_max_difference:
        verdict = (
            f"not repeatable: outputs differ by up to {m.rerun_max_difference:.3g} between two runs on the same input"
        )
    elif unrunnable_share(m) > gate.max_unrunnable_fraction:
        verdict = f"refused {m.unrunnable_rows:,} test samples ({', '.join(m.unrunnable[0].operators) or 'see report'})"
    elif not fidelity.passed:
        verdict = fidelity.short
    elif require_full_integer and not m.full_integer:
        verdict = f"not full integer ({m.float_tensors} float tensors)"
    elif not row.reference and (refused := target_problems(m.targets, m.tflm, m.npu, gate)):
        verdict = "; ".join(message.split(": ")[0] for _, message in refused)
    elif not row.reference and (problems := footprint_problems(footprints(m), gate)):
        verdict = "does not fit: " + "; ".join(what for what, _ in problems)
    elif row.reference:
        verdict = "reference"
    else:
        return row.model_copy(update={"passed": True, "verdict": "passed"})
    return row.model_copy(update={"passed": False, "verdict": verdict})


def footprints(m: ConfigurationMetrics) -> list[Footprint]:
    return target_footprints(m.targets, m.tflm, m.npu, m.bytes, m.arena_bytes)


def _sort_key(row: SweepRow, rank_by: RankBy) -> tuple:
    m = row.metrics
    size = m.bytes if m else float("inf")
    latency = m.latency_p50_ms if m and m.latency_p50_ms is not None else float("inf")
    loss = fidelity_loss(m) if m and m.validated else None
    drop = float("inf") if loss is None else loss
    order = {
        RankBy.size: (size, latency, drop),
        RankBy.latency: (latency, size, drop),
        RankBy.accuracy: (drop, size, latency),
    }[rank_by]
    return (*order, row.name)


def rank(rows: Sequence[SweepRow], rank_by: RankBy) -> list[SweepRow]:
    """Passing configurations first, best first by ``rank_by`` (the other two break ties; accuracy is the task's
    own figure, ``tasks.evaluation.fidelity.fidelity_loss``), numbered; then the float reference and the failing ones,
    least lost first."""
    passing = sorted((r for r in rows if r.passed), key=lambda r: _sort_key(r, rank_by))
    rest = sorted((r for r in rows if not r.passed), key=lambda r: (not r.reference, _sort_key(r, RankBy.accuracy)))
    return [r.model_copy(update={"rank": i}) for i, r in enumerate(passing, 1)] + rest


class SweepReport(BaseModel):
    table: ArtifactRef = Field(description="sweep.json: every row, ranked.")
    markdown: ArtifactRef = Field(description="sweep.md: the comparison table.")
    plot: ArtifactRef = Field(description="sweep.png: size vs accuracy drop, and latency.")

    def artifacts(self) -> dict[str, ArtifactRef]:
        """The sweep's files by the names runs record them under."""
        return {"sweep": self.table, "sweep_md": self.markdown, "sweep_plot": self.plot}


def no_configuration_passed(
    rows: Sequence[SweepRow], gate: GateParameters, task: ModelTask = ModelTask.classification
) -> GateResult:
    """The sweep's verdict when no configuration of ``rows`` (ranked) passed: it names the closest one."""
    closest = next((r for r in rows if not r.reference), None)
    detail = f"; closest: {closest.name} ({closest.verdict})" if closest else ""
    budgets = "raise the device budgets, " if gate.ram_budget is not None or gate.flash_budget is not None else ""
    return GateResult(
        name="sweep",
        status=GateStatus.failed,
        observed_drop_pp=None,
        max_drop_pp=gate.max_accuracy_drop,
        message=f"no configuration passed the gate{detail}: calibrate on more samples (--calibration-sizes), "
        f"{GATE_OPTION[task]}, {budgets}or drop --require-full-integer",
    )
