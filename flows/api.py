"""The Python API, ``ptqflow.run(...)`` and ``ptqflow.sweep(...)``: the command line's options as keyword arguments
(Python names and values), returning the typed summary. The CLI builds its parameters here too.

    >>> import ptqflow
    >>> summary = ptqflow.run(epochs=3, store="./ptqflow-store")
    >>> summary.status, summary.metrics.quantized_accuracy
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ptqflow.flows.options import (
    FLOW_SETTINGS,
    RUN_GROUPS,
    SWEEP_GROUPS,
    InvalidOption,
    group_parameters,
    read_recipe,
)
from ptqflow.storage.store import DEFAULT_STORE

__all__ = ["InvalidOption", "pipeline_arguments", "run", "sweep", "sweep_arguments"]

# The flows' own settings when not given.
FLOW_DEFAULTS: dict[str, Any] = {"store": DEFAULT_STORE, "seed": 0, "export": None}

if TYPE_CHECKING:
    from ptqflow.tasks.release.outcome import RunSummary, SweepSummary


def with_recipe(config: str | None, groups: Mapping[str, type[BaseModel]], given: Mapping[str, Any]) -> dict[str, Any]:
    """The options ``given`` over those of the recipe file ``config`` (a value given as None is not given)."""
    recipe = read_recipe(config, groups) if config else {}
    return {**recipe, **{name: value for name, value in given.items() if value is not None}}


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


def pipeline_arguments(*, config: str | None = None, **options: Any) -> dict[str, Any]:
    """The ptq-pipeline flow's arguments from ``ptqflow run``'s options: ``store``, ``seed``, ``export``,
    ``storage_block``, ``export_block`` and every field of the flow's parameter models by its option name
    (``flows.options.RUN_GROUPS``); ``config``: a recipe file (TOML or YAML) whose values these override.

    Raises:
        InvalidOption: an option is unknown, or its value is refused.
    """
    given = with_recipe(config, RUN_GROUPS, options)
    settings = {name: given.pop(name) for name in FLOW_SETTINGS if name in given}
    return {**FLOW_DEFAULTS, **settings, **group_parameters(RUN_GROUPS, given)}


def run(*, dask_address: str | None = None, **options: Any) -> RunSummary:
    """Sample, train, calibrate, convert and validate, as ``ptqflow run`` does, with its options as keyword
    arguments (``pipeline_arguments``); ``dask_address``: a Dask scheduler whose workers predict the test split
    shard by shard. The summary's ``status`` is 'passed', 'failed' (the accuracy gate) or 'not_validated'.

    Raises:
        InvalidOption: an option's value is refused (before anything runs).
        PtqflowError: the data, the model or the conversion cannot be used; the message says how to fix it.
    """
    from ptqflow.flows.pipeline import ptq_pipeline

    arguments = pipeline_arguments(**options)
    prefect_defaults()
    if not dask_address:
        summary: RunSummary = finished(ptq_pipeline(**arguments, return_state=True))
        return summary
    from ptqflow.flows.cluster import pipeline_task_runner, shared_prefect_api

    with shared_prefect_api():
        flow = ptq_pipeline.with_options(task_runner=pipeline_task_runner(dask_address))
        sharded: RunSummary = finished(flow(**arguments, return_state=True))
    return sharded


def sweep_arguments(*, config: str | None = None, **options: Any) -> dict[str, Any]:
    """The ptq-sweep flow's arguments from ``ptqflow sweep``'s options (``flows.options.SWEEP_GROUPS``), as
    ``pipeline_arguments``.

    Raises:
        InvalidOption: an option is unknown, or its value is refused.
        PtqflowError: a configuration name is not in the grid.
    """
    from ptqflow.tasks.sweep.grid import select_configurations, sweep_grid

    given = with_recipe(config, SWEEP_GROUPS, options)
    settings = {name: given.pop(name) for name in FLOW_SETTINGS if name in given}
    arguments = {**FLOW_DEFAULTS, **settings, **group_parameters(SWEEP_GROUPS, given)}
    # An unknown configuration name is refused before a cluster starts.
    sweep = arguments["sweep"]
    select_configurations(
        sweep_grid(arguments["calibration"].calibration_size, sweep.calibration_sizes), sweep.configurations
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
    from ptqflow.flows.cluster import shared_prefect_api
    from ptqflow.flows.sweep import ptq_sweep

    arguments = sweep_arguments(**options)
    prefect_defaults()
    runner = sweep_task_runner(dask_address, workers, in_process)
    with shared_prefect_api():
        summary: SweepSummary = finished(ptq_sweep.with_options(task_runner=runner)(**arguments, return_state=True))
    return summary


def sweep_task_runner(dask_address: str | None, workers: int, in_process: bool) -> Any:
    """Where the sweep's stages run: one at a time in this process, or on Dask (``flows.cluster.dask_task_runner``)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from ptqflow.flows.cluster import dask_task_runner

    return ThreadPoolTaskRunner(max_workers=1) if in_process else dask_task_runner(dask_address, workers)
