"""Progress events from inside a stage (epochs, calibration samples) to whoever is listening.

A stage calls ``report(...)``; the CLI installs a listener that draws live progress bars. With no listener
(a deployment, a worker on another machine) events go to the Prefect run logger at debug level only. Inside a
Prefect task run, an event that says how far it is also updates that task run's progress artifact, so a run
started from the UI shows how far training, calibration and validation are.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast
from uuid import UUID


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
    if completed is not None and total:
        _prefect_progress.update(event)


class PrefectProgress:
    """One Prefect progress artifact per task run and stage (key ``ptq-progress-<stage>``), created at the
    stage's first measured step, then updated at most every ``interval`` seconds and at 100%."""

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self._artifacts: dict[tuple[str, str], tuple[UUID | None, float]] = {}  # (artifact, last update)
        self._lock = threading.Lock()

    def update(self, event: ProgressEvent) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact
        from prefect.context import TaskRunContext

        context = TaskRunContext.get()
        if context is None or event.completed is None or not event.total:
            return
        percent = round(min(100.0, 100.0 * event.completed / event.total), 1)
        key = (str(context.task_run.id), event.stage)
        now = time.monotonic()
        with self._lock:
            artifact, last = self._artifacts.get(key, (None, -self.interval))
            if now - last < self.interval and percent < 100:
                return
            self._artifacts[key] = (artifact, now)
        try:
            if artifact is None:
                name = "ptq-progress-" + re.sub(r"[^a-z0-9]+", "-", event.stage.lower()).strip("-")
                # A stage runs in a worker thread with no event loop: the call is synchronous and returns the id.
                artifact = cast(UUID, create_progress_artifact(percent, key=name, description=event.message))
            else:
                update_progress_artifact(artifact, percent, description=event.message)
        except Exception as error:  # best effort: progress is never worth failing a stage for
            _log.debug("progress artifact not updated: %s", error)
        with self._lock:
            if percent >= 100:
                self._artifacts.pop(key, None)
            else:
                self._artifacts[key] = (artifact, now)


_prefect_progress = PrefectProgress()


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
