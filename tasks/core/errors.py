"""Errors a user can act on. Each message names the problem and the fix; the CLI prints it on one line."""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Literal

# Defined with the storage layer, which raises them too; imported from here by everything above it.
from ptqflow.storage.errors import InvalidDataset, InvalidModel, PtqflowError
from ptqflow.storage.store import scrub_secrets

__all__ = [
    "AccuracyGateFailed",
    "ConversionFailed",
    "InvalidDataset",
    "InvalidModel",
    "PtqflowError",
    "StageTimedOut",
    "secrets_kept_out",
    "without_secrets",
]


class ConversionFailed(PtqflowError):
    pass


class AccuracyGateFailed(PtqflowError):
    """The quantized model lost more accuracy than allowed; ``summary`` holds the run's results."""

    def __init__(self, message: str, summary: object | None = None) -> None:
        super().__init__(message)
        self.summary = summary


class StageTimedOut(RuntimeError):
    """A stage ran past its time limit (a hung or runaway stage); never retried."""


def _chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _scrub_in_place(error: BaseException) -> None:
    error.args = tuple(scrub_secrets(a) if isinstance(a, str) else a for a in error.args)
    for attribute in ("strerror", "filename", "filename2", "msg"):  # OSError's and some libraries' own fields
        value = getattr(error, attribute, None)
        if isinstance(value, str):
            with contextlib.suppress(AttributeError, TypeError):
                setattr(error, attribute, scrub_secrets(value))


def _quotes_secrets(error: BaseException) -> bool:
    try:
        text = str(error)
    except Exception:  # a __str__ that fails cannot be shown, and so shows nothing
        return False
    return scrub_secrets(text) != text


def without_secrets(error: BaseException) -> BaseException:
    """``error`` with the secrets that it and the exceptions chained to it quote taken out
    (``storage.store.scrub_secrets``): the same exception, its arguments cleaned in place, so its type and
    attributes still say what failed; a RuntimeError naming its type when its message is made some other way."""
    chain = _chain(error)
    if not any(_quotes_secrets(e) for e in chain):
        return error
    for e in chain:
        _scrub_in_place(e)
    if not any(_quotes_secrets(e) for e in chain):
        return error
    original = scrub_secrets(str(error))
    error.__cause__ = error.__context__ = None
    return RuntimeError(f"{type(error).__name__}: {original}")


class secrets_kept_out(contextlib.ContextDecorator):  # noqa: N801 - used as a decorator, named like one
    """Around a stage or a flow: an exception leaving it quotes no secret (a signed URL's signature, a password),
    since Prefect records what leaves: the task's state and persisted result, the flow run's state (each as the
    exception's type and message)."""

    def __enter__(self) -> secrets_kept_out:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> Literal[False]:
        if isinstance(error, Exception):
            clean = without_secrets(error)
            if clean is not error:
                raise clean from None
        return False  # the exception, if any, goes on (cleaned in place)
