"""Typed parameters, one model per stage.

The same definitions drive the CLI's options, the Prefect UI's run form (Prefect renders pydantic fields with
their descriptions and enums) and the tests. Every field that changes a stage's output is part of that stage's
cache key; fields that only change how the gate judges a result (``max_accuracy_drop``) are not.
"""

from __future__ import annotations

import math
import re
from datetime import date
from enum import Enum
from typing import Any

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from ptqflow.storage.store import carries_credentials


class ColorMode(str, Enum):
    rgb = "rgb"
    grayscale = "grayscale"


class ModelTask(str, Enum):
    """What the model's outputs are judged against (``tasks.evaluation.fidelity``): ``classification``, class labels
    (softmax, logits or sigmoid scores; argmax); ``regression``, numeric targets (MAE, RMSE); ``unlabeled``, no
    labels: the float model's own outputs are the reference (SQNR, error, top-1 agreement)."""

    classification = "classification"
    regression = "regression"
    unlabeled = "unlabeled"

    @property
    def targets(self) -> str:
        """What its label column holds (``storage.tables.TARGET_KINDS``)."""
        return {"classification": "classes", "regression": "values", "unlabeled": "none"}[self.value]


class SplitMode(str, Enum):
    """Whether the splits a source gives are used (``tasks.data.splits``)."""

    auto = "auto"
    resplit = "resplit"


class TensorType(str, Enum):
    """Element type of the converted model's input or output tensor."""

    float32 = "float32"
    uint8 = "uint8"
    int8 = "int8"
    int16 = "int16"


class QuantizationScheme(str, Enum):
    """What the converter quantizes. ``full_integer``: int8 weights and activations, calibrated (the default);
    ``int16x8``: int16 activations with int8 weights, calibrated (more accurate, larger, slower kernels);
    ``dynamic_range``: int8 weights, float activations, no calibration; ``float16``: float16 weights; ``mixed16``:
    int8 weights and activations, with int16 activations in the layers that need them, chosen by measuring
    (``tasks.evaluation.mixed``)."""

    full_integer = "full_integer"
    int16x8 = "int16x8"
    dynamic_range = "dynamic_range"
    float16 = "float16"
    mixed16 = "mixed16"

    @property
    def calibrated(self) -> bool:
        return self in (QuantizationScheme.full_integer, QuantizationScheme.int16x8, QuantizationScheme.mixed16)


class CalibrationMethod(str, Enum):
    """How each activation's range is chosen from the calibration data (``tasks.quantization.ranges``): ``minmax`` (the
    converter's own), ``percentile``, ``mse`` or ``kl``."""

    minmax = "minmax"
    percentile = "percentile"
    mse = "mse"
    kl = "kl"


DEFAULT_PERCENTILE = 99.99


class TargetOps(str, Enum):
    """Which op sets the converter may use: ``int8`` = TFLITE_BUILTINS_INT8 (full integer or fail),
    ``builtins`` = TFLITE_BUILTINS (ops that cannot be quantized stay float),
    ``select`` = TFLITE_BUILTINS + SELECT_TF_OPS (TensorFlow ops through the Flex delegate)."""

    int8 = "int8"
    builtins = "builtins"
    select = "select"


class DeviceTarget(str, Enum):
    """Where the quantized model will run, each measured by its own runtime or compiler: ``litert`` the LiteRT
    Interpreter (desktop and mobile CPUs), ``tflm`` TensorFlow Lite Micro (microcontrollers), and the Arm Ethos-U
    NPU configurations Arm's Vela compiler knows (``ethos-u55-128``: an Ethos-U55 with 128 MACs per cycle)."""

    litert = "litert"
    tflm = "tflm"
    ethos_u55_32 = "ethos-u55-32"
    ethos_u55_64 = "ethos-u55-64"
    ethos_u55_128 = "ethos-u55-128"
    ethos_u55_256 = "ethos-u55-256"
    ethos_u65_256 = "ethos-u65-256"
    ethos_u65_512 = "ethos-u65-512"
    ethos_u85_128 = "ethos-u85-128"
    ethos_u85_256 = "ethos-u85-256"
    ethos_u85_512 = "ethos-u85-512"
    ethos_u85_1024 = "ethos-u85-1024"
    ethos_u85_2048 = "ethos-u85-2048"

    @property
    def npu(self) -> bool:
        """An Ethos-U configuration: compiled by Vela."""
        return self.value.startswith("ethos-u")


