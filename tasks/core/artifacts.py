"""What stages hand to each other: small JSON-serialisable records of artifact references and facts.

Never arrays or models: each stage can run in its own process or on another machine, and Prefect persists these
records (as JSON) as the task results that cache hits return.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict, Field

from ptqflow.storage.results import StoredResult
from ptqflow.storage.store import ArtifactRef
from ptqflow.storage.tables import InputSlot
from ptqflow.tasks.core.parameters import DeviceTarget, ModelTask


class StageOutput(StoredResult):
    model_config = ConfigDict(frozen=True)

    def artifact_refs(self) -> Iterator[ArtifactRef]:
        for name in type(self).model_fields:
            value = getattr(self, name)
            values = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else (value,)
            yield from (v for v in values if isinstance(v, ArtifactRef))


class FeatureSpec(BaseModel):
    """What the model's input looks like (one sample's shape and raw dtype, the raw value range) and what its
    output is judged against: ``n_classes`` classes, or ``n_targets`` regression targets, or (unlabeled) nothing."""

    model_config = ConfigDict(frozen=True)

    shape: tuple[int, ...]
    dtype: str
    value_range: tuple[float, float]
    n_classes: int
    class_names: tuple[str, ...]
    task: ModelTask = ModelTask.classification
    n_targets: int = Field(0, description="--task regression: the number of numeric targets per sample.")
    inputs: tuple[InputSlot, ...] = Field(
        (),
        description="A model with several inputs (--feature-column a,b): each input's name, sample shape and stored "
        "type, in the order their values are packed side by side in ``shape``; empty for a model with one input.",
    )


class SplitRule(BaseModel):
    """How rows were assigned to splits: enough to tell, for any row, which split this run put it in."""

    model_config = ConfigDict(frozen=True)

    scheme: str = Field(
        description="The assignment rule's name: tasks.data.sampling.SPLIT_SCHEME (by content hash) or GIVEN_SCHEME "
        "(the source's own splits; a split it lacks is carved from its train rows by content hash)."
    )
    seed: int
    validation_fraction: float
    test_fraction: float
    given: dict[str, str] | None = Field(
        None, description="GIVEN_SCHEME: where each given split came from (folders, files or the split column)."
    )


class SampledDataset(StageOutput):
    manifest: ArtifactRef = Field(description="dataset.json: the spec and the three splits.")
    train: ArtifactRef
    validation: ArtifactRef
    test: ArtifactRef
    spec: FeatureSpec
    counts: dict[str, int]
    split: SplitRule | None = Field(None, description="None in records from before splits were assigned by content.")
    seen_rows: ArtifactRef | None = Field(
        None,
        description="Given splits only: the content digests of the train and validation rows (tasks.data.sampling."
        "row_digests), which a later run's champion check needs, since no rule can replay an owner's split.",
    )


class FloatOutputs(StageOutput):
    outputs: ArtifactRef = Field(
        description="The float Keras model's outputs on the test split: a tensor table, labels included."
    )


class RefusedCall(BaseModel):
    """Test rows ``start`` to ``stop`` that a ``.tflite`` refused to run, with the interpreter's message."""

    model_config = ConfigDict(frozen=True)

    start: int
    stop: int
    message: str


class TflmOnRows(BaseModel):
    """TFLite Micro on the rows of a range it runs (``tasks.evaluation.tflm.tflm_rows``, less those LiteRT
    refuses): its outputs, or its reason for running none."""

    model_config = ConfigDict(frozen=True)

    outputs: ArtifactRef | None = Field(
        None,
        description="A tensor table, one row per test row TFLM ran: its outputs, and the row's position in the test "
        "split as the label. None: no row of the range, or TFLM refused.",
    )
    refusal: str | None = None


class PredictedRows(StageOutput):
    """Every model's outputs on test rows ``start`` to ``stop`` (``tasks.evaluation.shards``)."""

    start: int
    stop: int
    outputs: ArtifactRef = Field(
        description="A tensor table, one row per test row: the float Keras model's, the float .tflite's and the "
        "quantized .tflite's outputs, in that order (NaN where a .tflite refused the row)."
    )
    float_refused: tuple[RefusedCall, ...] = ()
    quantized_refused: tuple[RefusedCall, ...] = ()
    tflm: TflmOnRows | None = Field(None, description="With --target tflm: the quantized model on TFLite Micro.")


