"""Every option of the ``ptqflow`` commands, defined once: help texts come from the parameter models' field
descriptions, and the commands that run a flow take whole groups of options (``takes``), so ``run``, ``sweep``
and ``serve`` cannot drift apart."""

# No `from __future__ import annotations`: Typer reads these annotations from the commands' signatures.
import functools
import inspect
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel

from ptqflow.tasks.core.parameters import (
    CalibrationMethod,
    CalibrationParameters,
    ColorMode,
    ConversionParameters,
    GateParameters,
    ModelTask,
    QuantizationScheme,
    RegistryParameters,
    RepairParameters,
    SamplingParameters,
    SplitMode,
    TargetOps,
    TensorType,
    TrainingParameters,
)

Command = TypeVar("Command", bound=Callable[..., Any])


def help_for(schema: type[BaseModel], field: str) -> str:
    info = schema.model_fields[field]
    return f"{info.description} \\[default: {getattr(info.default, 'value', info.default)}]"


DatasetOption = Annotated[str | None, typer.Option(help=help_for(SamplingParameters, "dataset"))]
FeatureColumnOption = Annotated[str | None, typer.Option(help=help_for(SamplingParameters, "feature_column"))]
FeatureColumnsOption = Annotated[str | None, typer.Option(help=help_for(SamplingParameters, "feature_columns"))]
TaskOption = Annotated[ModelTask | None, typer.Option(help=help_for(SamplingParameters, "task"))]
LabelColumnOption = Annotated[str | None, typer.Option(help=help_for(SamplingParameters, "label_column"))]
InputShapeOption = Annotated[
    str | None, typer.Option(help="Shape of one sample when the table does not carry it, e.g. 32,32,3.")
]
ImageSizeOption = Annotated[str | None, typer.Option(help=help_for(SamplingParameters, "image_size"))]
ColorModeOption = Annotated[ColorMode | None, typer.Option(help=help_for(SamplingParameters, "color_mode"))]
SplitsOption = Annotated[SplitMode | None, typer.Option(help=help_for(SamplingParameters, "splits"))]
SampleSizeOption = Annotated[int | None, typer.Option(help=help_for(SamplingParameters, "sample_size"))]
SinceOption = Annotated[datetime | None, typer.Option(formats=["%Y-%m-%d"], help=help_for(SamplingParameters, "since"))]
WindowDaysOption = Annotated[int | None, typer.Option(help=help_for(SamplingParameters, "window_days"))]
ModelOption = Annotated[str | None, typer.Option(help=help_for(TrainingParameters, "model"))]
ModelUrlOption = Annotated[str | None, typer.Option(help=help_for(TrainingParameters, "model_url"))]
# Numbers separated by commas (one per input of a model with several): TrainingParameters reads them.
InputScaleOption = Annotated[str | None, typer.Option(help=help_for(TrainingParameters, "input_scale"))]
InputOffsetOption = Annotated[str | None, typer.Option(help=help_for(TrainingParameters, "input_offset"))]
RunStoreOption = Annotated[
    str,
    typer.Option(envvar="PTQFLOW_STORE", help="fsspec URL of the artifact store (folder, s3://bucket/prefix, ...)."),
]
SeedOption = Annotated[int, typer.Option(help="Seed for sampling, training and calibration.")]
EpochsOption = Annotated[int | None, typer.Option(help=help_for(TrainingParameters, "epochs"))]
CalibrationSizeOption = Annotated[int | None, typer.Option(help=help_for(CalibrationParameters, "calibration_size"))]
CalibrationSourceOption = Annotated[
    str | None, typer.Option(help=help_for(CalibrationParameters, "calibration_source"))
]
MaxAccuracyDropOption = Annotated[float | None, typer.Option(help=help_for(GateParameters, "max_accuracy_drop"))]
PromotionToleranceOption = Annotated[float | None, typer.Option(help=help_for(GateParameters, "promotion_tolerance"))]
MinComparisonRowsOption = Annotated[int | None, typer.Option(help=help_for(GateParameters, "min_comparison_rows"))]
MaxErrorIncreaseOption = Annotated[float | None, typer.Option(help=help_for(GateParameters, "max_error_increase"))]
MinSqnrOption = Annotated[float | None, typer.Option(help=help_for(GateParameters, "min_sqnr"))]
MinAgreementOption = Annotated[float | None, typer.Option(help=help_for(GateParameters, "min_agreement"))]
RamBudgetOption = Annotated[str | None, typer.Option(help=help_for(GateParameters, "ram_budget"))]
FlashBudgetOption = Annotated[str | None, typer.Option(help=help_for(GateParameters, "flash_budget"))]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="Show Prefect's and TensorFlow's logs on the console.")
]


StoreOption = Annotated[str, typer.Option(envvar="PTQFLOW_STORE", help="fsspec URL of the artifact store.")]
ExportOption = Annotated[
    str | None,
    typer.Option(
        envvar="PTQFLOW_EXPORT",
        help="fsspec URL to publish a passing run to: a new version folder, verified, then latest.json.",
    ),
]
RequiredExportOption = Annotated[str, typer.Option(envvar="PTQFLOW_EXPORT", help="fsspec URL of the export.")]
LockWaitOption = Annotated[
    float,
    typer.Option(
        "--wait",
        min=0,
        help="Seconds to wait for a run that is using the export (it holds the export's lock while it runs); then "
        "give up.",
    ),
]


