"""Preload for the worker processes of the LocalCluster that ``ptq-sweep`` starts: Dask calls a preload's
``dask_teardown`` as a worker closes."""

from __future__ import annotations

import gc
from typing import Any


def dask_teardown(worker: Any) -> None:
    """Move every live object out of the garbage collector's reach before the worker process exits.

    A process that has imported TensorFlow takes about a second to exit, nearly all of it the interpreter's final
    collections walking TensorFlow's objects (measured here: 1.3 to 1.5 s to close a two-worker cluster, 0.13 s
    with this). The cluster is closed before the sweep returns, so every sweep waited for that second."""
    gc.freeze()
