"""The validation report as types: what ``report.json`` holds, read and written through these models only.

The validation stage builds a ``ValidationReport``; the gate (``tasks.evaluation.gate``), the renderers
(``tasks.views.render``), promotion and the flows read its fields. JSON is its serialisation (``model_dump_json`` /
``model_validate_json``), never a dict read back by string keys.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ptqflow.storage.store import ArtifactRef
from ptqflow.tasks.core.artifacts import (
    FidelityFigures,
    MixedPrecisionChoice,
    NpuFigures,
    OutputFigures,
    RepairStep,
    TflmFigures,
)
from ptqflow.tasks.core.parameters import DeviceTarget

# Bumped when a field changes meaning; a reader refuses nothing older, it only fills defaults.
# 3: the task's figures; accuracies null for tasks without classes. 4: device footprints. 5: above
# DENSE_CONFUSION_CLASSES classes, the most confused pairs instead of the whole confusion matrix. 6: device
# targets (--target): TFLite Micro's run and arena, Vela's compilation per Ethos-U. 7: the files take one sample
# per call (static shapes), and the audit lists any tensor whose shape is known only at run time; samples a model
# cannot run are counted (``unrunnable``) and the figures are of the rest. 8: scheme mixed16's int16 layers and their
# cost against all-int8 (``mixed``).
REPORT_VERSION = 8
# Two layers whose badness is within this factor are a close call: the statistics behind badness come from
# float calibration and a float reference whose rounding differs between processors (summation order, vector
# width), and from trained weights that differ too. Such layers can swap places on another machine, and repair,
# which keeps layers in float in ranking order, can then choose the other one first.
CLOSE_RANKING_MARGIN = 1.1


class ModelKind(str, Enum):
    """The three models a validation compares, in the order every table shows them."""

    float_keras = "float_keras"
    float_tflite = "float_tflite"
    quantized_tflite = "quantized_tflite"

    @property
    def label(self) -> str:
        return {"float_keras": "float Keras", "float_tflite": "float .tflite", "quantized_tflite": "quantized .tflite"}[
            self.value
        ]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class LatencyPercentiles(Frozen):
    p50: float = Field(description="Milliseconds, batch 1.")
    p95: float
    runs: int


class Speed(Frozen):
    """Measured on the machine that validated, with its interpreter thread count."""

    latency_ms: LatencyPercentiles
    throughput_per_s: float
    throughput_batch: int


class Confusion(Frozen):
    true: str
    predicted: str
    count: int


class ModelMetrics(Frozen):
    """One model on the test split. Against the labels: accuracy (classification), or MAE and RMSE (regression).
    Against the float Keras model's outputs: agreement, output MAE, largest error and SQNR."""

    accuracy: float | None = Field(description="Classification only.")
    per_class_accuracy: dict[str, float | None] = Field(
        default_factory=dict, description="Classification only; None for a class with no test row."
    )
    confusion_matrix: list[list[int]] = Field(
        default_factory=list,
        description="Classification with at most DENSE_CONFUSION_CLASSES classes. Rows: true class; columns: "
        "predicted class.",
    )
    most_confused: list[Confusion] = Field(
        default_factory=list,
        description="Classification with more classes: the most frequent mistakes (true, predicted, count), most "
        "frequent first; the report's cost stays linear in the test rows.",
    )
    mae: float | None = Field(None, description="Regression only: mean absolute error against the targets.")
    rmse: float | None = Field(None, description="Regression only: root mean squared error against the targets.")
    agreement_with_float: float | None = Field(
        description="Share of samples whose top-1 class is the float model's; None for outputs that are not class "
        "scores (regression, one-value outputs)."
    )
    output_mae: float
    output_max_abs_error: float | None = Field(None, description="Largest absolute difference from the float outputs.")
    output_sqnr_db: float | None = Field(description="None when the outputs equal the float model's exactly.")
    outputs: dict[str, OutputFigures] = Field(
        default_factory=dict, description="Each output by name, against the float model's (one for most models)."
    )
    bytes: int | None = Field(description="The .tflite file's size; None for the Keras model.")
    speed: Speed | None = None


class TensorQuantization(Frozen):
    dtype: str
    scale: float
    zero_point: int


class FloatOp(Frozen):
    op: str
    output: str = Field(description="The op's first output tensor.")


