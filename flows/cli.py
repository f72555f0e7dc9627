"""``ptqflow``: the command line over the ``ptq-pipeline`` flow.

Heavy imports (Prefect, TensorFlow) happen inside commands, after the environment is prepared, so ``--help`` is
instant and settings such as the ephemeral server's start-up timeout apply.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, NoReturn

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from ptqflow.flows.api import InvalidOption, Model, parameters, pipeline_arguments, prefect_defaults, sweep_arguments
from ptqflow.storage.store import scrub_signed_urls
from ptqflow.tasks.parameters import (
    CalibrationParameters,
    ConversionParameters,
    GateParameters,
    QuantizationScheme,
    RankBy,
    RepairParameters,
    SamplingParameters,
    SweepParameters,
    TargetOps,
    TensorType,
    TrainingParameters,
)

app = typer.Typer(
    name="ptqflow",
    help="Keras model to validated, fully-integer TensorFlow Lite model: a cached Prefect pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)

EXIT_GATE_FAILED = 1
EXIT_INVALID_INPUT = 2
EXIT_RUN_FAILED = 3


def _help(schema: type[BaseModel], field: str) -> str:
    info = schema.model_fields[field]
    return f"{info.description} \\[default: {getattr(info.default, 'value', info.default)}]"


# Options shared by `run` and `sweep` (one definition, one help text).
DatasetOption = Annotated[str | None, typer.Option(help=_help(SamplingParameters, "dataset"))]
FeatureColumnOption = Annotated[str | None, typer.Option(help=_help(SamplingParameters, "feature_column"))]
LabelColumnOption = Annotated[str | None, typer.Option(help=_help(SamplingParameters, "label_column"))]
InputShapeOption = Annotated[
    str | None, typer.Option(help="Shape of one sample when the table does not carry it, e.g. 32,32,3.")
]
SampleSizeOption = Annotated[int | None, typer.Option(help=_help(SamplingParameters, "sample_size"))]
SinceOption = Annotated[datetime | None, typer.Option(formats=["%Y-%m-%d"], help=_help(SamplingParameters, "since"))]
WindowDaysOption = Annotated[int | None, typer.Option(help=_help(SamplingParameters, "window_days"))]
ModelOption = Annotated[str | None, typer.Option(help=_help(TrainingParameters, "model"))]
ModelUrlOption = Annotated[str | None, typer.Option(help=_help(TrainingParameters, "model_url"))]
RunStoreOption = Annotated[
    str,
    typer.Option(envvar="PTQFLOW_STORE", help="fsspec URL of the artifact store (folder, s3://bucket/prefix, ...)."),
]
SeedOption = Annotated[int, typer.Option(help="Seed for sampling, training and calibration.")]
EpochsOption = Annotated[int | None, typer.Option(help=_help(TrainingParameters, "epochs"))]
CalibrationSizeOption = Annotated[int | None, typer.Option(help=_help(CalibrationParameters, "calibration_size"))]
CalibrationSourceOption = Annotated[str | None, typer.Option(help=_help(CalibrationParameters, "calibration_source"))]
MaxAccuracyDropOption = Annotated[float | None, typer.Option(help=_help(GateParameters, "max_accuracy_drop"))]
PromotionToleranceOption = Annotated[float | None, typer.Option(help=_help(GateParameters, "promotion_tolerance"))]
MinComparisonRowsOption = Annotated[int | None, typer.Option(help=_help(GateParameters, "min_comparison_rows"))]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="Show Prefect's and TensorFlow's logs on the console.")
]


@app.callback()
def main() -> None:
    """ptqflow: post-training integer quantization as a cached, validated Prefect pipeline."""


def _prepare_environment(verbose: bool) -> None:
    prefect_defaults()
    if verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        return
    # Prefect's console handler would print task logs and failure tracebacks; the CLI reports those itself.
    # Logs still reach the Prefect API (the UI), which has its own handler.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    # The same for Dask's scheduler and workers (ptqflow sweep): their start-up and shut-down chatter.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "critical")
    # TensorFlow's C++ logs (level 3 hides its ERROR lines too, such as tf.data's "NodeDef mentions attribute"
    # notes, which are not errors of the run: a real failure arrives as an exception).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _import_tensorflow_quietly(verbose: bool) -> None:
    """TensorFlow's start-up lines (oneDNN, absl, CUDA probing) ignore TF_CPP_MIN_LOG_LEVEL: import it before the
    run, with fds 1 and 2 silenced."""
    if verbose:
        return
    from ptqflow.tasks.convert import native_output_silenced

    with native_output_silenced():
        import tensorflow  # noqa: F401


def _fail(message: str, code: int, as_json: bool) -> NoReturn:
    message = scrub_signed_urls(message)  # a library's error can quote the URL it was given, secret included
    if as_json:
        print(json.dumps({"status": "error", "error": message}))
    err_console.print(f"[bold red]ptqflow:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _parameters(schema: type[Model], as_json: bool, **given: Any) -> Model:
    with _refused_options(as_json):
        return parameters(schema, **given)


@contextmanager
def _refused_options(as_json: bool) -> Iterator[None]:
    """An option the parameters refuse ends the command with one line naming it (exit 2)."""
    try:
        yield
    except InvalidOption as error:
        _fail(str(error), EXIT_INVALID_INPUT, as_json)


def _shape(text: str | None, as_json: bool) -> tuple[int, ...] | None:
    if text is None:
        return None
    parts = [part.strip() for part in text.replace("x", ",").split(",")]
    if all(part.isascii() and part.isdigit() for part in parts):  # not "²", which str.isdigit accepts
        return tuple(int(part) for part in parts)
    _fail(
        f"invalid --input-shape {text!r}: give positive integers separated by commas, e.g. 32,32,3",
        EXIT_INVALID_INPUT,
        as_json,
    )


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written on fd 1 (libraries, C code) to stderr while the run lasts, so that ``--json``
    leaves exactly one JSON object on stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextmanager
def _live_progress() -> Iterator[None]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ptqflow.tasks.progress import ProgressEvent, listening

    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.fields[stage]:<28}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )
    bars: dict[str, Any] = {}

    def on_event(event: ProgressEvent) -> None:
        if event.stage not in bars:
            bars[event.stage] = progress.add_task(event.message, stage=event.stage, total=None)
        bar = bars[event.stage]
        update: dict[str, Any] = {"description": event.message}
        if event.total is not None:
            update.update(total=event.total, completed=event.completed)
        progress.update(bar, **update)
        if event.message.startswith(("cached", "done")):
            total = progress.tasks[bar].total or 1
            progress.update(bar, total=total, completed=total)
            progress.stop_task(bar)

    with progress, listening(on_event):
        yield


def _print_summary(summary: Any, console: Console) -> None:
    m = summary.metrics
    stages = Table(title="Stages", title_justify="left")
    stages.add_column("stage")
    stages.add_column("result")
    stages.add_column("seconds", justify="right")
    for name, record in summary.tasks.items():
        stages.add_row(name, "cached" if record.cached else "computed", f"{record.seconds:.1f}")
    models = Table(title="Models (test split)", title_justify="left")
    for column in ("model", "accuracy", "size"):
        models.add_column(column, justify="right" if column != "model" else "left")

    def pct(value: float | None) -> str:
        return "not run" if value is None else f"{value:.2%}"

    models.add_row("float Keras", pct(m["float_accuracy"]), "")
    models.add_row("float .tflite", pct(m["tflite_float_accuracy"]), f"{m['float_bytes']:,} B")
    models.add_row("quantized .tflite", pct(m["quantized_accuracy"]), f"{m['quantized_bytes']:,} B")
    console.print(stages)
    console.print(models)
    if m["accuracy_drop_pp"] is not None:
        console.print(
            f"drop {m['accuracy_drop_pp']:.2f} pp, top-1 agreement {m['agreement']:.2%}, full integer: "
            f"{'yes' if m['full_integer'] else 'no (' + str(len(m['float_tensors'])) + ' float tensors)'}"
        )
    colour = "green" if summary.gate.passed else "red"
    console.print(f"[{colour}]{summary.gate.message}[/]", highlight=False)
    console.print(f"quantized model: {summary.artifacts['tflite'].uri}", highlight=False, soft_wrap=True)
    if "report_html" in summary.artifacts:
        console.print(f"report: {summary.artifacts['report_html'].uri}", highlight=False, soft_wrap=True)
    _print_export(summary, console)
    console.print(f"run id: {summary.run_id} (manifest {summary.manifest})", highlight=False, soft_wrap=True)


@app.command()
def run(
    dataset: DatasetOption = None,
    feature_column: FeatureColumnOption = None,
    label_column: LabelColumnOption = None,
    input_shape: InputShapeOption = None,
    sample_size: SampleSizeOption = None,
    since: SinceOption = None,
    window_days: WindowDaysOption = None,
    model: ModelOption = None,
    model_url: ModelUrlOption = None,
    store: RunStoreOption = "./ptqflow-store",
    seed: SeedOption = 0,
    epochs: EpochsOption = None,
    calibration_size: CalibrationSizeOption = None,
    calibration_source: CalibrationSourceOption = None,
    input_type: Annotated[TensorType | None, typer.Option(help=_help(ConversionParameters, "input_type"))] = None,
    output_type: Annotated[TensorType | None, typer.Option(help=_help(ConversionParameters, "output_type"))] = None,
    ops: Annotated[TargetOps | None, typer.Option(help=_help(ConversionParameters, "ops"))] = None,
    scheme: Annotated[QuantizationScheme | None, typer.Option(help=_help(ConversionParameters, "scheme"))] = None,
    per_channel: Annotated[
        bool | None,
        typer.Option("--per-channel/--per-tensor", help=_help(ConversionParameters, "per_channel")),
    ] = None,
    max_accuracy_drop: MaxAccuracyDropOption = None,
    promotion_tolerance: PromotionToleranceOption = None,
    min_comparison_rows: MinComparisonRowsOption = None,
    export: Annotated[
        str | None,
        typer.Option(
            envvar="PTQFLOW_EXPORT",
            help="fsspec URL to publish a passing run to: a new version folder, verified, then latest.json.",
        ),
    ] = None,
    repair: Annotated[
        bool | None,
        typer.Option(
            "--repair/--no-repair", help=_help(RepairParameters, "enabled") + " [default: on with --ops builtins]"
        ),
    ] = None,
    max_float_layers: Annotated[int | None, typer.Option(help=_help(RepairParameters, "max_float_layers"))] = None,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Sample, train, calibrate, convert and validate; exit 0 only when the accuracy gate passes."""
    with _refused_options(as_json):
        arguments = pipeline_arguments(
            store=store,
            export=export,
            seed=seed,
            input_type=input_type,
            output_type=output_type,
            ops=ops,
            scheme=scheme,
            per_channel=per_channel,
            max_accuracy_drop=max_accuracy_drop,
            promotion_tolerance=promotion_tolerance,
            min_comparison_rows=min_comparison_rows,
            repair=repair,
            max_float_layers=max_float_layers,
            **_upstream_options(
                as_json,
                dataset=dataset,
                feature_column=feature_column,
                label_column=label_column,
                input_shape=input_shape,
                sample_size=sample_size,
                since=since,
                window_days=window_days,
                epochs=epochs,
                model=model,
                model_url=model_url,
                calibration_size=calibration_size,
                calibration_source=calibration_source,
            ),
        )
    _prepare_environment(verbose)
    _import_tensorflow_quietly(verbose)

    from ptqflow.flows.pipeline import ptq_pipeline

    live = not as_json and err_console.is_terminal
    with _stdout_to_stderr() if as_json else nullcontext(), _live_progress() if live else nullcontext():
        state = ptq_pipeline(**arguments, return_state=True)
    summary, code = _outcome(state, as_json)
    if as_json:
        print(summary.model_dump_json())
    else:
        _print_summary(summary, Console())
    raise typer.Exit(code)


