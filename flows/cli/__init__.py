"""``ptqflow``: the command line over the ``ptq-pipeline`` and ``ptq-sweep`` flows.

Heavy imports (Prefect, TensorFlow) happen inside commands, after the environment is prepared, so ``--help`` is
instant and settings such as the ephemeral server's start-up timeout apply.
"""

from __future__ import annotations

import typer

from ptqflow.flows.cli import records, running

app = typer.Typer(
    name="ptqflow",
    help="Keras model to validated, fully-integer TensorFlow Lite model: a cached Prefect pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
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
