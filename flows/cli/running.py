"""The commands that run a flow: ``run``, ``sweep``, and ``serve`` (the pipeline on a schedule)."""

from __future__ import annotations

from contextlib import nullcontext
from datetime import timedelta
from typing import Annotated, Any

import typer
from rich.console import Console

from ptqflow.flows.api import pipeline_arguments, sweep_arguments, sweep_task_runner
from ptqflow.flows.cli.common import (
    EXIT_INVALID_INPUT,
    err_console,
    fail,
    import_tensorflow_quietly,
    live_progress,
    outcome,
    prepare_environment,
    refused_options,
    stdout_to_stderr,
)
from ptqflow.flows.cli.options import (
    RUN_OPTIONS,
    SWEEP_OPTIONS,
    ConfigOption,
    ExportOption,
    JsonOption,
    RunStoreOption,
    SeedOption,
    VerboseOption,
    api_values,
    credentials,
    takes,
)
from ptqflow.flows.options import RUN_GROUPS, SWEEP_GROUPS


@takes(RUN_OPTIONS, credentials)
def run(
    config: ConfigOption = None,
    store: RunStoreOption = None,
    seed: SeedOption = None,
    export: ExportOption = None,
    dask_address: Annotated[
        str | None,
        typer.Option(
            envvar="PTQFLOW_DASK_ADDRESS",
            help="Address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786: its workers predict the test "
            "split shard by shard (--shard-rows each). [default: this process's threads]",
        ),
    ] = None,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
    *,
    options: dict[str, Any],
    credentials: dict[str, Any],
) -> None:
    """Sample, train, calibrate, convert and validate; exit 0 only when the accuracy gate passes."""
    with refused_options(as_json):
        arguments = pipeline_arguments(
            config=config,
            store=store,
            export=export,
            seed=seed,
            **credentials,
            **api_values(options, RUN_GROUPS, as_json),
        )
    prepare_environment(verbose)
    if dask_address:
        check_dask_scheduler(dask_address, as_json, "to predict in this process")
    from ptqflow.flows.cluster import pipeline_task_runner, shared_prefect_api

    live = not as_json and err_console.is_terminal
    # A cold run's fixed costs: Prefect's temporary server starts while TensorFlow imports.
    with shared_prefect_api(meanwhile=lambda: import_tensorflow_quietly(verbose), exiting_after=True):
        from ptqflow.flows.pipeline import ptq_pipeline
        from ptqflow.tasks.views.render import print_run_summary

        flow = ptq_pipeline
        if dask_address:
            flow = ptq_pipeline.with_options(task_runner=pipeline_task_runner(dask_address))
        with stdout_to_stderr() if as_json else nullcontext(), live_progress() if live else nullcontext():
            state = flow(**arguments, return_state=True)
    summary, code = outcome(state, as_json)
    if as_json:
        print(summary.model_dump_json())
    else:
        print_run_summary(summary, Console())
    raise typer.Exit(code)


def check_dask_scheduler(address: str, as_json: bool, without: str) -> None:
    """Fail now, with the fix, rather than after sampling and training, when the scheduler cannot be reached."""
    from distributed import Client

    try:
        with Client(address, timeout=10):
            pass
    except (OSError, TimeoutError, ValueError) as error:
        fail(
            f"cannot reach the Dask scheduler at {address} ({type(error).__name__}): start it, check the address "
            f"(e.g. tcp://10.0.0.5:8786), or leave out --dask-address {without}",
            EXIT_INVALID_INPUT,
            as_json,
        )