class ModelOutput(BaseModel):
    """One output of the float model (``tasks.models.outputs``)."""

    model_config = ConfigDict(frozen=True)

    name: str
    shape: tuple[int, ...] = Field(description="One sample's shape.")
    class_scores: bool = Field(description="Produced by a softmax or sigmoid: its top-1 class can agree or not.")


class TrainedModel(StageOutput):
    model: ArtifactRef = Field(description="The float Keras model (.keras).")
    epochs_run: int
    best_epoch: int
    validation_accuracy: float | None = Field(description="Classification: the float model's validation accuracy.")
    validation_mae: float | None = Field(None, description="Regression: the float model's validation MAE.")
    outputs: tuple[ModelOutput, ...] = Field(
        (), description="The model's outputs in order (empty in records from before they were recorded: one output)."
    )


class CalibrationSet(StageOutput):
    table: ArtifactRef = Field(description="Calibration samples as a Parquet tensor table.")
    samples: int


class Int16Layer(BaseModel):
    """A layer whose activations scheme mixed16 raised to int16."""

    model_config = ConfigDict(frozen=True)

    layer: str = Field(description='The Keras layer ("model output" for the model\'s last operator).')
    op: str = Field(description="The TFLite operator, e.g. CONV_2D.")
    tensor: str = Field(description="Its output tensors in the float .tflite (the quantizer's name for the layer).")


class MixedPrecisionChoice(BaseModel):
    """Scheme mixed16: the layers raised to int16, and the worst output's SQNR against the float .tflite on the
    calibration rows the search compared on."""

    model_config = ConfigDict(frozen=True)

    int16_layers: tuple[Int16Layer, ...] = Field(description="Most sensitive first.")
    layers: int = Field(description="Layers the search could raise (those that compute; reshapes and the like follow).")
    max_int16_fraction: float
    int8_sqnr_db: float | None = Field(description="All layers int8 (None: identical to float).")
    int16_sqnr_db: float | None = Field(
        description="All layers int16 (None: the quantizer cannot write it, LiteRT cannot run it, or it equals float)."
    )
    reached_sqnr_db: float | None
    int8_refused_rows: int = Field(0, description="Search rows the all-int8 model cannot run (an int8 DIV by zero).")
    refused_rows: int = Field(0, description="Search rows the chosen model cannot run.")
    target_met: bool = Field(
        description="As few refused rows as whole-model int16, and within --int16-within-db of its SQNR."
    )
    search_rows: int
    int8_model: ArtifactRef = Field(description="The all-int8 model the search started from: the cost's baseline.")

    @property
    def int16_fraction(self) -> float:
        return len(self.int16_layers) / self.layers if self.layers else 0.0


class ConvertedModels(StageOutput):
    quantized: ArtifactRef = Field(description="The quantized .tflite.")
    float_model: ArtifactRef = Field(description="The float .tflite (no optimizations), for comparison.")
    mixed: MixedPrecisionChoice | None = Field(None, description="Scheme mixed16: what the search chose.")


class WorstLayer(BaseModel):
    """A layer named in the gate's message: the report has every layer's figures."""

    model_config = ConfigDict(frozen=True)

    layer: str
    op: str
    tensor: str
    badness: float


class RepairStep(BaseModel):
    model_config = ConfigDict(frozen=True)

    layer: str = Field(description="The layer this step added (with the layers that read its output).")
    float_layers: tuple[str, ...] = Field(description="Every layer in float after this step.")
    float_tensors: tuple[str, ...]
    validation_drop_pp: float | None = Field(description="Classification: the accuracy drop on the validation split.")
    validation: str = Field("", description="The task's judged figure on the validation split, in words.")
    quantized_bytes: int