class TypeAudit(Frozen):
    """Element types inside the quantized ``.tflite``: a full-integer model has no float tensor at all."""

    full_integer: bool
    float_tensors: list[str]
    float_ops: list[FloatOp]
    flex_ops: list[str]
    dtypes: dict[str, int]
    ops: list[str]
    input: TensorQuantization
    output: TensorQuantization
    inputs: dict[str, TensorQuantization] = Field(
        default_factory=dict,
        description="A model with several inputs: each input's type, scale and zero point, by its name (``input`` is "
        "then only the first in the model's own order).",
    )
    dynamic_tensors: list[str] | None = Field(
        None,
        description="Tensors whose shape is known only at run time (-1 in the shape signature, e.g. a dynamic batch): "
        "none in the files ptqflow converts, which take one sample per call as a device runs them. None: not audited "
        "(reports before version 7).",
    )


class LayerError(Frozen):
    """One quantized layer's error, in steps of its output tensor's scale (see ``tasks.evaluation.diagnose``)."""

    layer: str
    op: str
    tensor: str
    scale: float
    rmse_over_scale: float
    mean_abs_error: float
    typical_steps: float | None = Field(description="None for ops whose output range is fixed (softmax).")
    badness: float


@dataclass(frozen=True)
class RankingMargin:
    """How clearly the worst layer leads the next one."""

    first: LayerError
    second: LayerError

    @property
    def ratio(self) -> float:
        return self.first.badness / self.second.badness

    @property
    def close(self) -> bool:
        """Another processor may rank the two the other way (see CLOSE_RANKING_MARGIN)."""
        return self.ratio < CLOSE_RANKING_MARGIN

    def __str__(self) -> str:
        first, second = self.first, self.second
        sentence = (
            f"ranking margin: {first.layer} ({first.op}) is {self.ratio:.2f}x as bad as {second.layer} ({second.op})"
        )
        if self.close:
            sentence += (
                f"; a close call (within {CLOSE_RANKING_MARGIN - 1:.0%}): another processor can rank them the other "
                "way, and repair then keeps the other in float first"
            )
        return sentence


def ranking_margin(ranked: Sequence[LayerError]) -> RankingMargin | None:
    """The margin between the two worst layers of ``ranked`` (worst first); None with fewer than two."""
    return RankingMargin(ranked[0], ranked[1]) if len(ranked) >= 2 and ranked[1].badness > 0 else None


class RepairCost(Frozen):
    """What repair kept in float and what that cost, measured on the test split against the fully quantized
    model."""

    succeeded: bool
    float_layers: list[str]
    steps: list[RepairStep]
    message: str
    unrepaired_accuracy: float | None = Field(description="Classification: the fully quantized model's accuracy.")
    repaired_accuracy: float | None
    unrepaired_fidelity: str = Field("", description="The fully quantized model's judged figure, in words.")
    repaired_fidelity: str = Field("", description="The repaired model's judged figure, in words.")
    unrepaired_model: ArtifactRef
    unrepaired_bytes: int
    repaired_bytes: int
    unrepaired_latency_ms_p50: float | None = Field(description="None: it refused every test sample.")
    repaired_latency_ms_p50: float | None


class MixedPrecisionCost(Frozen):
    """Scheme mixed16: the int16 layers, and what they cost and gained against the all-int8 model the search started
    from, on the test split (fidelity, latency) and on the device's runtime (TFLM's arena)."""

    choice: MixedPrecisionChoice
    int8_fidelity: str = Field(description="The all-int8 model's judged figure on the test split, in words.")
    mixed_fidelity: str
    int8_bytes: int
    mixed_bytes: int
    int8_latency_ms_p50: float | None
    mixed_latency_ms_p50: float | None
    int8_arena_bytes: int | None = Field(description="TFLM's arena for the all-int8 model (None: not measured).")
    mixed_arena_bytes: int | None
    arena_unavailable: str | None = Field(None, description="Why the arenas were not measured.")


class ArenaCheck(Frozen):
    """What the LiteRT Interpreter itself allocated for the model (built-in kernels, batch 1), beside the plan of
    the same tensors (``tasks.evaluation.device``)."""

    arena_bytes: int = Field(
        description="The span of the interpreter's read-write arena: the model's tensors and its kernels' scratch."
    )
    planned_bytes: int = Field(description="The plan of the model's tensors the interpreter put in that arena.")
    scratch_tensors: int = Field(
        0,
        description="Scratch tensors of the interpreter's kernels in its arena (e.g. im2col buffers of optimized "
        "convolutions), which the model does not list and a device's kernels may not need.",
    )
    largest_scratch_bytes: int = 0
    persistent_tensors: int = Field(0, description="Tensors LiteRT keeps in its persistent arena, apart.")
    runtime_sized_tensors: int = Field(
        0, description="Tensors whose shape is known only at run time: the interpreter allocates them apart."
    )


