"""The ``ptqflow`` command: the CLI, or one line saying what is wrong with the installation."""

from __future__ import annotations

import gc
import sys


def main() -> None:
    try:
        # Imports the stages, whose package checks TensorFlow before anything imports it.
        from ptqflow.flows.cli import app
    except ImportError as error:
        # The failed package import leaves its already-loaded submodule (and so the exception's class) behind.
        installation = sys.modules.get("ptqflow.tasks.core.installation")
        if installation is None or not isinstance(error, installation.UnsupportedInstall):
            raise
        print(f"ptqflow: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        app()
    finally:
        # The interpreter's final collections walk every object TensorFlow made: about a second of each command's
        # exit (2 s after a run here), for memory the process is about to give back. Frozen objects are skipped.
        gc.freeze()