class RepairResult(StageOutput):
    """What repair kept in float, one more layer per step, judged on the validation split; or, under --ops int8,
    which layers it raised to int16 activations (``mixed``)."""

    repaired: ArtifactRef | None = Field(None, description="The selectively quantized .tflite, if it met the gate.")
    unrepaired: ArtifactRef = Field(description="The fully quantized .tflite that failed the gate.")
    succeeded: bool
    float_layers: tuple[str, ...]
    steps: tuple[RepairStep, ...]
    message: str
    mixed: MixedPrecisionChoice | None = Field(None, description="An int16 repair: what the search chose.")

    def changed(self) -> str:
        """What the repaired model does differently, in words."""
        if self.mixed is not None:
            return f"raised to int16: {', '.join(layer.layer for layer in self.mixed.int16_layers)}"
        return f"kept in float: {', '.join(self.float_layers)}"


class OutputFigures(BaseModel):
    """One output of the quantized model against the float model's (``validation_report.OutputMetrics``)."""

    model_config = ConfigDict(frozen=True)

    sqnr_db: float | None = Field(description="None when it equals the float model's exactly.")
    mae: float
    max_abs_error: float
    agreement: float | None = Field(description="Top-1 agreement; None for an output that is not class scores.")


class UnrunnableSamples(BaseModel):
    """Test samples a model could not run: its kernels refused their values (an int8 DIV whose divisor sits at its
    zero point, for one)."""

    model_config = ConfigDict(frozen=True)

    model: str = Field(description="The model that refused them: float_tflite or quantized_tflite.")
    count: int
    of_rows: int = Field(description="The test samples the model was given.")
    operators: tuple[str, ...] = Field(description="Each operator that refused, as LiteRT names it: 'DIV (node 197)'.")
    examples: tuple[str, ...] = Field(description="Up to five rows, each with LiteRT's message.")


class FidelityFigures(BaseModel):
    """The figures of the tasks other than classification (``tasks.evaluation.fidelity``), in a run's figures and in the
    report alike."""

    model_config = ConfigDict(frozen=True)

    task: ModelTask = ModelTask.classification
    float_mae: float | None = Field(None, description="Regression: the float model's MAE against the targets.")
    tflite_float_mae: float | None = Field(None, description="Regression: the float .tflite model's MAE.")
    quantized_mae: float | None = Field(None, description="Regression: the quantized model's MAE.")
    mae_increase_pct: float | None = Field(
        None, description="Regression: how much larger the quantized MAE is, in percent of the float MAE."
    )
    sqnr_db: float | None = Field(
        None,
        description="The quantized outputs' SQNR against the float model's, in dB, of its worst output (None when "
        "identical).",
    )
    outputs: dict[str, OutputFigures] = Field(
        default_factory=dict, description="The quantized model's outputs by name, each against the float model's."
    )
    unrunnable_rows: int = Field(
        0,
        description="Test samples the figures leave out because a .tflite refused to run them (its kernels check the "
        "values); the gate fails above --max-unrunnable-fraction of the test split.",
    )
    unrunnable: tuple[UnrunnableSamples, ...] = Field((), description="Which model refused samples, and how.")


class TargetFidelity(FidelityFigures):
    """A target runtime's task figures on the rows it ran, against the float Keras model's outputs on those rows."""

    float_accuracy: float | None = None
    quantized_accuracy: float | None = None
    accuracy_drop_pp: float | None = None
    agreement: float | None = None


class TflmFigures(BaseModel):
    """The quantized model on TensorFlow Lite Micro: its interpreter (reference kernels, one sample at a time) and
    its recording allocator, from the ``tflite-micro`` package (``tasks.evaluation.tflm``)."""

    model_config = ConfigDict(frozen=True)

    runtime: str = Field(description="The package and version that measured these figures.")
    ran: bool
    not_run_reason: str | None = Field(None, description="Why TFLM could not allocate or run the model.")
    samples: int = Field(description="Test rows it ran.")
    subset_seed: int | None = Field(None, description="The seed of the draw of those rows; None: the whole split.")
    arena_bytes: int | None = Field(
        None,
        description="The smallest tensor arena TFLM allocates the model in (16-byte steps), found by allocating it: "
        "what kTensorArenaSize must hold. At least head + tail; more when operators take temporary memory while "
        "they are prepared.",
    )
    arena_head_bytes: int | None = Field(None, description="Of the arena, the activations (planned, reused).")
    arena_tail_bytes: int | None = Field(
        None,
        description="Of the arena, what TFLM keeps for the model's lifetime: eval tensors, quantization data "
        "(per-channel multipliers and shifts), node structs.",
    )
    ops: tuple[str, ...] = Field((), description="The model's operators, which the firmware's op resolver must hold.")
    figures: TargetFidelity | None = Field(None, description="The task's figures on TFLM's outputs.")
    identical_to_litert: float | None = Field(
        None, description="Share of rows whose outputs equal LiteRT's bit for bit."
    )
    max_difference_lsb: float | None = Field(
        None, description="Largest difference from LiteRT's outputs, in quantization steps of the output."
    )