def _upstream_options(as_json: bool, **given: Any) -> dict[str, Any]:
    """The options both `run` and `sweep` take, as the API takes them (a shape as a tuple, a day as a date)."""
    given["input_shape"] = _shape(given["input_shape"], as_json)
    given["since"] = given["since"].date() if given["since"] else None
    return given


def _outcome(state: Any, as_json: bool) -> tuple[Any, int]:
    """A finished flow run's summary and exit code; a run that failed without one ends the CLI with one line."""
    from ptqflow.flows.stages import STORAGE_RETRY_DELAYS_SECONDS, USER_ERRORS, is_transient_error, storage_refusal
    from ptqflow.tasks.errors import AccuracyGateFailed

    if state.is_completed():
        return state.result(), 0
    error = state.result(raise_on_failure=False)
    if isinstance(error, AccuracyGateFailed) and error.summary is not None:
        return error.summary, EXIT_GATE_FAILED
    if isinstance(error, USER_ERRORS):
        _fail(str(error), EXIT_INVALID_INPUT, as_json)
    if (refusal := storage_refusal(error)) is not None:
        _fail(refusal, EXIT_RUN_FAILED, as_json)
    if is_transient_error(error):
        _fail(
            f"storage unreachable after {len(STORAGE_RETRY_DELAYS_SECONDS) + 1} attempts "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}): check the "
            "endpoint, network and credentials, then rerun; completed stages are reused",
            EXIT_RUN_FAILED,
            as_json,
        )
    _fail(
        f"the run failed: {type(error).__name__}: {error} (rerun with --verbose for Prefect's logs)",
        EXIT_RUN_FAILED,
        as_json,
    )