# Vela's system configuration and memory mode are names of sections in its configuration file.
VELA_SECTION = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


def refuse_credentials(url: str | None, what: str) -> str | None:
    """Parameters are stored by Prefect and shown in its UI: a URL that carries a secret is refused."""
    if carries_credentials(url or ""):
        raise ValueError(
            f"{what} carries credentials: remove them and use the backend's standard sources "
            "(environment variables, profiles) or PTQFLOW_STORAGE_OPTIONS"
        )
    return url


# Marks a field that names a location, with what a run does there (see flows.trust): "data" and "models" are
# read, the store and the export (flow parameters, not fields) written.
LOCATION_ROLE = "ptqflow_location"
# A field's option name (API keyword, --flag, recipe key) where the field's own would clash with another group's.
OPTION_NAME = "ptqflow_option"
# A boolean field's pair of flags on the command line, where --x/--no-x reads badly.
OPTION_FLAGS = "ptqflow_flags"
# The environment variable the command line reads a field from when the option is not given.
OPTION_ENVVAR = "ptqflow_envvar"


class _Parameters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingParameters(_Parameters):
    dataset: str = Field(
        "digits",
        description="Data set: a built-in name (digits; mnist, fashion_mnist, cifar10 through keras.datasets) or an "
        "fsspec URL of a Parquet file or directory, which may hold the run's date: s3://bucket/events/{date:%Y-%m-%d}/",
        json_schema_extra={LOCATION_ROLE: "data"},
    )
    since: date | None = Field(
        None, description="Train only on the source's files modified on or after this day (UTC), e.g. 2026-11-01."
    )
    window_days: int | None = Field(
        None,
        ge=1,
        le=36_500,
        description="Train only on the source's files modified in the last N days before the run's date.",
    )
    feature_column: str = Field(
        "features",
        min_length=1,
        description="Column holding each sample's values; for a model with several inputs, one column per input, "
        "separated by commas (e.g. image,metadata), matched to the model's inputs by name, else in order.",
    )
    feature_columns: str | None = Field(
        None,
        description="Wide tables: the columns holding one numeric feature each, as names or globs separated by "
        "commas (e.g. f_*); a table with the label but no --feature-column column uses every numeric column but "
        "the label.",
    )
    task: ModelTask = Field(
        ModelTask.classification,
        description="classification (integer class labels), regression (numeric targets: a number or a fixed-size "
        "list of numbers per row) or unlabeled (no labels needed: a given model's float outputs are the reference).",
    )
    label_column: str = Field(
        "label", min_length=1, description="Column holding integer class indices, or the regression targets."
    )
    input_shape: tuple[int, ...] | None = Field(
        None,
        description="Shape of one sample, when the table does not carry it (e.g. 32,32,3).",
        examples=[(32, 32, 3)],
    )
    image_size: tuple[int, int] | None = Field(
        None,
        description="Image folders: resize every image to H,W (e.g. 64,64); without it every image must have one size.",
        examples=[(64, 64)],
    )
    color_mode: ColorMode | None = Field(
        None, description="Image folders: decode as rgb or grayscale; without it, the images' own mode."
    )
    sample_size: int | None = Field(
        None,
        ge=10,
        description="Use a seeded, stratified sample of this many rows (read by row groups; the source is never "
        "loaded whole), then split it.",
    )
    validation_fraction: float = Field(
        0.15, gt=0.0, lt=0.5, description="Share of the samples held out for early stopping."
    )
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5, description="Share of the samples held out for testing.")
    splits: SplitMode = Field(
        SplitMode.auto,
        description="auto: use the splits the source gives (train / validation / test folders or file names, "
        "Hugging Face's train-00000-of-00001.parquet, a split column, a keras.datasets test part), carving a "
        "missing validation or test split from its train rows; resplit: pool them and split by content hash.",
    )

    @field_validator("dataset")
    @classmethod
    def _no_credentials_in_the_url(cls, dataset: str) -> str:
        return refuse_credentials(dataset, "the data set URL") or dataset

    @field_validator("image_size")
    @classmethod
    def _an_image_size(cls, size: tuple[int, int] | None) -> tuple[int, int] | None:
        if size is not None and not all(1 <= d <= 8192 for d in size):
            raise ValueError("give the height and width in pixels, each 1 to 8192, e.g. 64,64")
        return size

    @field_validator("input_shape")
    @classmethod
    def _positive_dimensions(cls, shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if shape is not None and (not shape or any(d < 1 for d in shape)):
            raise ValueError("every dimension must be a positive integer, e.g. 32,32,3")
        return shape

    @model_validator(mode="after")
    def _file_selection_needs_files(self) -> SamplingParameters:
        if self.since is not None and self.window_days is not None:
            raise ValueError("give --since or --window-days, not both")
        if (
            (self.since is not None or self.window_days is not None)
            and "://" not in self.dataset
            and "/" not in self.dataset
        ):
            raise ValueError(
                "--since and --window-days select the files of a Parquet source URL, not a built-in data set"
            )
        return self

    @model_validator(mode="after")
    def _one_kind_of_features(self) -> SamplingParameters:
        if "," in self.feature_column and (self.feature_columns or self.input_shape):
            other = "--feature-columns" if self.feature_columns else "--input-shape"
            raise ValueError(
                f"--feature-column with several input columns takes no {other}: each input column's type (or the "
                "table's metadata) gives its shape"
            )
        return self

    @model_validator(mode="after")
    def _leave_training_data(self) -> SamplingParameters:
        if self.validation_fraction + self.test_fraction >= 0.8:
            raise ValueError(
                "validation_fraction + test_fraction must stay below 0.8 so that training keeps a fifth of the data"
            )
        return self


class TrainingParameters(_Parameters):
    model: str = Field(
        "auto",
        pattern=r"^(auto|cnn|mlp|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$",
        description="auto (cnn for HxWxC samples, mlp for 1-D), cnn, mlp, or module:function returning a Keras "
        "model for (input_shape, n_classes).",
    )
    model_url: str | None = Field(
        None,
        description="fsspec URL of a trained model to quantize instead of training one: .keras or legacy .h5 "
        "(loaded with Keras safe mode: no Lambda layers), or a SavedModel directory.",
        json_schema_extra={LOCATION_ROLE: "models"},
    )
    input_scale: tuple[float, ...] | None = Field(
        None,
        description="With --model-url: the model's own input normalisation, raw * input_scale + input_offset (e.g. "
        "0.00784313725 with offset -1 for x/127.5 - 1); for a model with several inputs, one value for all or one per "
        "input, separated by commas. The .tflite then takes the raw values.",
    )
    input_offset: tuple[float, ...] = Field(
        (0.0,), description="With --input-scale: added after scaling, one value for all inputs or one per input."
    )
    epochs: int = Field(60, ge=1, le=10_000, description="Maximum training epochs (early stopping may end sooner).")
    batch_size: int = Field(32, ge=1, le=65_536, description="Training batch size.")
    learning_rate: float = Field(1e-3, gt=0.0, lt=1.0, description="Adam learning rate.")
    early_stopping_patience: int = Field(
        10, ge=1, description="Epochs without validation-loss improvement before training stops."
    )

    @field_validator("model_url")
    @classmethod
    def _no_credentials_in_the_model_url(cls, url: str | None) -> str | None:
        return refuse_credentials(url, "the model URL")

    @field_validator("input_scale", "input_offset", mode="before")
    @classmethod
    def _one_value_or_one_per_input(cls, values: Any) -> Any:
        """A number, or numbers separated by commas (the CLI's and the form's way to give one per input)."""
        if isinstance(values, (int, float)) and not isinstance(values, bool):
            return (values,)
        if isinstance(values, str):
            try:
                return tuple(float(v) for v in values.split(","))
            except ValueError:
                raise ValueError(f"{values!r} is not numbers separated by commas, e.g. 0.0039,1") from None
        return values

    @field_validator("input_scale")
    @classmethod
    def _a_scale_that_keeps_the_input(cls, scales: tuple[float, ...] | None) -> tuple[float, ...] | None:
        for scale in scales or ():
            if scale == 0 or not math.isfinite(scale):
                raise ValueError(
                    f"{scale} maps every input to one value: give the scale the model was trained with, e.g. "
                    "0.00392156863 for x/255"
                )
        if scales is not None and not scales:
            raise ValueError("give at least one scale, e.g. 0.00392156863 for x/255")
        return scales

    @field_validator("input_offset")
    @classmethod
    def _finite_offsets(cls, offsets: tuple[float, ...]) -> tuple[float, ...]:
        if not offsets or not all(math.isfinite(o) for o in offsets):
            raise ValueError("give finite offsets, e.g. -1 for x/127.5 - 1")
        return offsets

    def normalisation(self, inputs: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """One (scale, offset) per input of a model with ``inputs`` inputs, or None without --input-scale.

        Raises:
            ValueError: more values than one for all, and not one per input.
        """
        if self.input_scale is None:
            return None
        counts = {len(self.input_scale), len(self.input_offset)} - {1}
        if counts - {inputs}:
            raise ValueError(
                f"--input-scale and --input-offset give {len(self.input_scale)} and {len(self.input_offset)} values "
                f"for a model with {inputs} input(s): give one value for all, or one per input"
            )
        scales = self.input_scale * inputs if len(self.input_scale) == 1 else self.input_scale
        offsets = self.input_offset * inputs if len(self.input_offset) == 1 else self.input_offset
        return scales, offsets

    @model_validator(mode="after")
    def _normalisation_describes_a_given_model(self) -> TrainingParameters:
        if any(self.input_offset) and self.input_scale is None:
            raise ValueError("--input-offset needs --input-scale (use --input-scale 1 for an offset alone)")
        if self.input_scale is not None and not self.model_url:
            raise ValueError(
                "--input-scale describes the input of a trained model: give it with --model-url (a model ptqflow "
                "trains scales raw values itself)"
            )
        return self


class CalibrationParameters(_Parameters):
    calibration_size: int = Field(
        200, ge=1, le=1_000_000, description="Samples drawn (stratified) from the training split for calibration."
    )
    calibration_source: str | None = Field(
        None,
        description="fsspec URL of a Parquet table with the data set's schema to calibrate on instead "
        "(e.g. a sample of production inputs).",
        json_schema_extra={LOCATION_ROLE: "data"},
    )

    @field_validator("calibration_source")
    @classmethod
    def _no_credentials_in_the_source(cls, url: str | None) -> str | None:
        return refuse_credentials(url, "the calibration source URL")


class ConversionParameters(_Parameters):
    input_type: TensorType = Field(TensorType.int8, description="Element type of the model's input tensor.")
    output_type: TensorType = Field(TensorType.int8, description="Element type of the model's output tensor.")
    ops: TargetOps = Field(TargetOps.int8, description="Op sets the converter may use.")
    scheme: QuantizationScheme = Field(
        QuantizationScheme.full_integer,
        description="full_integer (int8), int16x8 (int16 activations, int8 weights), mixed16 (int8, with int16 "
        "activations in the layers that need them, found by measuring), dynamic_range (int8 weights only) or float16.",
    )
    per_channel: bool = Field(
        True,
        description="One scale per output channel of each weight tensor (False: one per tensor, smaller).",
        json_schema_extra={OPTION_FLAGS: "--per-channel/--per-tensor"},
    )
    calibration_batch_size: int = Field(
        64,
        ge=1,
        le=65_536,
        description="Samples read per step from the calibration Parquet (the converter takes them one at a time: the "
        "converted model takes one sample per call).",
    )
    calibration_method: CalibrationMethod = Field(
        CalibrationMethod.minmax,
        description="How each activation's range is chosen from the calibration data: minmax (the converter's), "
        "percentile (the range holding --percentile of the values), mse (least quantization error) or kl (least "
        "KL divergence). Full integer only.",
    )
    percentile: float | None = Field(
        None,
        gt=50.0,
        le=100.0,
        description="--calibration-method percentile: the share of values kept in range, in percent (default 99.99).",
    )
    equalize: bool = Field(
        False,
        description="Equalize each activation's channel ranges into the weights that make and read it before "
        "converting (exact in float; layers joined by ReLU, LeakyReLU, pooling or nothing). Integer schemes only.",
    )
    bias_correction: bool = Field(
        False,
        description="Correct each weight layer's bias for the mean output shift that int8 rounding gives it, measured "
        "layer by layer on the calibration data, before converting. Integer schemes only.",
    )
    max_int16_fraction: float = Field(
        1 / 3,
        ge=0.0,
        le=1.0,
        description="Scheme mixed16: the largest share of the model's layers whose activations may be raised to int16 "
        "(each costs size, RAM and time).",
    )
    int16_within_db: float = Field(
        0.5,
        ge=0.0,
        le=60.0,
        description="Scheme mixed16: layers are raised to int16 until the worst output's SQNR against the float "
        "model, on the calibration rows, is within this many dB of whole-model int16's.",
    )

    @model_validator(mode="after")
    def _consistent_with_the_scheme(self) -> ConversionParameters:
        io = {self.input_type, self.output_type}
        scheme = self.scheme.value
        if self.scheme is QuantizationScheme.full_integer and TensorType.int16 in io:
            raise ValueError("int16 inputs and outputs need scheme int16x8 (--scheme int16x8)")
        if self.scheme is QuantizationScheme.int16x8 and not io <= {TensorType.float32, TensorType.int16}:
            raise ValueError("scheme int16x8 takes float32 or int16 inputs and outputs (--input-type/--output-type)")
        if self.scheme is QuantizationScheme.mixed16 and io != {TensorType.int8}:
            raise ValueError("scheme mixed16 writes int8 inputs and outputs: use --input-type int8 --output-type int8")
        if not self.scheme.calibrated:
            if io != {TensorType.float32}:
                raise ValueError(
                    f"scheme {scheme} keeps float activations: use --input-type float32 --output-type float32"
                )
            if self.ops is TargetOps.int8:
                raise ValueError(f"scheme {scheme} keeps float ops, which --ops int8 forbids: use --ops builtins")
        if self.percentile is not None and self.calibration_method is not CalibrationMethod.percentile:
            raise ValueError("--percentile applies to --calibration-method percentile")
        if self.calibration_method is not CalibrationMethod.minmax and self.scheme not in (
            QuantizationScheme.full_integer,
            QuantizationScheme.mixed16,
        ):
            raise ValueError(
                f"--calibration-method {self.calibration_method.value} chooses int8 activation ranges: use it with "
                "--scheme full_integer or mixed16"
            )
        chosen = [
            name for name, on in (("--equalize", self.equalize), ("--bias-correction", self.bias_correction)) if on
        ]
        if self.scheme is QuantizationScheme.float16 and chosen:
            verb, fix = ("prepares", chosen[0]) if len(chosen) == 1 else ("prepare", "them")
            raise ValueError(
                f"{' and '.join(chosen)} {verb} a model for int8 weights; scheme float16 has none: drop {fix}"
            )
        if self.scheme is QuantizationScheme.float16 and not self.per_channel:
            raise ValueError("per-tensor scales apply to integer weights; scheme float16 has none: drop --per-tensor")
        return self


class ValidationParameters(_Parameters):
    batch_size: int = Field(
        256,
        ge=1,
        le=65_536,
        description="Samples per float Keras prediction call, and per Interpreter invocation of a batch-dynamic "
        ".tflite (ptqflow's own files take one sample per call).",
        json_schema_extra={OPTION_NAME: "validation_batch_size"},
    )
    shard_rows: int = Field(
        4096,
        ge=1,
        le=1 << 24,
        description="Test rows per validation shard (rounded to whole prediction batches): a test split of more "
        "rows is predicted shard by shard (LiteRT, and TFLite Micro with --target tflm) on the flow's task runner, "
        "the workers of a Dask cluster with --dask-address, else this machine's threads; the report is the same "
        "either way.",
    )
    num_threads: int | None = Field(
        None, ge=1, le=256, description="Interpreter threads (default: the machine's CPU count)."
    )
    targets: tuple[DeviceTarget, ...] = Field(
        (DeviceTarget.litert,),
        min_length=1,
        description="Where the model will run, comma-separated: litert (the LiteRT Interpreter), tflm (TensorFlow "
        "Lite Micro: its interpreter runs the test split and its allocator measures the arena) and Ethos-U NPUs "
        "as Vela names them (ethos-u55-128, ethos-u65-256, ethos-u85-256, ...: Vela compiles the model). The gate "
        "and the device budgets judge each.",
        json_schema_extra={OPTION_NAME: "target"},
    )
    tflm_samples: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="With --target tflm: test rows TFLite Micro runs (a seeded draw; default: the whole test split). "
        "Its reference kernels run one sample at a time, far slower than LiteRT on large models.",
    )
    vela_system_config: str | None = Field(
        None,
        description="With an Ethos-U target: the system configuration of Vela's Arm/vela.ini (e.g. "
        "Ethos_U55_High_End_Embedded; default: Vela's for the accelerator). It sets the clocks and memory speeds.",
    )
    vela_memory_mode: str | None = Field(
        None,
        description="With an Ethos-U target: the memory mode of Vela's Arm/vela.ini (e.g. Shared_Sram, "
        "Dedicated_Sram; default: Vela's).",
    )

    @field_validator("targets", mode="before")
    @classmethod
    def _known_targets(cls, value: object) -> object:
        names = value.split(",") if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)):
            return value
        known = {t.value: t for t in DeviceTarget}
        chosen = []
        for name in names:
            key = name.value if isinstance(name, DeviceTarget) else str(name).strip().lower()
            if key not in known:
                raise ValueError(f"unknown target {key!r}: choose from {', '.join(known)}")
            if known[key] not in chosen:
                chosen.append(known[key])
        return tuple(chosen)

    @field_validator("vela_system_config", "vela_memory_mode")
    @classmethod
    def _a_vela_section(cls, value: str | None) -> str | None:
        if value is not None and not VELA_SECTION.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a section name of Vela's configuration file: letters, digits and _ (`vela "
                "--list-configs Arm/vela.ini` lists them)"
            )
        return value

    @model_validator(mode="after")
    def _vela_sections_together(self) -> ValidationParameters:
        if (self.vela_system_config is None) != (self.vela_memory_mode is None):
            raise ValueError(
                "give --vela-system-config and --vela-memory-mode together (Vela takes a configuration of its own "
                "only whole), or neither for Vela's defaults"
            )
        return self

    @property
    def npu_targets(self) -> tuple[DeviceTarget, ...]:
        return tuple(t for t in self.targets if t.npu)


