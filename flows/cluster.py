"""Where a flow's submitted stages run: a Dask cluster (an existing one, or a LocalCluster of worker processes),
or this process's threads; and the Prefect API the workers of a cluster share."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

from ptqflow.flows.locks import TEMPORARY_SERVER_ENV

DASK_ADDRESS_ENV = "PTQFLOW_DASK_ADDRESS"
DASK_WORKERS_ENV = "PTQFLOW_DASK_WORKERS"
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
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


class TemporaryPrefectServer:
    """Prefect's temporary API server, run as Prefect's ``SubprocessASGIServer`` runs it (uvicorn on
    ``prefect.server.api.server:create_app``, the UI off, marked ephemeral), without importing that module here:
    its FastAPI app and every route cost this process about 3 s of a cold run (measured on a 2-core EPYC), while
    the server's own process imports them anyway. ``tests/flows/test_cluster.py`` checks the command against
    Prefect's, so an upgrade that changes it fails there."""

    def __init__(self) -> None:
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def command(self) -> list[str]:
        import prefect

        return [
            sys.executable,
            *("-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent)),
            *("--factory", "prefect.server.api.server:create_app"),
            *("--host", "127.0.0.1", "--port", str(self.port)),
            *("--log-level", "error", "--lifespan", "on"),
        ]

    def environment(self) -> dict[str, str]:
        from prefect.settings import get_current_settings

        ephemeral = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        return {**os.environ, **ephemeral, **get_current_settings().to_environment_variables(exclude_unset=True)}

    def launch(self) -> None:
        """Start the server's process on a free port; it answers once it has imported and migrated."""
        self.port = _free_port()
        self.process = subprocess.Popen(self.command(), env=self.environment())

    def wait_until_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            code = self.process.poll()
            if code == 3:  # uvicorn could not bind: another process took the port in between
                self.launch()
                continue
            if code is not None:
                raise RuntimeError(
                    f"Prefect's temporary server exited with code {code} while starting (its errors are above): "
                    "fix them, or point PREFECT_API_URL at a running Prefect server"
                )
            try:
                with _DIRECT.open(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:  # not listening yet
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"Prefect's temporary server did not answer within {timeout:.0f} s: raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or point PREFECT_API_URL at a running Prefect server"
        )

    def stop(self) -> None:
        """Terminate the server and wait for it (5 s, then a kill), as Prefect's own stop does."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# The server is on this host: an HTTP(S)_PROXY of the environment must not carry the health check elsewhere.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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
    server = TemporaryPrefectServer()
    server.launch()
    try:
        if meanwhile is not None:
            meanwhile()
        # Prefect's default (20 s) is short for a 2-core machine that is importing TensorFlow meanwhile.
        server.wait_until_healthy(timeout=float(os.environ.get(STARTUP_TIMEOUT_ENV) or 180))
    except BaseException:
        server.stop()
        raise
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
        if exiting_after and server.process is not None:
            server.process.terminate()  # before this returns: an exit now must not leave the server running
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