def _sizes(text: str | None, option: str, as_json: bool) -> tuple[int, ...] | None:
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if parts and all(part.isdigit() and int(part) > 0 for part in parts):
        return tuple(int(part) for part in parts)
    _fail(
        f"invalid {option} {text!r}: give positive integers separated by commas, e.g. 50,200,1000",
        EXIT_INVALID_INPUT,
        as_json,
    )


def _print_export(summary: Any, console: Console) -> None:
    if summary.promotion is not None:
        colour = "green" if summary.promotion.promote else "yellow"
        console.print(f"[{colour}]{summary.promotion.message}[/]", highlight=False, soft_wrap=True)
    if summary.export is not None:
        what = "published" if summary.export.published else "already published"
        console.print(
            f"{what}: version {summary.export.version}, pointer {summary.export.pointer}",
            highlight=False,
            soft_wrap=True,
        )


def _print_sweep(summary: Any, console: Console) -> None:
    from ptqflow.tasks.sweep import TABLE_HEADER, table_rows

    table = Table(title=f"Configurations (test split), ranked by {summary.rank_by}", title_justify="left")
    for column in TABLE_HEADER:
        table.add_column(column, justify="left" if column in ("configuration", "I/O", "verdict") else "right")
    for line in table_rows(summary.rows):
        table.add_row(*line)
    console.print(table)
    colour = "green" if summary.gate.passed else "red"
    console.print(f"[{colour}]{summary.gate.message}[/]", highlight=False)
    console.print(
        f"table: {summary.report.markdown.uri}\nplot: {summary.report.plot.uri}", highlight=False, soft_wrap=True
    )
    if "tflite" in summary.artifacts:
        console.print(f"best model: {summary.artifacts['tflite'].uri}", highlight=False, soft_wrap=True)
    _print_export(summary, console)
    console.print(f"run id: {summary.run_id} (manifest {summary.manifest})", highlight=False, soft_wrap=True)


