"""Where a flow's submitted stages run: a Dask cluster (an existing one, or a LocalCluster of worker processes),
or this process's threads; and the Prefect API the workers of a cluster share."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

from ptqflow.flows.locks import TEMPORARY_SERVER_ENV

DASK_ADDRESS_ENV = "PTQFLOW_DASK_ADDRESS"
DASK_WORKERS_ENV = "PTQFLOW_DASK_WORKERS"
WORKER_PRELOAD = "ptqflow.flows.dask_worker"  # what the LocalCluster's workers run as they close


def dask_task_runner(address: str | None = None, workers: int | None = None) -> Any:
    """prefect-dask's runner: the cluster at ``address`` (or ``PTQFLOW_DASK_ADDRESS``), else a LocalCluster of
    ``workers`` (or ``PTQFLOW_DASK_WORKERS``, default 2) single-threaded worker processes."""
    from prefect_dask import DaskTaskRunner

    address = address or os.environ.get(DASK_ADDRESS_ENV) or None
    if address:
        return DaskTaskRunner(address=address)
    workers = workers or int(os.environ.get(DASK_WORKERS_ENV) or 2)
    # Processes, one task each: one conversion per core, and no TensorFlow state shared between conversions. Each
    # worker's TensorFlow and oneDNN get its share of the cores, not all of them: otherwise two workers would run
    # twice as many threads as there are cores.
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    env = {"TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": threads, "OMP_NUM_THREADS": threads}
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "env": env,
            "preload": [WORKER_PRELOAD],
        },
    )


@contextmanager
def shared_prefect_api(meanwhile: Callable[[], None] | None = None, exiting_after: bool = False) -> Iterator[None]:
    """Without PREFECT_API_URL, start a temporary Prefect server for the flow and whatever it starts (Dask workers
    are other processes, which would each start their own; they inherit the environment), as Prefect would for the
    flow alone. ``meanwhile`` runs while the server starts (its own process, on another core): a cold run imports
    TensorFlow then, instead of waiting for the server after it. ``exiting_after``: the process exits next (a
    command), so the server is told to stop and left to finish on its own (its shutdown took 1.4 s of every cold
    run); everything the run sends it has been answered or drained by then."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if PREFECT_API_URL.value():
        if meanwhile is not None:
            meanwhile()
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    timeout = int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 180)
    with ThreadPoolExecutor(max_workers=1) as starting:
        started = starting.submit(server.start, timeout=timeout)
        if meanwhile is not None:
            meanwhile()
        started.result()  # the server's start-up failure, if any, raised here
    os.environ["PREFECT_API_URL"] = os.environ[TEMPORARY_SERVER_ENV] = server.api_url
    try:
        # No flow-run heartbeats: they let a lasting server mark a crashed run, and this server ends with the run.
        # Each cost the run's end up to a second, waiting for the heartbeat thread's sleep.
        with temporary_settings(updates={PREFECT_API_URL: server.api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield
    finally:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        # Send what is queued while the server is up: afterwards each send would wait for a connection timeout.
        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
        os.environ.pop("PREFECT_API_URL", None)
        os.environ.pop(TEMPORARY_SERVER_ENV, None)
        if exiting_after and server.server_process is not None:
            server.server_process.terminate()  # before this returns: an exit now must not leave the server running
            threading.Thread(target=server.stop, name="ptqflow-prefect-server-stop", daemon=True).start()
        else:
            server.stop()


def pipeline_task_runner(address: str | None = None) -> Any:
    """Where the flow's submitted stages (validation's shards) run: the Dask cluster at ``address`` (or
    ``PTQFLOW_DASK_ADDRESS``, which a deployment's work pool sets for its runs), else this process's threads, one
    per core: Prefect's default would start every shard at once, each with its own models and rows."""
    address = address or os.environ.get(DASK_ADDRESS_ENV) or None
    if address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=address)
    return ThreadPoolTaskRunner(max_workers=os.cpu_count() or 1)
