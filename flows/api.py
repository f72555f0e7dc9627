"""The Python API, ``ptqflow.run(...)`` and ``ptqflow.sweep(...)``: the command line's options as keyword arguments
(Python names and values), returning the typed summary. The CLI builds its parameters here too.

    >>> import ptqflow
    >>> summary = ptqflow.run(epochs=3, store="./ptqflow-store")
    >>> summary.status, summary.metrics.quantized_accuracy
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import date
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from ptqflow.storage.store import DEFAULT_STORE, hold_signed_url
from ptqflow.tasks.core.parameters import (
    CalibrationMethod,
    CalibrationParameters,
    ColorMode,
    ConversionParameters,
    GateParameters,
    ModelTask,
    QuantizationScheme,
    RankBy,
    RegistryParameters,
    RepairParameters,
    SamplingParameters,
    SplitMode,
    SweepParameters,
    TargetOps,
    TensorType,
    TrainingParameters,
)

if TYPE_CHECKING:
    from ptqflow.tasks.release.outcome import RunSummary, SweepSummary

Model = TypeVar("Model", bound=BaseModel)


class InvalidOption(ValueError):
    """An option's value is refused; the message names the option as the command line spells it, and the fix."""


def parameters(schema: type[Model], **given: Any) -> Model:
    """``schema`` from the options given (None means "the default").

    Raises:
        InvalidOption: the first field the schema refuses, as ``--option-name``, with the schema's reason.
    """
    try:
        return schema(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as error:
        first = error.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        what = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "options"
        raise InvalidOption(f"invalid {what}: {message}") from None


def upstream_parameters(
    *,
    dataset: str | None = None,
    task: ModelTask | None = None,
    feature_column: str | None = None,
    feature_columns: str | None = None,
    label_column: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    image_size: tuple[int, int] | None = None,
    color_mode: ColorMode | None = None,
    splits: SplitMode | None = None,
    sample_size: int | None = None,
    since: date | None = None,
    window_days: int | None = None,
    epochs: int | None = None,
    model: str | None = None,
    model_url: str | None = None,
    input_scale: float | Sequence[float] | None = None,
    input_offset: float | Sequence[float] | None = None,
    calibration_size: int | None = None,
    calibration_source: str | None = None,
) -> dict[str, Any]:
    """The sampling, training and calibration parameters that ``run`` and ``sweep`` both take.

    A signed URL (presigned S3, signed GCS, Azure SAS) enters them redacted: Prefect records parameters, and the
    manifests, logs and exports repeat them; only the reader gets the secret back (storage.store)."""
    dataset, model_url, calibration_source = (
        hold_signed_url(url) if url else url for url in (dataset, model_url, calibration_source)
    )
    return {
        "sampling": parameters(
            SamplingParameters,
            dataset=dataset,
            task=task,
            feature_column=feature_column,
            feature_columns=feature_columns,
            label_column=label_column,
            input_shape=input_shape,
            image_size=image_size,
            color_mode=color_mode,
            splits=splits,
            sample_size=sample_size,
            since=since,
            window_days=window_days,
        ),
        "training": parameters(
            TrainingParameters,
            epochs=epochs,
            model=model,
            model_url=model_url,
            input_scale=input_scale,
            input_offset=input_offset,
        ),
        "calibration": parameters(
            CalibrationParameters, calibration_size=calibration_size, calibration_source=calibration_source
        ),
    }


def gate_parameters(options: Mapping[str, Any]) -> GateParameters:
    """The gate's parameters from the options given by name (the others are not the gate's; None means the
    default)."""
    return parameters(GateParameters, **{name: options.get(name) for name in GateParameters.model_fields})


def prefect_defaults() -> None:
    # A fresh PREFECT_HOME's ephemeral server takes ~25 s to start on a small machine, past Prefect's 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def finished(state: Any) -> Any:
    """A finished flow run's summary, passed or failed at the gate; any other failure is raised."""
    from ptqflow.tasks.core.errors import AccuracyGateFailed

    if state.is_completed():
        return state.result()
    error = state.result(raise_on_failure=False)
    if isinstance(error, AccuracyGateFailed) and error.summary is not None:
        return error.summary
    raise error


def pipeline_arguments(
    *,
    store: str = DEFAULT_STORE,
    seed: int = 0,
    export: str | None = None,
    input_type: TensorType | None = None,
    output_type: TensorType | None = None,
    ops: TargetOps | None = None,
    scheme: QuantizationScheme | None = None,
    per_channel: bool | None = None,
    calibration_method: CalibrationMethod | None = None,
    percentile: float | None = None,
    equalize: bool | None = None,
    bias_correction: bool | None = None,
    max_accuracy_drop: float | None = None,
    promotion_tolerance: float | None = None,
    min_comparison_rows: int | None = None,
    max_error_increase: float | None = None,
    min_sqnr: float | None = None,
    min_agreement: float | None = None,
    ram_budget: str | int | None = None,
    flash_budget: str | int | None = None,
    repair: bool | None = None,
    max_float_layers: int | None = None,
    storage_block: str | None = None,
    export_block: str | None = None,
    mlflow_uri: str | None = None,
    registered_model: str | None = None,
    **upstream: Any,
) -> dict[str, Any]:
    """The ptq-pipeline flow's arguments from ``ptqflow run``'s options (``upstream``: those of
    ``upstream_parameters``).

    Raises:
        InvalidOption: an option's value is refused.
    """
    options = dict(locals())  # every option by name, as given (first statement: nothing else is local yet)
    return dict(
        store=store,
        seed=seed,
        export=export,
        storage_block=storage_block,
        export_block=export_block,
        registry=parameters(RegistryParameters, mlflow_uri=mlflow_uri, registered_model=registered_model),
        **upstream_parameters(**upstream),
        conversion=parameters(
            ConversionParameters,
            input_type=input_type,
            output_type=output_type,
            ops=ops,
            scheme=scheme,
            per_channel=per_channel,
            calibration_method=calibration_method,
            percentile=percentile,
            equalize=equalize,
            bias_correction=bias_correction,
        ),
        gate=gate_parameters(options),
        repair=parameters(RepairParameters, enabled=repair, max_float_layers=max_float_layers),
    )


def run(**options: Any) -> RunSummary:
    """Sample, train, calibrate, convert and validate, as ``ptqflow run`` does, with its options as keyword
    arguments (``pipeline_arguments``). The summary's ``status`` is 'passed', 'failed' (the accuracy gate) or
    'not_validated'.

    Raises:
        InvalidOption: an option's value is refused (before anything runs).
        PtqflowError: the data, the model or the conversion cannot be used; the message says how to fix it.
    """
    from ptqflow.flows.pipeline import ptq_pipeline

    arguments = pipeline_arguments(**options)
    prefect_defaults()
    summary: RunSummary = finished(ptq_pipeline(**arguments, return_state=True))
    return summary


def sweep_arguments(
    *,
    store: str = DEFAULT_STORE,
    seed: int = 0,
    export: str | None = None,
    calibration_sizes: tuple[int, ...] | None = None,
    configurations: tuple[str, ...] | None = None,
    rank_by: RankBy | None = None,
    require_full_integer: bool = False,
    latency_threads: int | None = None,
    max_accuracy_drop: float | None = None,
    promotion_tolerance: float | None = None,
    min_comparison_rows: int | None = None,
    max_error_increase: float | None = None,
    min_sqnr: float | None = None,
    min_agreement: float | None = None,
    ram_budget: str | int | None = None,
    flash_budget: str | int | None = None,
    storage_block: str | None = None,
    export_block: str | None = None,
    mlflow_uri: str | None = None,
    registered_model: str | None = None,
    **upstream: Any,
) -> dict[str, Any]:
    """The ptq-sweep flow's arguments from ``ptqflow sweep``'s options.

    Raises:
        InvalidOption: an option's value is refused.
        PtqflowError: a configuration name is not in the grid.
    """
    options = dict(locals())  # every option by name, as given (first statement: nothing else is local yet)
    from ptqflow.tasks.sweep.grid import select_configurations, sweep_grid

    arguments = dict(
        store=store,
        seed=seed,
        storage_block=storage_block,
        export_block=export_block,
        registry=parameters(RegistryParameters, mlflow_uri=mlflow_uri, registered_model=registered_model),
        export=export,
        **upstream_parameters(**upstream),
        sweep=parameters(
            SweepParameters,
            calibration_sizes=calibration_sizes,
            configurations=configurations,
            rank_by=rank_by,
            require_full_integer=require_full_integer,
            latency_threads=latency_threads,
        ),
        gate=gate_parameters(options),
    )
    # An unknown configuration name is refused before a cluster starts.
    select_configurations(
        sweep_grid(arguments["calibration"].calibration_size, arguments["sweep"].calibration_sizes), configurations
    )
    return arguments


def sweep(
    *, dask_address: str | None = None, workers: int = 2, in_process: bool = False, **options: Any
) -> SweepSummary:
    """Convert one trained model under a grid of quantization configurations and rank them, as ``ptqflow sweep``
    does (``sweep_arguments``): on a Dask LocalCluster of ``workers`` processes, the cluster at ``dask_address``,
    or one configuration at a time ``in_process``.

    Raises:
        InvalidOption: an option's value is refused (before anything runs).
        PtqflowError: the data, the model or a configuration name cannot be used.
    """
    from ptqflow.flows.sweep import ptq_sweep, shared_prefect_api

    arguments = sweep_arguments(**options)
    prefect_defaults()
    runner = sweep_task_runner(dask_address, workers, in_process)
    with shared_prefect_api():
        summary: SweepSummary = finished(ptq_sweep.with_options(task_runner=runner)(**arguments, return_state=True))
    return summary


def sweep_task_runner(dask_address: str | None, workers: int, in_process: bool) -> Any:
    """Where the sweep's stages run: one at a time in this process, or on Dask (``flows.sweep.dask_task_runner``)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from ptqflow.flows.sweep import dask_task_runner

    return ThreadPoolTaskRunner(max_workers=1) if in_process else dask_task_runner(dask_address, workers)