class CpuOperator(BaseModel):
    """An operator Vela leaves to the CPU, with Vela's reason."""

    model_config = ConfigDict(frozen=True)

    op: str
    tensor: str = Field(description="Its output tensor, which names it.")
    reason: str


class NpuFigures(BaseModel):
    """The quantized model compiled by Arm's Vela for one Ethos-U configuration (``tasks.evaluation.vela``)."""

    model_config = ConfigDict(frozen=True)

    target: DeviceTarget
    compiler: str = Field(description="The package and version that compiled it.")
    compiled: bool
    error: str | None = Field(None, description="Why Vela could not compile the model.")
    system_config: str | None = None
    memory_mode: str | None = None
    clock_hz: float | None = Field(None, description="The NPU clock of the system configuration.")
    npu_ops: int = 0
    cpu_ops: int = 0
    cpu_operators: tuple[CpuOperator, ...] = ()
    sram_bytes: int | None = Field(None, description="SRAM Vela places tensors in (feature maps, cached weights).")
    flash_bytes: int | None = Field(None, description="Flash (on- and off-chip) the compiled model occupies.")
    dram_bytes: int | None = None
    inferences_per_second: float | None = Field(None, description="Vela's estimate at the configured clock.")
    cycles: int | None = Field(None, description="Vela's estimate of the cycles of one inference.")
    compiled_model: ArtifactRef | None = Field(None, description="The compiled _vela.tflite firmware runs.")

    @property
    def npu_share(self) -> float | None:
        total = self.npu_ops + self.cpu_ops
        return self.npu_ops / total if total else None


class ValidationFigures(FidelityFigures):
    """The figures a run is judged by (the report has every other one)."""

    validated: bool = True
    not_validated_reason: str | None = None
    float_accuracy: float | None = Field(description="Classification only, as are the other accuracies.")
    tflite_float_accuracy: float | None
    quantized_accuracy: float | None
    accuracy_drop_pp: float | None
    agreement: float | None = Field(description="Share of test samples whose top-1 class is the float model's.")
    rerun_max_difference: float | None = Field(
        None,
        description="Largest output difference between two identical runs of the quantized model on the "
        "first test batch; 0 when repeatable.",
    )
    float_bytes: int
    quantized_bytes: int
    arena_bytes: int | None = Field(
        None,
        description="The quantized model's tensor arena, batch 1 (tasks.evaluation.device); None in older records.",
    )
    full_integer: bool
    float_tensors: tuple[str, ...]
    floats_not_asked_for: tuple[str, ...] = Field(
        (),
        description="Under --ops int8: the operators with a float tensor the I/O types did not ask for (the "
        "conversion refuses such a model, and the gate fails on one as full_integer).",
    )
    worst_layers: tuple[WorstLayer, ...] = ()
    int16_layers: tuple[str, ...] = Field((), description="Scheme mixed16: the layers with int16 activations.")
    targets: tuple[DeviceTarget, ...] = Field(
        (DeviceTarget.litert,), description="Where the model will run (--target): the targets the gate judges."
    )
    tflm: TflmFigures | None = Field(None, description="With --target tflm.")
    npu: tuple[NpuFigures, ...] = Field((), description="One per Ethos-U target.")


class ValidationResult(StageOutput, ValidationFigures):
    """The validation stage's record: its report and the figures a run is judged by."""

    report: ArtifactRef = Field(description="report.json: every metric, the dtype audit, per-layer error.")
    device_files: dict[str, ArtifactRef] = Field(
        default_factory=dict,
        description="The targets' files by export label: a _vela.tflite per Ethos-U, model_data.cc/.h for TFLM.",
    )

    def figures(self) -> ValidationFigures:
        return ValidationFigures.model_validate(self.model_dump(include=set(ValidationFigures.model_fields)))