def _check_dask_scheduler(address: str, as_json: bool) -> None:
    """Fail now, with the fix, rather than after sampling and training, when the scheduler cannot be reached."""
    from distributed import Client

    try:
        with Client(address, timeout=10):
            pass
    except (OSError, TimeoutError, ValueError) as error:
        _fail(
            f"cannot reach the Dask scheduler at {address} ({type(error).__name__}): start it, check the address "
            "(e.g. tcp://10.0.0.5:8786), or leave out --dask-address to use a local cluster",
            EXIT_INVALID_INPUT,
            as_json,
        )


@app.command()
def sweep(
    dataset: DatasetOption = None,
    feature_column: FeatureColumnOption = None,
    label_column: LabelColumnOption = None,
    input_shape: InputShapeOption = None,
    sample_size: SampleSizeOption = None,
    since: SinceOption = None,
    window_days: WindowDaysOption = None,
    model: ModelOption = None,
    model_url: ModelUrlOption = None,
    store: RunStoreOption = "./ptqflow-store",
    seed: SeedOption = 0,
    epochs: EpochsOption = None,
    calibration_size: CalibrationSizeOption = None,
    calibration_source: CalibrationSourceOption = None,
    calibration_sizes: Annotated[
        str | None,
        typer.Option(help="Calibration sizes tried with full int8, e.g. 50,200,1000. [default: 50,200,1000]"),
    ] = None,
    configurations: Annotated[
        str | None, typer.Option(help="Comma-separated configuration names (see --list). [default: all]")
    ] = None,
    rank_by: Annotated[RankBy | None, typer.Option(help=_help(SweepParameters, "rank_by"))] = None,
    require_full_integer: Annotated[
        bool, typer.Option("--require-full-integer", help=_help(SweepParameters, "require_full_integer"))
    ] = False,
    latency_threads: Annotated[int | None, typer.Option(help=_help(SweepParameters, "latency_threads"))] = None,
    max_accuracy_drop: MaxAccuracyDropOption = None,
    promotion_tolerance: PromotionToleranceOption = None,
    min_comparison_rows: MinComparisonRowsOption = None,
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
) -> None:
    """Convert one trained model under a grid of quantization configurations on Dask, rank them (accuracy drop,
    size, latency), validate the best in full and optionally export it; exit 0 when a configuration passes."""
    names = tuple(n.strip() for n in configurations.split(",") if n.strip()) if configurations else None
    _prepare_environment(verbose)  # before anything imports Prefect, which reads its logging settings once
    from ptqflow.tasks.errors import PtqflowError
    from ptqflow.tasks.sweep import select_configurations, sweep_grid

    with _refused_options(as_json):
        try:
            arguments = sweep_arguments(
                store=store,
                seed=seed,
                export=export,
                calibration_sizes=_sizes(calibration_sizes, "--calibration-sizes", as_json),
                configurations=names,
                rank_by=rank_by,
                require_full_integer=require_full_integer,
                latency_threads=latency_threads,
                max_accuracy_drop=max_accuracy_drop,
                promotion_tolerance=promotion_tolerance,
                min_comparison_rows=min_comparison_rows,
                **_upstream_options(
                    as_json,
                    dataset=dataset,
                    feature_column=feature_column,
                    label_column=label_column,
                    input_shape=input_shape,
                    sample_size=sample_size,
                    since=since,
                    window_days=window_days,
                    epochs=epochs,
                    model=model,
                    model_url=model_url,
                    calibration_size=calibration_size,
                    calibration_source=calibration_source,
                ),
            )
        except PtqflowError as error:
            _fail(str(error), EXIT_INVALID_INPUT, as_json)
    if list_configurations:
        grid = sweep_grid(arguments["calibration"].calibration_size, arguments["sweep"].calibration_sizes)
        for configuration in select_configurations(grid, names):
            size = f", {configuration.calibration_size} calibration samples" if configuration.calibration_size else ""
            print(f"{configuration.name:<26} {configuration.description}{size}")
        return

    if dask_address and not in_process:
        _check_dask_scheduler(dask_address, as_json)
    _import_tensorflow_quietly(verbose)
    from prefect.task_runners import ThreadPoolTaskRunner

    from ptqflow.flows.sweep import dask_task_runner, ptq_sweep, shared_prefect_api

    runner = ThreadPoolTaskRunner(max_workers=1) if in_process else dask_task_runner(dask_address, workers)
    live = not as_json and err_console.is_terminal
    with (
        shared_prefect_api(),
        _stdout_to_stderr() if as_json else nullcontext(),
        _live_progress() if live else nullcontext(),
    ):
        state = ptq_sweep.with_options(task_runner=runner)(**arguments, return_state=True)
    summary, code = _outcome(state, as_json)
    if as_json:
        print(summary.model_dump_json())
    else:
        _print_sweep(summary, Console(width=None if Console().is_terminal else 160))
    raise typer.Exit(code)