# Option groups: a command decorated with ``takes(GROUP, ...)`` has every option of each group and receives them
# as one dict per group, keyed by the group's name. The functions only carry the signatures.
def upstream(
    dataset: DatasetOption = None,
    task: TaskOption = None,
    feature_column: FeatureColumnOption = None,
    feature_columns: FeatureColumnsOption = None,
    label_column: LabelColumnOption = None,
    input_shape: InputShapeOption = None,
    image_size: ImageSizeOption = None,
    color_mode: ColorModeOption = None,
    splits: SplitsOption = None,
    sample_size: SampleSizeOption = None,
    since: SinceOption = None,
    window_days: WindowDaysOption = None,
    model: ModelOption = None,
    model_url: ModelUrlOption = None,
    input_scale: InputScaleOption = None,
    input_offset: InputOffsetOption = None,
    epochs: EpochsOption = None,
    calibration_size: CalibrationSizeOption = None,
    calibration_source: CalibrationSourceOption = None,
) -> None:
    """Sampling, training and calibration: what every conversion starts from."""


def conversion(
    input_type: Annotated[TensorType | None, typer.Option(help=help_for(ConversionParameters, "input_type"))] = None,
    output_type: Annotated[TensorType | None, typer.Option(help=help_for(ConversionParameters, "output_type"))] = None,
    ops: Annotated[TargetOps | None, typer.Option(help=help_for(ConversionParameters, "ops"))] = None,
    scheme: Annotated[QuantizationScheme | None, typer.Option(help=help_for(ConversionParameters, "scheme"))] = None,
    per_channel: Annotated[
        bool | None,
        typer.Option("--per-channel/--per-tensor", help=help_for(ConversionParameters, "per_channel")),
    ] = None,
    calibration_method: Annotated[
        CalibrationMethod | None, typer.Option(help=help_for(ConversionParameters, "calibration_method"))
    ] = None,
    percentile: Annotated[float | None, typer.Option(help=help_for(ConversionParameters, "percentile"))] = None,
    equalize: Annotated[
        bool | None, typer.Option("--equalize/--no-equalize", help=help_for(ConversionParameters, "equalize"))
    ] = None,
    bias_correction: Annotated[
        bool | None,
        typer.Option("--bias-correction/--no-bias-correction", help=help_for(ConversionParameters, "bias_correction")),
    ] = None,
    repair: Annotated[
        bool | None,
        typer.Option(
            "--repair/--no-repair", help=help_for(RepairParameters, "enabled") + " [default: on with --ops builtins]"
        ),
    ] = None,
    max_float_layers: Annotated[int | None, typer.Option(help=help_for(RepairParameters, "max_float_layers"))] = None,
) -> None:
    """One conversion, and the repair of a model that fails the gate."""


def gate(
    max_accuracy_drop: MaxAccuracyDropOption = None,
    promotion_tolerance: PromotionToleranceOption = None,
    min_comparison_rows: MinComparisonRowsOption = None,
    max_error_increase: MaxErrorIncreaseOption = None,
    min_sqnr: MinSqnrOption = None,
    min_agreement: MinAgreementOption = None,
    ram_budget: RamBudgetOption = None,
    flash_budget: FlashBudgetOption = None,
) -> None:
    """The gate (by task), the device budgets and the champion check."""


def credentials(
    storage_block: Annotated[
        str | None,
        typer.Option(
            help="Prefect block holding the store's credentials: a Secret block's name (JSON of fsspec storage "
            "options), or with prefect-aws aws-credentials/NAME or s3-bucket/NAME. Its values are never printed or "
            "stored."
        ),
    ] = None,
    export_block: Annotated[
        str | None, typer.Option(help="Prefect block holding the export target's credentials (as --storage-block).")
    ] = None,
) -> None:
    """Credentials from Prefect blocks, by name."""


MlflowUriOption = Annotated[
    str | None, typer.Option(envvar="MLFLOW_TRACKING_URI", help=help_for(RegistryParameters, "mlflow_uri"))
]
RegisteredModelOption = Annotated[str | None, typer.Option(help=help_for(RegistryParameters, "registered_model"))]


def registry(mlflow_uri: MlflowUriOption = None, registered_model: RegisteredModelOption = None) -> None:
    """MLflow: where runs are recorded and the champion registered."""


def takes(*groups: Callable[..., None]) -> Callable[[Command], Command]:
    """Give a command every option of ``groups``; it is called with one keyword argument per group (named after
    the group) holding that group's options as given."""
    grouped = {group.__name__: inspect.signature(group).parameters for group in groups}

    def decorate(command: Command) -> Command:
        own = [p for name, p in inspect.signature(command, eval_str=True).parameters.items() if name not in grouped]
        shared = [p for parameters in grouped.values() for p in parameters.values()]

        @functools.wraps(command)
        def with_groups(**given: Any) -> Any:
            groups_given = {name: {n: given.pop(n) for n in parameters} for name, parameters in grouped.items()}
            return command(**given, **groups_given)

        del with_groups.__wrapped__  # Typer must read the signature below, not the command's own
        signature = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in [*own, *shared]])
        with_groups.__signature__ = signature  # type: ignore[attr-defined]
        with_groups.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        return with_groups  # type: ignore[return-value]

    return decorate
