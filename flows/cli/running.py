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
    shape,
    sizes,
    stdout_to_stderr,
)
from ptqflow.flows.cli.options import (
    ExportOption,
    JsonOption,
    RunStoreOption,
    SeedOption,
    StoreOption,
    VerboseOption,
    conversion,
    credentials,
    gate,
    help_for,
    registry,
    takes,
    upstream,
)
from ptqflow.tasks.core.parameters import RankBy, SweepParameters


def _upstream_arguments(given: dict[str, Any], as_json: bool) -> dict[str, Any]:
    """The upstream options as the API takes them (a shape as a tuple, a day as a date)."""
    return {
        **given,
        "input_shape": shape(given["input_shape"], as_json),
        "image_size": shape(given["image_size"], as_json, "--image-size", "64,64"),
        "since": given["since"].date() if given["since"] else None,
    }


@takes(upstream, conversion, gate, credentials, registry)
def run(
    store: RunStoreOption = "./ptqflow-store",
    seed: SeedOption = 0,
    export: ExportOption = None,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
    *,
    upstream: dict[str, Any],
    conversion: dict[str, Any],
    gate: dict[str, Any],
    credentials: dict[str, Any],
    registry: dict[str, Any],
) -> None:
    """Sample, train, calibrate, convert and validate; exit 0 only when the accuracy gate passes."""
    with refused_options(as_json):
        arguments = pipeline_arguments(
            store=store,
            export=export,
            seed=seed,
            **conversion,
            **gate,
            **credentials,
            **registry,
            **_upstream_arguments(upstream, as_json),
        )
    prepare_environment(verbose)
    import_tensorflow_quietly(verbose)

    from ptqflow.flows.pipeline import ptq_pipeline
    from ptqflow.tasks.views.render import print_run_summary

    live = not as_json and err_console.is_terminal
    with stdout_to_stderr() if as_json else nullcontext(), live_progress() if live else nullcontext():
        state = ptq_pipeline(**arguments, return_state=True)
    summary, code = outcome(state, as_json)
    if as_json:
        print(summary.model_dump_json())
    else:
        print_run_summary(summary, Console())
    raise typer.Exit(code)


def check_dask_scheduler(address: str, as_json: bool) -> None:
    """Fail now, with the fix, rather than after sampling and training, when the scheduler cannot be reached."""
    from distributed import Client

    try:
        with Client(address, timeout=10):
            pass
    except (OSError, TimeoutError, ValueError) as error:
        fail(
            f"cannot reach the Dask scheduler at {address} ({type(error).__name__}): start it, check the address "
            "(e.g. tcp://10.0.0.5:8786), or leave out --dask-address to use a local cluster",
            EXIT_INVALID_INPUT,
            as_json,
        )


