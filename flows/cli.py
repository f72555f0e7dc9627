"""``ptqflow``: the command line over the ``ptq-pipeline`` flow.

Heavy imports (Prefect, TensorFlow) happen inside commands, after the environment is prepared, so ``--help`` is
instant and settings such as the ephemeral server's start-up timeout apply.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Annotated, Any, NoReturn

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table

from tasks.parameters import (
    CalibrationParameters,
    ConversionParameters,
    GateParameters,
    RepairParameters,
    SamplingParameters,
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


@app.callback()
def main() -> None:
    """ptqflow: post-training integer quantization as a cached, validated Prefect pipeline."""


def _prepare_environment(verbose: bool) -> None:
    # A fresh PREFECT_HOME's ephemeral server takes ~25 s to start on a small machine, past Prefect's 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not verbose:
        # Prefect's console handler would print task logs and failure tracebacks; the CLI reports those itself.
        # Logs still reach the Prefect API (the UI), which has its own handler.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")


def _fail(message: str, code: int, as_json: bool) -> NoReturn:
    if as_json:
        print(json.dumps({"status": "error", "error": message}))
    err_console.print(f"[bold red]ptqflow:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _parameters(schema: type[BaseModel], as_json: bool, **given: Any) -> Any:
    try:
        return schema(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as error:
        first = error.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "a parameter"
        _fail(f"invalid {option}: {first['msg']}", EXIT_INVALID_INPUT, as_json)


def _shape(text: str | None, as_json: bool) -> tuple[int, ...] | None:
    if text is None:
        return None
    parts = [part.strip() for part in text.replace("x", ",").split(",")]
    if all(part.isdigit() for part in parts):
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

    from tasks.progress import ProgressEvent, listening

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
    if summary.export is not None:
        what = "published" if summary.export.published else "already published"
        console.print(f"{what}: version {summary.export.version}, pointer {summary.export.pointer}", highlight=False,
                      soft_wrap=True)
    console.print(f"run id: {summary.run_id} (manifest {summary.manifest})", highlight=False, soft_wrap=True)


@app.command()
def run(
    dataset: Annotated[str | None, typer.Option(help=_help(SamplingParameters, "dataset"))] = None,
    feature_column: Annotated[
        str | None, typer.Option(help=_help(SamplingParameters, "feature_column"))
    ] = None,
    label_column: Annotated[str | None, typer.Option(help=_help(SamplingParameters, "label_column"))] = None,
    input_shape: Annotated[
        str | None, typer.Option(help="Shape of one sample when the table does not carry it, e.g. 32,32,3.")
    ] = None,
    sample_size: Annotated[int | None, typer.Option(help=_help(SamplingParameters, "sample_size"))] = None,
    model: Annotated[str | None, typer.Option(help=_help(TrainingParameters, "model"))] = None,
    model_url: Annotated[str | None, typer.Option(help=_help(TrainingParameters, "model_url"))] = None,
    store: Annotated[
        str,
        typer.Option(envvar="PTQFLOW_STORE", help="fsspec URL of the artifact store (folder, s3://bucket/prefix, ...)."),
    ] = "./ptqflow-store",
    seed: Annotated[int, typer.Option(help="Seed for sampling, training and calibration.")] = 0,
    epochs: Annotated[int | None, typer.Option(help=_help(TrainingParameters, "epochs"))] = None,
    calibration_size: Annotated[
        int | None, typer.Option(help=_help(CalibrationParameters, "calibration_size"))
    ] = None,
    calibration_source: Annotated[
        str | None, typer.Option(help=_help(CalibrationParameters, "calibration_source"))
    ] = None,
    input_type: Annotated[TensorType | None, typer.Option(help=_help(ConversionParameters, "input_type"))] = None,
    output_type: Annotated[TensorType | None, typer.Option(help=_help(ConversionParameters, "output_type"))] = None,
    ops: Annotated[TargetOps | None, typer.Option(help=_help(ConversionParameters, "ops"))] = None,
    max_accuracy_drop: Annotated[
        float | None, typer.Option(help=_help(GateParameters, "max_accuracy_drop"))
    ] = None,
    export: Annotated[
        str | None,
        typer.Option(
            envvar="PTQFLOW_EXPORT",
            help="fsspec URL to publish a passing run to: a new version folder, verified, then latest.json.",
        ),
    ] = None,
    repair: Annotated[
        bool | None,
        typer.Option("--repair/--no-repair", help=_help(RepairParameters, "enabled") + " [default: on with --ops builtins]"),
    ] = None,
    max_float_layers: Annotated[
        int | None, typer.Option(help=_help(RepairParameters, "max_float_layers"))
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's logs on the console.")] = False,
) -> None:
    """Sample, train, calibrate, convert and validate; exit 0 only when the accuracy gate passes."""
    parameters = dict(
        store=store,
        export=export,
        seed=seed,
        sampling=_parameters(
            SamplingParameters, as_json, dataset=dataset, feature_column=feature_column, label_column=label_column,
            input_shape=_shape(input_shape, as_json), sample_size=sample_size,
        ),
        training=_parameters(TrainingParameters, as_json, epochs=epochs, model=model, model_url=model_url),
        calibration=_parameters(
            CalibrationParameters, as_json, calibration_size=calibration_size, calibration_source=calibration_source
        ),
        conversion=_parameters(ConversionParameters, as_json, input_type=input_type, output_type=output_type, ops=ops),
        gate=_parameters(GateParameters, as_json, max_accuracy_drop=max_accuracy_drop),
        repair=_parameters(RepairParameters, as_json, enabled=repair, max_float_layers=max_float_layers),
    )
    _prepare_environment(verbose)

    from flows.pipeline import ptq_pipeline
    from flows.stages import STORAGE_RETRY_DELAYS_SECONDS, USER_ERRORS, is_transient_error
    from tasks.errors import AccuracyGateFailed

    live = not as_json and err_console.is_terminal
    with _stdout_to_stderr() if as_json else nullcontext(), _live_progress() if live else nullcontext():
        state = ptq_pipeline(**parameters, return_state=True)
    if state.is_completed():
        summary, code = state.result(), 0
    else:
        error = state.result(raise_on_failure=False)
        if isinstance(error, AccuracyGateFailed) and error.summary is not None:
            summary, code = error.summary, EXIT_GATE_FAILED
        elif isinstance(error, USER_ERRORS):
            _fail(str(error), EXIT_INVALID_INPUT, as_json)
        elif is_transient_error(error):
            _fail(
                f"storage unreachable after {len(STORAGE_RETRY_DELAYS_SECONDS) + 1} attempts "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}): check the "
                "endpoint, network and credentials, then rerun; completed stages are reused",
                EXIT_RUN_FAILED,
                as_json,
            )
        else:
            _fail(
                f"the run failed: {type(error).__name__}: {error} (rerun with --verbose for Prefect's logs)",
                EXIT_RUN_FAILED,
                as_json,
            )
    if as_json:
        print(summary.model_dump_json())
    else:
        _print_summary(summary, Console())
    raise typer.Exit(code)


StoreOption = Annotated[
    str, typer.Option(envvar="PTQFLOW_STORE", help="fsspec URL of the artifact store.")
]


def _open_store(store: str):
    from storage.store import ArtifactStore, StoreError

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
    from tasks.manifest import list_manifests

    manifests = list_manifests(_open_store(store))
    if as_json:
        print(json.dumps(manifests))
        return
    if not manifests:
        err_console.print(f"no complete runs in {store}")
        return
    table = Table(title=f"Runs in {manifests[0]['store']}", title_justify="left")
    for column in ("run", "finished (UTC)", "gate", "quantized", "drop pp", "exported"):
        table.add_column(column, no_wrap=True)
    for m in manifests:
        table.add_row(
            m["run_id"][:8], m["created_at"].replace("T", " ")[:19], m["status"],
            "—" if m["metrics"]["quantized_accuracy"] is None else f"{m['metrics']['quantized_accuracy']:.2%}",
            "—" if m["metrics"]["accuracy_drop_pp"] is None else f"{m['metrics']['accuracy_drop_pp']:.2f}",
            (m.get("export") or {}).get("version", "")[:16],
        )
    Console(width=None if err_console.is_terminal else 120).print(table)


@app.command()
def show(
    run_id: Annotated[str, typer.Argument(help="A run id, or a unique prefix of one.")],
    store: StoreOption = "./ptqflow-store",
) -> None:
    """Print one run's manifest (JSON)."""
    from tasks.manifest import find_manifest

    try:
        manifest = find_manifest(_open_store(store), run_id)
    except LookupError as error:
        _fail(str(error), EXIT_INVALID_INPUT, as_json=False)
    print(json.dumps(manifest, indent=2, sort_keys=True))


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
    dataset: Annotated[str | None, typer.Option(help=_help(SamplingParameters, "dataset"))] = None,
    epochs: Annotated[int | None, typer.Option(help=_help(TrainingParameters, "epochs"))] = None,
    calibration_size: Annotated[
        int | None, typer.Option(help=_help(CalibrationParameters, "calibration_size"))
    ] = None,
    ops: Annotated[TargetOps | None, typer.Option(help=_help(ConversionParameters, "ops"))] = None,
    max_accuracy_drop: Annotated[
        float | None, typer.Option(help=_help(GateParameters, "max_accuracy_drop"))
    ] = None,
    limit: Annotated[int, typer.Option(help="Most runs this process executes at once.", min=1)] = 1,
) -> None:
    """Serve the ptq-pipeline flow on a schedule from this process (no work pool needed): it also runs what is
    triggered from the Prefect UI ("Run" on the deployment). Stop with Ctrl-C."""
    parameters = {
        "store": store,
        "export": export,
        "sampling": _parameters(SamplingParameters, False, dataset=dataset).model_dump(mode="json"),
        "training": _parameters(TrainingParameters, False, epochs=epochs).model_dump(mode="json"),
        "calibration": _parameters(CalibrationParameters, False, calibration_size=calibration_size).model_dump(
            mode="json"
        ),
        "conversion": _parameters(ConversionParameters, False, ops=ops).model_dump(mode="json"),
        "gate": _parameters(GateParameters, False, max_accuracy_drop=max_accuracy_drop).model_dump(mode="json"),
    }
    _prepare_environment(verbose=True)
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        _fail(
            "serving needs a Prefect server that outlives this process: start one (prefect server start) and set "
            "PREFECT_API_URL, e.g. http://127.0.0.1:4200/api, or log in to Prefect Cloud",
            EXIT_INVALID_INPUT, as_json=False,
        )

    from flows.pipeline import ptq_pipeline

    try:
        schedule = (
            IntervalSchedule(interval=timedelta(seconds=interval)) if interval else CronSchedule(cron=cron, timezone=timezone)
        )
    except ValueError as error:
        _fail(f"invalid schedule: {str(error).splitlines()[-1]}", EXIT_INVALID_INPUT, as_json=False)
    ptq_pipeline.serve(name=name, schedules=[schedule], parameters=parameters, limit=limit, print_starting_message=True)


if __name__ == "__main__":
    app()
