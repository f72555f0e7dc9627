"""One run at a time per artifact store and per export target.

Two mechanisms, chosen by where the runs are coordinated:

* **A Prefect server** (PREFECT_API_URL set: schedules, the UI, deployments, workers, the CLI pointed at it): a
  Prefect global concurrency limit of 1 per target, created on first use, held with a lease that the holder
  renews while it lives. A killed holder stops renewing; the server's lease service frees the slot after the
  lease (LEASE_SECONDS) plus one pass of that service (15 s by default).
* **No server** (the CLI on its own ephemeral Prefect server, or on the temporary one ``run`` and ``sweep`` start
  for themselves and their Dask workers): a host-wide ``flock`` on a file per target under
  the lock folder (PTQFLOW_LOCK_DIR, default ``<tmp>/ptqflow-locks-<uid>``). The kernel drops the lock when its
  holder exits for any reason, kill -9 included, so a killed run never blocks the next. Prefect's slots cannot
  serve here: an ephemeral server keeps its leases in its own memory, and it dies with the run while the slot
  stays counted in the database, so nothing would ever free it. Runs on other hosts are not coordinated without
  a server.

Content addressing already makes concurrent runs safe for the blobs; the lock keeps a scheduled run and a run
started from the UI from racing on the same export pointer and from doing the same work twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

LOCK_TIMEOUT_SECONDS = 6 * 3600  # longer than any sane run: a lock held this long belongs to a stuck run
# The holder renews its lease while it lives; a killed holder's lease lapses after this (Prefect's minimum), and
# the server's lease service then frees the lock.
LEASE_SECONDS = 60
SWITCH = "PTQFLOW_STORE_LOCK"  # "off": no lock (a single user on a private store)
LOCK_DIR = "PTQFLOW_LOCK_DIR"
POLL_SECONDS = 0.5
# The API URL of the temporary Prefect server a command started for itself (flows.cluster.shared_prefect_api).
TEMPORARY_SERVER_ENV = "PTQFLOW_TEMPORARY_PREFECT_API"


class LockNotAcquired(Exception):
    """Another run held a target's lock for longer than this run would wait. Not an OSError: nothing is wrong
    with the storage, and retrying at once would only wait again."""


def lock_name(url: str) -> str:
    # Limit names are shown in the UI and must be plain: a digest of the normalised URL.
    return f"ptqflow-target-{hashlib.sha256(url.encode()).hexdigest()[:20]}"


def host_lock_folder() -> Path:
    """Where the host-wide lock files live (created on first use, private to this user)."""
    configured = os.environ.get(LOCK_DIR)
    folder = Path(configured) if configured else Path(tempfile.gettempdir()) / f"ptqflow-locks-{os.getuid()}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def _coordinated_by_a_server() -> bool:
    """A Prefect server that outlives the run; not the temporary one a command started for itself (and its Dask
    workers): that one dies with the run like an ephemeral server, and its slots would never be freed."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return bool(url) and url != os.environ.get(TEMPORARY_SERVER_ENV)


def _ensure_limits(names: list[str]) -> None:
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                except ObjectAlreadyExists:  # another run created it first (Prefect's client turns 409 into this)
                    pass
                except httpx.HTTPStatusError as error:
                    if error.response.status_code != 409:
                        raise


def _holder(file: IO[str]) -> str:
    """Who holds a lock file, as its holder wrote it (best effort: the file is only a note for people)."""
    try:
        file.seek(0)
        note = json.loads(file.read() or "{}")
        return f" (held by pid {note['pid']} on {note['host']} since {note['since']})"
    except (ValueError, KeyError, OSError):
        return ""


@contextmanager
def _host_lock(
    target: str, name: str, timeout_seconds: float, logger: logging.Logger | logging.LoggerAdapter
) -> Iterator[None]:
    import fcntl

    path = host_lock_folder() / f"{name}.lock"
    with open(path, "a+", encoding="utf-8") as file:
        deadline = time.monotonic() + timeout_seconds
        waiting = False
        while True:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    logger.info("waiting for the lock on %s%s", target, _holder(file))
                    waiting = True
                if time.monotonic() >= deadline:
                    raise LockNotAcquired(
                        f"a run is using {target}{_holder(file)}: retry when it has finished"
                    ) from None
                time.sleep(POLL_SECONDS)
        try:
            file.seek(0)
            file.truncate()
            file.write(
                json.dumps(
                    {
                        "pid": os.getpid(),
                        "host": socket.gethostname(),
                        "target": target,
                        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    }
                )
            )
            file.flush()
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


@contextmanager
def exclusive(*urls: str | None, timeout_seconds: float = LOCK_TIMEOUT_SECONDS) -> Iterator[list[str]]:
    """Hold the lock of every target in ``urls`` (normalised URLs; None is skipped) for the block.

    Raises:
        LockNotAcquired: another run held one of the locks for ``timeout_seconds``.
    """
    targets = sorted({url for url in urls if url})  # one order everywhere: two runs never wait on each other
    names = [lock_name(url) for url in targets]
    try:
        logger: logging.Logger | logging.LoggerAdapter = get_run_logger()
    except MissingContextError:  # outside a flow (`ptqflow promote`, `rollback`): their own messages only
        logger = logging.getLogger("ptqflow.locks")
    if os.environ.get(SWITCH, "").lower() == "off":
        logger.info("%s=off: running without the lock on %s", SWITCH, ", ".join(targets))
        yield []
        return
    if not _coordinated_by_a_server():
        with ExitStack() as held:
            deadline = time.monotonic() + timeout_seconds
            for target, name in zip(targets, names):
                held.enter_context(_host_lock(target, name, max(0.0, deadline - time.monotonic()), logger))
            logger.info("holding the lock on %s (this host)", ", ".join(targets))
            yield names
        return

    from prefect.concurrency.sync import concurrency

    _ensure_limits(names)
    logger.info("waiting for the lock on %s", ", ".join(targets))
    with ExitStack() as held:
        try:
            held.enter_context(
                concurrency(names, occupy=1, timeout_seconds=timeout_seconds, lease_duration=LEASE_SECONDS, strict=True)
            )
        except TimeoutError:
            raise LockNotAcquired(
                f"a run is using {', '.join(targets)} (it holds the lock; `ptqflow runs` or the Prefect UI shows it): "
                "retry when it has finished"
            ) from None
        logger.info("holding the lock on %s", ", ".join(targets))
        yield names