@takes(SWEEP_OPTIONS, credentials)
def sweep(
    config: ConfigOption = None,
    store: RunStoreOption = None,
    seed: SeedOption = None,
    export: Annotated[
        str | None,
        typer.Option(envvar="PTQFLOW_EXPORT", help="fsspec URL to publish the best passing configuration to."),
    ] = None,
    dask_address: Annotated[
        str | None,
        typer.Option(
            envvar="PTQFLOW_DASK_ADDRESS",
            help="Address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786. [default: a LocalCluster]",
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="Worker processes of the LocalCluster.", min=1)] = 2,
    in_process: Annotated[
        bool, typer.Option("--in-process", help="No Dask: run the configurations one at a time in this process.")
    ] = False,
    list_configurations: Annotated[
        bool, typer.Option("--list", help="Print the configurations of the grid and exit.")
    ] = False,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
    *,
    options: dict[str, Any],
    credentials: dict[str, Any],
) -> None:
    """Convert one trained model under a grid of quantization configurations on Dask, rank them (accuracy drop,
    size, latency), validate the best in full and optionally export it; exit 0 when a configuration passes."""
    prepare_environment(verbose)  # before anything imports Prefect, which reads its logging settings once
    from ptqflow.tasks.core.errors import PtqflowError
    from ptqflow.tasks.sweep.grid import select_configurations, sweep_grid

    with refused_options(as_json):
        try:
            arguments = sweep_arguments(
                config=config,
                store=store,
                seed=seed,
                export=export,
                **credentials,
                **api_values(options, SWEEP_GROUPS, as_json),
            )
        except PtqflowError as error:
            fail(str(error), EXIT_INVALID_INPUT, as_json)
    if list_configurations:
        grid = sweep_grid(arguments["calibration"].calibration_size, arguments["sweep"].calibration_sizes)
        chosen = select_configurations(grid, arguments["sweep"].configurations)
        width = max((len(configuration.name) for configuration in chosen), default=0)
        for configuration in chosen:
            size = f", {configuration.calibration_size} calibration samples" if configuration.calibration_size else ""
            print(f"{configuration.name:<{width}}  {configuration.description}{size}")
        return

    if dask_address and not in_process:
        check_dask_scheduler(dask_address, as_json, "to use a local cluster")
    from ptqflow.flows.cluster import shared_prefect_api

    live = not as_json and err_console.is_terminal
    with (
        shared_prefect_api(meanwhile=lambda: import_tensorflow_quietly(verbose), exiting_after=True),
        stdout_to_stderr() if as_json else nullcontext(),
        live_progress() if live else nullcontext(),
    ):
        from ptqflow.flows.sweep import ptq_sweep
        from ptqflow.tasks.views.render import print_sweep_summary

        runner = sweep_task_runner(dask_address, workers, in_process)
        state = ptq_sweep.with_options(task_runner=runner)(**arguments, return_state=True)
    summary, code = outcome(state, as_json)
    if as_json:
        print(summary.model_dump_json())
    else:
        print_sweep_summary(summary, Console(width=None if Console().is_terminal else 160))
    raise typer.Exit(code)


@takes(RUN_OPTIONS, credentials)
def serve(
    cron: Annotated[
        str | None, typer.Option(help="Cron schedule (server time zone UTC unless --timezone), e.g. '0 2 * * *'.")
    ] = "0 2 * * *",
    interval: Annotated[
        float | None, typer.Option(help="Run every this many seconds instead of on the cron schedule.", min=1)
    ] = None,
    timezone: Annotated[str, typer.Option(help="IANA time zone of the cron schedule.")] = "UTC",
    name: Annotated[str, typer.Option(help="Deployment name (the flow is ptq-pipeline).")] = "nightly",
    config: ConfigOption = None,
    store: RunStoreOption = None,
    seed: SeedOption = None,
    export: ExportOption = None,
    limit: Annotated[int, typer.Option(help="Most runs this process executes at once.", min=1)] = 1,
    dask_address: Annotated[
        str | None,
        typer.Option(
            envvar="PTQFLOW_DASK_ADDRESS",
            help="Address of an existing Dask scheduler whose workers predict each run's test split shard by shard. "
            "[default: the run's threads]",
        ),
    ] = None,
    on_event: Annotated[
        list[str] | None,
        typer.Option(
            help="Also run when this Prefect event arrives (repeatable), e.g. ptqflow.data.arrived, emitted with "
            "`prefect event emit ptqflow.data.arrived --resource-id ptqflow.dataset.URL`."
        ),
    ] = None,
    *,
    options: dict[str, Any],
    credentials: dict[str, Any],
) -> None:
    """Serve the ptq-pipeline flow on a schedule from this process (no work pool needed): it also runs what is
    triggered from the Prefect UI ("Run" on the deployment), whose form starts from these options. Stop with
    Ctrl-C."""
    with refused_options(as_json=False):
        arguments = pipeline_arguments(
            config=config,
            store=store,
            export=export,
            seed=seed,
            **credentials,
            **api_values(options, RUN_GROUPS, False),
        )
    parameters = {k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for k, v in arguments.items()}
    prepare_environment(verbose=True)
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from prefect.events import DeploymentEventTrigger, DeploymentTriggerTypes, TriggerTypes
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        fail(
            "serving needs a Prefect server that outlives this process: start one (prefect server start) and set "
            "PREFECT_API_URL, e.g. http://127.0.0.1:4200/api, or log in to Prefect Cloud",
            EXIT_INVALID_INPUT,
            as_json=False,
        )

    if dask_address:
        check_dask_scheduler(dask_address, False, "to predict in the run's process")
    from ptqflow.flows.cluster import pipeline_task_runner
    from ptqflow.flows.pipeline import ptq_pipeline

    try:
        schedule = (
            IntervalSchedule(interval=timedelta(seconds=interval))
            if interval
            else CronSchedule(cron=cron, timezone=timezone)
        )
    except ValueError as error:
        fail(f"invalid schedule: {str(error).splitlines()[-1]}", EXIT_INVALID_INPUT, as_json=False)
    triggers: list[DeploymentTriggerTypes | TriggerTypes] = [
        DeploymentEventTrigger(expect={event}, posture="Reactive", threshold=1) for event in on_event or ()
    ]
    flow = ptq_pipeline.with_options(task_runner=pipeline_task_runner(dask_address)) if dask_address else ptq_pipeline
    flow.serve(
        name=name,
        schedules=[schedule],
        triggers=triggers,
        parameters=parameters,
        limit=limit,
        print_starting_message=True,
    )
