"""Native output silenced: TensorFlow's converter and quantizer, and the LiteRT and TFLM interpreters, print from
C++ on fds 1 and 2. Its own module, imported by every stage that runs them, so that no stage's cache key
(``tasks.core.caching``) takes in another stage's code just to borrow this helper."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def _fds_to(target: int) -> Iterator[None]:
    """fds 1 and 2 pointed at ``target`` meanwhile (C++ writes there directly, past Python's sys.stdout)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        for fd in saved:
            os.dup2(target, fd)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


@contextlib.contextmanager
def native_output_silenced() -> Iterator[None]:
    """The converter, its quantizer and tf.lite.Interpreter print their settings and deprecation warnings on fds 1
    and 2 from C++ and Python: none of it is for ptqflow's user (errors still arrive, as exceptions)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        with _fds_to(devnull), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        os.close(devnull)


@contextlib.contextmanager
def native_output_captured() -> Iterator[list[str]]:
    """What C++ code prints on fds 1 and 2 meanwhile, as lines (TFLM's allocator reports there, not to Python)."""
    lines: list[str] = []
    with tempfile.TemporaryFile() as capture:
        try:
            with _fds_to(capture.fileno()):
                yield lines
        finally:
            capture.seek(0)
            lines.extend(capture.read().decode(errors="replace").splitlines())
