"""One run at a time per artifact store and per export target, across every run a Prefect server coordinates
(schedules, the UI, deployments, the CLI pointed at that server): a Prefect global concurrency limit of 1 per
target, created on first use.

Content addressing already makes concurrent runs safe for the blobs; the lock keeps a scheduled run and a run
started from the UI from racing on the same export pointer and from doing the same work twice. Runs that use
their own ephemeral Prefect server (the CLI without PREFECT_API_URL) coordinate through nothing but the store.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

LOCK_TIMEOUT_SECONDS = 6 * 3600  # longer than any sane run: a lock held this long belongs to a stuck run
# The holder renews its lease while it lives; a killed holder's lease lapses after this (Prefect's minimum), and
# the server's lease service then frees the lock.
LEASE_SECONDS = 60
SWITCH = "PTQFLOW_STORE_LOCK"  # "off": no lock (a single user on a private store)


def lock_name(url: str) -> str:
    # Limit names are shown in the UI and must be plain: a digest of the normalised URL.
    return f"ptqflow-target-{hashlib.sha256(url.encode()).hexdigest()[:20]}"


def _ensure_limits(names: list[str]) -> None:
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                except httpx.HTTPStatusError as error:
                    if error.response.status_code != 409:  # 409: another run created it first
                        raise


@contextmanager
def exclusive(*urls: str | None, timeout_seconds: float = LOCK_TIMEOUT_SECONDS) -> Iterator[list[str]]:
    """Hold the lock of every target in ``urls`` (normalised URLs; None is skipped) for the block."""
    from prefect.concurrency.sync import concurrency

    targets = sorted({url for url in urls if url})
    names = [lock_name(url) for url in targets]
    try:
        logger = get_run_logger()
    except MissingContextError:  # outside a flow (`ptqflow promote`, `rollback`): their own messages only
        logger = logging.getLogger("ptqflow.locks")
    if os.environ.get(SWITCH, "").lower() == "off":
        logger.info("%s=off: running without the lock on %s", SWITCH, ", ".join(targets))
        yield []
        return
    _ensure_limits(names)
    logger.info("waiting for the lock on %s", ", ".join(targets))
    with concurrency(names, occupy=1, timeout_seconds=timeout_seconds, lease_duration=LEASE_SECONDS, strict=True):
        logger.info("holding the lock on %s", ", ".join(targets))
        yield names
