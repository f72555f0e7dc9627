"""What every ``ptqflow`` command shares: one-line failures with exit codes, the quiet environment, the live
progress display, and the outcome of a finished flow run."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from ptqflow.flows.api import prefect_defaults
from ptqflow.flows.options import InvalidOption
from ptqflow.storage.store import scrub_secrets

err_console = Console(stderr=True)

EXIT_GATE_FAILED = 1
EXIT_INVALID_INPUT = 2
EXIT_RUN_FAILED = 3


def prepare_environment(verbose: bool) -> None:
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


def import_tensorflow_quietly(verbose: bool) -> None:
    """TensorFlow's start-up lines (oneDNN, absl, CUDA probing) ignore TF_CPP_MIN_LOG_LEVEL: import it before the
    run, with fds 1 and 2 silenced."""
    if verbose:
        return
    from ptqflow.tasks.core.native import native_output_silenced

    with native_output_silenced():
        import tensorflow  # noqa: F401


def printable(text: str) -> str:
    """``text`` with control characters (a NUL quoted from a UTF-16 file, an escape sequence in a file name) shown
    as escapes, so a message cannot garble or drive the terminal."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def fail(message: str, code: int, as_json: bool) -> NoReturn:
    message = printable(scrub_secrets(message))  # a library's error can quote a URL it was given, secret included
    if as_json:
        print(json.dumps({"status": "error", "error": message}))
    err_console.print(f"[bold red]ptqflow:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def refused_options(as_json: bool) -> Iterator[None]:
    """An option the parameters refuse ends the command with one line naming it (exit 2)."""
    try:
        yield
    except InvalidOption as error:
        fail(str(error), EXIT_INVALID_INPUT, as_json)


def integers(text: str, option: str, example: str, as_json: bool) -> tuple[int, ...]:
    """Positive integers separated by commas (or ``x``, as in 32x32x3), or one line naming ``option`` and exit 2."""
    parts = [part.strip() for part in text.replace("x", ",").split(",")]
    if all(part.isascii() and part.isdigit() and int(part) > 0 for part in parts):  # not "²", which isdigit accepts
        return tuple(int(part) for part in parts)
    fail(
        f"invalid {option} {text!r}: give positive integers separated by commas, e.g. {example}",
        EXIT_INVALID_INPUT,
        as_json,
    )


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
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
def live_progress() -> Iterator[None]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ptqflow.tasks.core.progress import ProgressEvent, listening

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


def outcome(state: Any, as_json: bool) -> tuple[Any, int]:
    """A finished flow run's summary and exit code (0 passed, 1 failed at the gate); a run that failed without a
    summary ends the command with one line and the exit code for its cause."""
    from ptqflow.flows.api import finished
    from ptqflow.flows.registry import RegistryOutOfLine
    from ptqflow.flows.stages import (
        STORAGE_RETRY_DELAYS_SECONDS,
        USER_ERRORS,
        is_transient_error,
        missing_credentials,
        storage_refusal,
    )

    try:
        summary = finished(state)
    except USER_ERRORS as error:
        fail(str(error), EXIT_INVALID_INPUT, as_json)
    except RegistryOutOfLine as error:
        fail(str(error), EXIT_RUN_FAILED, as_json)
    except Exception as error:
        if (refusal := storage_refusal(error)) is not None:
            fail(refusal, EXIT_RUN_FAILED, as_json)
        if (no_credentials := missing_credentials(error)) is not None:
            fail(no_credentials, EXIT_INVALID_INPUT, as_json)
        if is_transient_error(error):
            fail(
                f"storage unreachable after {len(STORAGE_RETRY_DELAYS_SECONDS) + 1} attempts "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}): check the "
                "endpoint, network and credentials, then rerun; completed stages are reused",
                EXIT_RUN_FAILED,
                as_json,
            )
        fail(
            f"the run failed: {type(error).__name__}: {error} (rerun with --verbose for Prefect's logs)",
            EXIT_RUN_FAILED,
            as_json,
        )
    return summary, 0 if summary.gate.passed else EXIT_GATE_FAILED