class DeviceFootprint(Frozen):
    """What one ``.tflite`` needs on a device running one sample at a time (``tasks.evaluation.device``)."""

    flash_bytes: int = Field(description="The .tflite file: what a device stores.")
    weight_bytes: int = Field(description="Of that, the constant tensors (weights, biases, tables).")
    arena_bytes: int = Field(
        description="Peak RAM for tensors: the arena LiteRT's planner lays out from the execution plan (64-byte "
        "aligned)."
    )
    peak_live_bytes: int = Field(description="The most tensor bytes live at one operator: no planner can use less.")
    ops: list[str] = Field(description="The operators in execution order.")
    live_bytes: list[int] = Field(description="Tensor bytes live while each operator runs.")
    interpreter: ArenaCheck | None = Field(None, description="None when the interpreter cannot allocate the model.")
    note: str | None = Field(None, description="What these figures leave out, if anything.")


class ValidationMetrics(FidelityFigures):
    """Every figure of one validation. ``validated`` False: the model could not run here (``models`` then holds
    the float Keras model only, and every quantized figure is None)."""

    samples: int
    class_names: list[str]
    float_accuracy: float | None = Field(description="Classification only.")
    float_bytes: int
    quantized_bytes: int
    size_ratio: float
    num_threads: int
    audit: TypeAudit
    validated: bool
    not_validated_reason: str | None
    tflite_float_accuracy: float | None
    quantized_accuracy: float | None
    accuracy_drop_pp: float | None
    agreement: float | None
    rerun_max_difference: float | None = Field(
        description="Largest output difference between two identical runs of the quantized model on the first test "
        "batch; 0 when repeatable."
    )
    models: dict[ModelKind, ModelMetrics]
    layers: list[LayerError] = Field(default_factory=list, description="Per-layer error, worst first.")
    layers_unavailable: str | None = Field(None, description="Why there are no per-layer figures.")
    repair: RepairCost | None = None
    mixed: MixedPrecisionCost | None = None
    device: dict[ModelKind, DeviceFootprint] = Field(
        default_factory=dict, description="Flash and tensor-arena RAM of each .tflite (empty in older reports)."
    )
    targets: tuple[DeviceTarget, ...] = Field(
        (DeviceTarget.litert,), description="Where the model will run (--target); older reports: LiteRT only."
    )
    tflm: TflmFigures | None = Field(None, description="With --target tflm: TensorFlow Lite Micro's figures.")
    npu: list[NpuFigures] = Field(default_factory=list, description="Vela's compilation for each Ethos-U target.")


class PromotionDecision(BaseModel):
    """Whether a run's model replaces the exported one, with both figures on the same rows
    "(``tasks.release.promotion``);
    the report of the run that decided records it."""

    promote: bool
    message: str
    metric: Literal["accuracy", "mae", "none"] = Field(
        "accuracy",
        description="What the two were compared by: accuracy (classification), MAE (regression), or nothing "
        "(unlabeled data: no labels to compare two models on; a model that passes its own gate replaces the other).",
    )
    challenger_accuracy: float | None
    champion_accuracy: float | None = None
    challenger_mae: float | None = None
    champion_mae: float | None = None
    champion_version: str | None = None
    champion_run_id: str | None = None
    tolerance_pp: float = Field(
        description="How many pp below the champion the challenger may be (regression: how many percent above the "
        "champion's MAE)."
    )
    compared_rows: int | None = Field(
        None, description="Test rows both models were measured on: those the champion never trained on."
    )
    comparison: str | None = Field(None, description="Which rows were compared, in words.")


class ValidationReport(Frozen):
    """``report.json``: what was validated (references) and every figure."""

    kind: Literal["ptqflow.validation_report"] = "ptqflow.validation_report"
    report_version: int = REPORT_VERSION
    dataset: ArtifactRef
    model: ArtifactRef
    quantized_model: ArtifactRef
    float_tflite: ArtifactRef
    conversion: dict[str, object] | None = Field(description="The conversion parameters, as the run recorded them.")
    metrics: ValidationMetrics
    promotion: PromotionDecision | None = None


# Report fields timed on each run: a model's speed, and the latency figures of the repair and mixed16 costs.
TIMED_FIELD = re.compile(r"^speed$|latency|throughput")


def without_timings(document: Any) -> Any:
    """A report, or a part of it, as JSON, without the figures timed again on every run (latency, throughput):
    two validations of the same models on the same rows agree on everything else, however they were spread over
    processes (``tasks.evaluation.shards``)."""
    if isinstance(document, dict):
        return {k: without_timings(v) for k, v in document.items() if not TIMED_FIELD.search(k)}
    if isinstance(document, list):
        return [without_timings(v) for v in document]
    return document
