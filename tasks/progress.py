"""Progress events from inside a stage (epochs, calibration samples) to whoever is listening.

A stage calls ``report(...)``; the CLI installs a listener that draws live progress bars. With no listener
(a deployment, a worker on another machine) events go to the Prefect run logger at debug level only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    stage: str
    message: str
    completed: float | None = None
    total: float | None = None


Listener = Callable[[ProgressEvent], None]

_listeners: list[Listener] = []
_lock = threading.Lock()
_log = logging.getLogger("ptqflow.progress")


def report(stage: str, message: str, completed: float | None = None, total: float | None = None) -> None:
    event = ProgressEvent(stage, message, completed, total)
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(event)
    if not listeners:
        _log.debug("%s: %s", stage, message)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Deliver progress events to ``listener`` for the duration of the block (any thread)."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)