@takes(upstream, gate, credentials, registry)
def sweep(
    store: RunStoreOption = "./ptqflow-store",
    seed: SeedOption = 0,
    calibration_sizes: Annotated[
        str | None,
        typer.Option(help="Calibration sizes tried with full int8, e.g. 50,200,1000. [default: 50,200,1000]"),
    ] = None,
    configurations: Annotated[
        str | None, typer.Option(help="Comma-separated configuration names (see --list). [default: all]")
    ] = None,
    rank_by: Annotated[RankBy | None, typer.Option(help=help_for(SweepParameters, "rank_by"))] = None,
    require_full_integer: Annotated[
        bool, typer.Option("--require-full-integer", help=help_for(SweepParameters, "require_full_integer"))
    ] = False,
    latency_threads: Annotated[int | None, typer.Option(help=help_for(SweepParameters, "latency_threads"))] = None,
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
    upstream: dict[str, Any],
    gate: dict[str, Any],
    credentials: dict[str, Any],
    registry: dict[str, Any],
) -> None:
    """Convert one trained model under a grid of quantization configurations on Dask, rank them (accuracy drop,
    size, latency), validate the best in full and optionally export it; exit 0 when a configuration passes."""
    names = tuple(n.strip() for n in configurations.split(",") if n.strip()) if configurations else None
    prepare_environment(verbose)  # before anything imports Prefect, which reads its logging settings once
    from ptqflow.tasks.core.errors import PtqflowError
    from ptqflow.tasks.sweep.grid import select_configurations, sweep_grid

    with refused_options(as_json):
        try:
            arguments = sweep_arguments(
                store=store,
                seed=seed,
                export=export,
                calibration_sizes=sizes(calibration_sizes, "--calibration-sizes", as_json),
                configurations=names,
                rank_by=rank_by,
                require_full_integer=require_full_integer,
                latency_threads=latency_threads,
                **gate,
                **credentials,
                **registry,
                **_upstream_arguments(upstream, as_json),
            )
        except PtqflowError as error:
            fail(str(error), EXIT_INVALID_INPUT, as_json)
    if list_configurations:
        grid = sweep_grid(arguments["calibration"].calibration_size, arguments["sweep"].calibration_sizes)
        chosen = select_configurations(grid, names)
        width = max((len(configuration.name) for configuration in chosen), default=0)
        for configuration in chosen:
            size = f", {configuration.calibration_size} calibration samples" if configuration.calibration_size else ""
            print(f"{configuration.name:<{width}}  {configuration.description}{size}")
        return

    if dask_address and not in_process:
        check_dask_scheduler(dask_address, as_json)
    import_tensorflow_quietly(verbose)
    from ptqflow.flows.sweep import ptq_sweep, shared_prefect_api
    from ptqflow.tasks.views.render import print_sweep_summary

    runner = sweep_task_runner(dask_address, workers, in_process)
    live = not as_json and err_console.is_terminal
    with (
        shared_prefect_api(),
        stdout_to_stderr() if as_json else nullcontext(),
        live_progress() if live else nullcontext(),
    ):
        state = ptq_sweep.with_options(task_runner=runner)(**arguments, return_state=True)
    summary, code = outcome(state, as_json)
    if as_json:
        print(summary.model_dump_json())
    else:
        print_sweep_summary(summary, Console(width=None if Console().is_terminal else 160))
    raise typer.Exit(code)


@takes(upstream, conversion, gate, credentials, registry)
def serve(
    cron: Annotated[
        str | None, typer.Option(help="Cron schedule (server time zone UTC unless --timezone), e.g. '0 2 * * *'.")
    ] = "0 2 * * *",
    interval: Annotated[
        float | None, typer.Option(help="Run every this many seconds instead of on the cron schedule.", min=1)
    ] = None,
    timezone: Annotated[str, typer.Option(help="IANA time zone of the cron schedule.")] = "UTC",
    name: Annotated[str, typer.Option(help="Deployment name (the flow is ptq-pipeline).")] = "nightly",
    store: StoreOption = "./ptqflow-store",
    seed: SeedOption = 0,
    export: ExportOption = None,
    limit: Annotated[int, typer.Option(help="Most runs this process executes at once.", min=1)] = 1,
    on_event: Annotated[
        list[str] | None,
        typer.Option(
            help="Also run when this Prefect event arrives (repeatable), e.g. ptqflow.data.arrived, emitted with "
            "`prefect event emit ptqflow.data.arrived --resource-id ptqflow.dataset.URL`."
        ),
    ] = None,
    *,
    upstream: dict[str, Any],
    conversion: dict[str, Any],
    gate: dict[str, Any],
    credentials: dict[str, Any],
    registry: dict[str, Any],
) -> None:
    """Serve the ptq-pipeline flow on a schedule from this process (no work pool needed): it also runs what is
    triggered from the Prefect UI ("Run" on the deployment), whose form starts from these options. Stop with
    Ctrl-C."""
    with refused_options(as_json=False):
        arguments = pipeline_arguments(
            store=store,
            export=export,
            seed=seed,
            **conversion,
            **gate,
            **credentials,
            **registry,
            **_upstream_arguments(upstream, False),
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
    ptq_pipeline.serve(
        name=name,
        schedules=[schedule],
        triggers=triggers,
        parameters=parameters,
        limit=limit,
        print_starting_message=True,
    )