StoreOption = Annotated[str, typer.Option(envvar="PTQFLOW_STORE", help="fsspec URL of the artifact store.")]


def _open_store(store: str):
    from ptqflow.storage.store import ArtifactStore, StoreError

    try:
        return ArtifactStore(store)
    except StoreError as error:
        _fail(str(error), EXIT_INVALID_INPUT, as_json=False)


@app.command()
def runs(
    store: StoreOption = "./ptqflow-store",
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifests as a JSON list.")] = False,
) -> None:
    """List the complete runs in a store, newest first."""
    from ptqflow.storage.store import StoreError
    from ptqflow.tasks.manifest import list_manifests

    try:
        manifests = list_manifests(_open_store(store))
    except StoreError as error:
        _fail(str(error), EXIT_INVALID_INPUT, as_json=as_json)
    if as_json:
        print(json.dumps(manifests))
        return
    if not manifests:
        err_console.print(f"no complete runs in {store}")
        return
    table = Table(title=f"Runs in {manifests[0]['store']}", title_justify="left")
    for column in ("run", "flow", "finished (UTC)", "gate", "quantized", "drop pp", "exported"):
        table.add_column(column, no_wrap=True)
    for m in manifests:
        metrics = m["metrics"]  # a sweep where nothing passed has no quantized model's figures
        table.add_row(
            m["run_id"][:8],
            m.get("flow", "ptq-pipeline"),
            m["created_at"].replace("T", " ")[:19],
            m["status"],
            "—" if metrics.get("quantized_accuracy") is None else f"{metrics['quantized_accuracy']:.2%}",
            "—" if metrics.get("accuracy_drop_pp") is None else f"{metrics['accuracy_drop_pp']:.2f}",
            (m.get("export") or {}).get("version", "")[:16],
        )
    Console(width=None if err_console.is_terminal else 120).print(table)


