"""``ptqflow``: the command line over the ``ptq-pipeline`` and ``ptq-sweep`` flows.

Heavy imports (Prefect, TensorFlow) happen inside commands, after the environment is prepared, so ``--help`` is
instant and settings such as the ephemeral server's start-up timeout apply.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ptqflow.flows.cli import records, running

app = typer.Typer(
    name="ptqflow",
    help="Keras model to validated, fully-integer TensorFlow Lite model: a cached Prefect pipeline.",
    no_args_is_help=True,
    # Typer's --install-completion / --show-completion (bash, zsh, fish, PowerShell).
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        print(f"ptqflow {version('ptqflow')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print ptqflow's version and exit."),
    ] = False,
) -> None:
    """ptqflow: post-training integer quantization as a cached, validated Prefect pipeline."""


for command in (
    running.run,
    running.sweep,
    records.runs,
    records.show,
    records.promote,
    records.rollback,
    records.sync_registry,
    records.gc,
    running.serve,
):
    app.command()(command)

if __name__ == "__main__":
    app()