class GateParameters(_Parameters):
    max_accuracy_drop: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        description="Largest accepted drop from float to quantized accuracy, in percentage points.",
    )
    promotion_tolerance: float = Field(
        0.0,
        ge=0.0,
        le=100.0,
        description="With an export: how many percentage points below the exported model (measured on the rows of "
        "this run's test split the exported model never trained on) a new model may be and still replace it.",
    )
    min_comparison_rows: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="With an export: fewest test rows unseen by the exported model to compare on; with fewer, the "
        "new model is not promoted automatically. Default: 100, or half the test split if that is smaller.",
    )

    max_error_increase: float = Field(
        5.0,
        ge=0.0,
        le=10_000.0,
        description="--task regression: largest accepted rise of the quantized model's MAE over the float model's, "
        "in percent of the float MAE.",
    )
    min_sqnr: float = Field(
        20.0,
        ge=-100.0,
        le=200.0,
        description="--task unlabeled: smallest accepted signal-to-quantization-noise ratio of the quantized outputs "
        "against the float model's, in dB.",
    )
    min_agreement: float = Field(
        0.98,
        ge=0.0,
        le=1.0,
        description="--task unlabeled, for class-score outputs: smallest accepted share of samples whose top-1 class "
        "is the float model's.",
    )

    max_unrunnable_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Largest share of test samples a .tflite may refuse to run (its kernels check the values: an int8 "
        "division whose divisor rounds to zero, for one); the figures are of the other samples. Above it the gate "
        "fails as unrunnable_samples.",
    )
    ram_budget: ByteSize | None = Field(
        None,
        description="Largest accepted RAM of the quantized model on each target, e.g. 256KiB: the tensor arena "
        "TFLite Micro's allocator needs (--target tflm), the SRAM Vela places for an Ethos-U, the arena planned for "
        "LiteRT (--target litert). The report has each figure.",
    )
    flash_budget: ByteSize | None = Field(
        None,
        description="Largest accepted flash of the quantized model on each target, e.g. 1MiB: the .tflite file "
        "(litert, tflm), or what Vela places in flash for an Ethos-U.",
    )
    min_npu_ops: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="With an Ethos-U target: smallest accepted share of the model's operators Vela places on the "
        "NPU (e.g. 1.0: every operator).",
    )

    @field_validator("ram_budget", "flash_budget", mode="before")
    @classmethod
    def _a_size(cls, value: object) -> object:
        if value is None:
            return value
        try:
            return TypeAdapter(ByteSize).validate_python(value)
        except ValidationError:
            raise ValueError(f"{value!r} is not a size: give bytes or a unit, e.g. 262144, 256KiB or 1MB") from None

    def thresholds_only(self) -> GateParameters:
        """These thresholds with the champion check's settings at their defaults: what repair is keyed on, so that
        a new promotion tolerance does not repeat a repair."""
        return GateParameters(
            max_accuracy_drop=self.max_accuracy_drop,
            max_error_increase=self.max_error_increase,
            min_sqnr=self.min_sqnr,
            min_agreement=self.min_agreement,
        )

    def comparison_rows_needed(self, test_rows: int) -> int:
        return self.min_comparison_rows if self.min_comparison_rows is not None else min(100, -(-test_rows // 2))


class RegistryParameters(_Parameters):
    """MLflow: where a run is recorded, and which registered model its promoted version joins (``flows.registry``)."""

    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI (http://host:5000, or MLFLOW_TRACKING_URI): each run is logged there, and a "
        "promoted one is registered with the champion alias. Credentials come from MLflow's own variables "
        "(MLFLOW_TRACKING_TOKEN, ...), never from the URI.",
        json_schema_extra={OPTION_ENVVAR: "MLFLOW_TRACKING_URI"},
    )
    registered_model: str | None = Field(
        None,
        description="The registered model's name. Default: ptqflow- and the data set's name.",
        max_length=200,
    )

    @field_validator("mlflow_uri")
    @classmethod
    def _no_secret(cls, value: str | None) -> str | None:
        return refuse_credentials(value, "--mlflow-uri")

    @field_validator("registered_model")
    @classmethod
    def _a_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", value):
            raise ValueError(f"{value!r} is not a model name: use letters, digits, '.', '_' and '-'")
        return value


class RepairKind(str, Enum):
    """What repair changes in the layers it picks: ``float`` keeps them in float (``--ops builtins``); ``int16``
    raises their activations to int16 (``--ops int8``: the model stays integer-only, scheme mixed16's search)."""

    float = "float"
    int16 = "int16"


class RepairParameters(_Parameters):
    enabled: bool | None = Field(
        None,
        description="When the gate fails on fidelity: with --ops builtins keep the worst layers in float (one more at "
        "a time) until the drop is within the gate; with --ops int8 and int8 I/O raise the layers that need it most to "
        "int16 activations (integer-only; --max-int16-fraction; the mixed extra). Default: on with --ops builtins, off "
        "with --ops int8.",
        json_schema_extra={OPTION_NAME: "repair"},
    )
    max_float_layers: int = Field(4, ge=1, le=64, description="Most layers repair may keep in float.")

    def kind(self, conversion: ConversionParameters) -> RepairKind | None:
        """How repair would mend a full-integer model under ``conversion``; None when it does not apply."""
        if conversion.scheme is not QuantizationScheme.full_integer:
            return None
        if conversion.ops is TargetOps.int8:  # no float layer allowed: int16 ones, asked for
            integer_io = {conversion.input_type, conversion.output_type} == {TensorType.int8}
            return RepairKind.int16 if self.enabled and integer_io else None
        enabled = self.enabled if self.enabled is not None else conversion.ops is TargetOps.builtins
        return RepairKind.float if enabled else None

    def applies_to(self, conversion: ConversionParameters) -> bool:
        return self.kind(conversion) is not None


class RankBy(str, Enum):
    """What the sweep ranks passing configurations by first; the other two break ties."""

    size = "size"
    latency = "latency"
    accuracy = "accuracy"


class SweepParameters(_Parameters):
    configurations: tuple[str, ...] | None = Field(
        None, description="Names of the configurations to run (default: the whole grid; `ptqflow sweep --list`)."
    )
    calibration_sizes: tuple[int, ...] = Field(
        (50, 200, 1000),
        min_length=1,
        description="Calibration sizes tried with full int8 (the base calibration size is always one of them).",
    )
    rank_by: RankBy | None = Field(
        None,
        description="size, latency or accuracy (the task's own metric: accuracy, MAE or SQNR): what the best "
        "configuration has. Default: size, or accuracy with --require-full-integer (the full-integer candidates "
        "ranked by fidelity).",
    )
    require_full_integer: bool = Field(
        False, description="Only a model with no float tensor (integer I/O too) can pass and be exported."
    )
    latency_threads: int = Field(
        1,
        ge=1,
        le=256,
        description="Interpreter threads when measuring latency: 1 keeps parallel workers from competing for cores.",
    )

    @property
    def ranking(self) -> RankBy:
        """What ``rank_by`` means when it is not given."""
        if self.rank_by is not None:
            return self.rank_by
        return RankBy.accuracy if self.require_full_integer else RankBy.size

    @field_validator("calibration_sizes")
    @classmethod
    def _positive_sizes(cls, sizes: tuple[int, ...]) -> tuple[int, ...]:
        if any(size < 1 for size in sizes):
            raise ValueError("calibration sizes must be positive integers, e.g. 50,200,1000")
        return tuple(sorted(set(sizes)))