@app.command()
def show(
    run_id: Annotated[str, typer.Argument(help="A run id, or a unique prefix of one.")],
    store: StoreOption = "./ptqflow-store",
) -> None:
    """Print one run's manifest (JSON)."""
    from ptqflow.storage.store import StoreError
    from ptqflow.tasks.manifest import find_manifest

    try:
        manifest = find_manifest(_open_store(store), run_id)
    except (LookupError, StoreError) as error:
        _fail(str(error), EXIT_INVALID_INPUT, as_json=False)
    print(json.dumps(manifest, indent=2, sort_keys=True))


ExportOption = Annotated[str, typer.Option(envvar="PTQFLOW_EXPORT", help="fsspec URL of the export.")]


def _open_export(export: str):
    from ptqflow.storage.store import StoreError
    from ptqflow.tasks.publish import export_store

    try:
        return export_store(export)
    except StoreError as error:
        _fail(str(error), EXIT_INVALID_INPUT, as_json=False)


LockWaitOption = Annotated[
    float,
    typer.Option(
        "--wait",
        min=0,
        help="Seconds to wait for a run that is using the export (it holds the "
        "export's lock while it runs); then give up.",
    ),
]


@contextmanager
def _export_lock(export: Any, wait_seconds: float) -> Iterator[None]:
    """Hold the export's lock, the one runs hold, so that a run cannot move latest.json in the middle of a
    promote or rollback: through the Prefect server when PREFECT_API_URL is set, on this host otherwise (see
    flows/locks.py)."""
    import logging

    from prefect.events.worker import EventsWorker

    from ptqflow.flows.locks import LockNotAcquired, exclusive

    try:
        with ExitStack() as held:
            try:
                held.enter_context(exclusive(export.url, timeout_seconds=wait_seconds))
            except LockNotAcquired as error:
                _fail(
                    f"{error}, or wait longer with --wait (waited {wait_seconds:g} s)", EXIT_RUN_FAILED, as_json=False
                )
            yield
    finally:
        # The lock's events are sent before the process exits; Prefect's worker would warn that some are pending.
        logging.getLogger("EventsWorker").setLevel(logging.ERROR)
        EventsWorker.drain_all(timeout=10)


def _quiet_lock_service() -> None:
    """Before Prefect is imported: its slot service logs a lock it gave up waiting for as an error of its own;
    `_export_lock` says what happened in one line."""
    os.environ.setdefault("PREFECT_LOGGING_INTERNAL_LEVEL", "CRITICAL")


def _moved(move: Any, what: str) -> None:
    Console().print(
        f"{what}: latest.json now points to {move.version} (was {move.previous_version or 'nothing'}); pointer "
        f"recorded in {move.history}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def promote(
    run_id: Annotated[str, typer.Argument(help="A run id, or a unique prefix of one.")],
    store: StoreOption = "./ptqflow-store",
    export: ExportOption = ...,
    wait: LockWaitOption = 60.0,
) -> None:
    """Point the export's latest.json at a run (publishing it first if it never was), whatever the comparison with
    the exported model said; the run must have passed its gate. Files are verified; history is kept."""
    _quiet_lock_service()
    from ptqflow.storage.store import StoreError
    from ptqflow.tasks.manifest import find_manifest
    from ptqflow.tasks.promotion import promote as promote_run
    from ptqflow.tasks.publish import PointerMoved

    try:
        manifest = find_manifest(_open_store(store), run_id)
        target = _open_export(export)
        with _export_lock(target, wait):
            _moved(promote_run(_open_store(store), target, manifest), f"promoted run {manifest['run_id']}")
    except PointerMoved as error:  # another writer (another host, no shared lock) moved latest.json meanwhile
        _fail(str(error), EXIT_RUN_FAILED, as_json=False)
    except (LookupError, StoreError) as error:
        _fail(str(error), EXIT_INVALID_INPUT, as_json=False)


@app.command()
def rollback(export: ExportOption = ..., wait: LockWaitOption = 60.0) -> None:
    """Point the export's latest.json back at the version published before the current one (verified; history
    is kept)."""
    _quiet_lock_service()
    from ptqflow.storage.store import StoreError
    from ptqflow.tasks.promotion import rollback as roll_back
    from ptqflow.tasks.publish import PointerMoved

    try:
        target = _open_export(export)
        with _export_lock(target, wait):
            _moved(roll_back(target), "rolled back")
    except PointerMoved as error:
        _fail(str(error), EXIT_RUN_FAILED, as_json=False)
    except StoreError as error:
        _fail(str(error), EXIT_INVALID_INPUT, as_json=False)


@app.command()
def gc(
    store: StoreOption = "./ptqflow-store",
    keep_runs: Annotated[int, typer.Option(help="Keep this many of the newest runs.", min=0)] = 10,
    keep_days: Annotated[
        float | None, typer.Option(help="Also keep every run younger than this many days.", min=0)
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be deleted; delete nothing.")] = False,
    wait: LockWaitOption = 60.0,
) -> None:
    """Delete what no kept run needs: older runs' manifests, cache records and blobs. A kept run reruns all from
    cache; exports hold their own copies and are not touched. Takes the store's lock, so no running flow loses
    anything."""
    _quiet_lock_service()
    from ptqflow.flows.locks import LockNotAcquired, exclusive
    from ptqflow.storage.store import StoreError
    from ptqflow.tasks.garbage_collection import apply_collection, plan_collection

    target = _open_store(store)
    try:
        with exclusive(target.url, timeout_seconds=wait):
            plan = plan_collection(target, keep_runs, keep_days, datetime.now(timezone.utc))
            for note in plan.notes:
                err_console.print(note, highlight=False, soft_wrap=True)
            if not dry_run:
                apply_collection(target, plan)
    except LockNotAcquired as error:
        _fail(f"{error}, or wait longer with --wait (waited {wait:g} s)", EXIT_RUN_FAILED, as_json=False)
    except StoreError as error:
        _fail(str(error), EXIT_INVALID_INPUT, as_json=False)
    verb = "would free" if dry_run else "freed"
    Console().print(
        f"{verb} {plan.freed_bytes:,} B: {len(plan.delete)} objects, {len(plan.removed_runs)} runs "
        f"({', '.join(r[:8] for r in plan.removed_runs) or 'none'}); kept {len(plan.kept_runs)} runs",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
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
    export: Annotated[
        str | None, typer.Option(envvar="PTQFLOW_EXPORT", help="Default export URL of the scheduled runs.")
    ] = None,
    dataset: DatasetOption = None,
    window_days: WindowDaysOption = None,
    epochs: EpochsOption = None,
    calibration_size: Annotated[int | None, typer.Option(help=_help(CalibrationParameters, "calibration_size"))] = None,
    ops: Annotated[TargetOps | None, typer.Option(help=_help(ConversionParameters, "ops"))] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option(help=_help(GateParameters, "max_accuracy_drop"))] = None,
    promotion_tolerance: PromotionToleranceOption = None,
    min_comparison_rows: MinComparisonRowsOption = None,
    limit: Annotated[int, typer.Option(help="Most runs this process executes at once.", min=1)] = 1,
) -> None:
    """Serve the ptq-pipeline flow on a schedule from this process (no work pool needed): it also runs what is
    triggered from the Prefect UI ("Run" on the deployment). Stop with Ctrl-C."""
    parameters = {
        "store": store,
        "export": export,
        "sampling": _parameters(SamplingParameters, False, dataset=dataset, window_days=window_days).model_dump(
            mode="json"
        ),
        "training": _parameters(TrainingParameters, False, epochs=epochs).model_dump(mode="json"),
        "calibration": _parameters(CalibrationParameters, False, calibration_size=calibration_size).model_dump(
            mode="json"
        ),
        "conversion": _parameters(ConversionParameters, False, ops=ops).model_dump(mode="json"),
        "gate": _parameters(
            GateParameters,
            False,
            max_accuracy_drop=max_accuracy_drop,
            promotion_tolerance=promotion_tolerance,
            min_comparison_rows=min_comparison_rows,
        ).model_dump(mode="json"),
    }
    _prepare_environment(verbose=True)
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        _fail(
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
        _fail(f"invalid schedule: {str(error).splitlines()[-1]}", EXIT_INVALID_INPUT, as_json=False)
    ptq_pipeline.serve(name=name, schedules=[schedule], parameters=parameters, limit=limit, print_starting_message=True)


if __name__ == "__main__":
    app()
