"""The Prefect API a command's flow and workers share: a temporary server when none is configured."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request

import pytest

from ptqflow.flows.cluster import TemporaryPrefectServer


@pytest.fixture
def no_api_url(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(updates={PREFECT_API_URL: None}):
        yield


def test_the_temporary_server_runs_as_prefects_own_would(monkeypatch, tmp_path):
    """The server is started without importing Prefect's SubprocessASGIServer: the same command and environment,
    so that a Prefect upgrade which changes how it runs its server fails here rather than in a user's run."""
    import prefect.server.api.server as prefect_server

    launched: dict = {}
    monkeypatch.setattr(prefect_server.subprocess, "Popen", lambda args, env: launched.update(args=args, env=env))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))  # a setting of the environment, passed on by both
    prefect_server.SubprocessASGIServer(port=8517)._run_uvicorn_command()

    ours = TemporaryPrefectServer()
    ours.port = 8517
    assert ours.command() == launched["args"]
    assert ours.environment() == launched["env"]


def test_the_temporary_server_answers_and_moves_off_a_port_taken_meanwhile(monkeypatch, no_api_url):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    import ptqflow.flows.cluster as cluster

    real_free_port = cluster._free_port
    monkeypatch.setattr(cluster, "_free_port", lambda: next(ports, None) or real_free_port())
    server = TemporaryPrefectServer()
    try:
        server.launch()
        server.wait_until_healthy(timeout=120)
        assert server.port != taken.getsockname()[1]
        with urllib.request.urlopen(f"{server.api_url}/health", timeout=5) as response:
            assert response.status == 200
        process = server.process
    finally:
        server.stop()
        taken.close()
    assert process is not None and process.poll() is not None


def test_a_server_that_fails_to_start_is_named_with_the_fix(monkeypatch, no_api_url):
    monkeypatch.setattr(TemporaryPrefectServer, "command", lambda self: [sys.executable, "-c", "raise SystemExit(1)"])
    server = TemporaryPrefectServer()
    server.launch()
    with pytest.raises(RuntimeError, match="exited with code 1 while starting.*PREFECT_API_URL"):
        server.wait_until_healthy(timeout=60)


@pytest.fixture
def slow_to_stop(monkeypatch, no_api_url):
    """The server stands in as a process that takes 3 s to stop once told to."""
    script = (
        "import signal, time; signal.signal(signal.SIGTERM, lambda *_: time.sleep(3) or exit()); "
        "print('ready', flush=True); time.sleep(60)"
    )

    def launch(self) -> None:
        self.port = 8599
        self.process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)

    def wait_until_healthy(self, timeout: float) -> None:
        assert self.process.stdout.readline() == "ready\n"  # its SIGTERM handler is in place

    monkeypatch.setattr(TemporaryPrefectServer, "launch", launch)
    monkeypatch.setattr(TemporaryPrefectServer, "wait_until_healthy", wait_until_healthy)


@pytest.mark.parametrize("exiting_after", [False, True])
def test_a_temporary_server_is_stopped_and_a_command_does_not_wait_for_it(slow_to_stop, monkeypatch, exiting_after):
    from prefect.settings import get_current_settings

    from ptqflow.flows.cluster import shared_prefect_api

    made: list[TemporaryPrefectServer] = []
    real_init = TemporaryPrefectServer.__init__
    monkeypatch.setattr(TemporaryPrefectServer, "__init__", lambda self: real_init(self) or made.append(self))
    with shared_prefect_api(exiting_after=exiting_after):
        settings = get_current_settings()
        assert str(settings.api.url) == "http://127.0.0.1:8599/api"
        assert settings.flows.heartbeat_frequency is None  # nothing lasts to mark a crashed run with them
        process = made[0].process
    assert process is not None
    if exiting_after:
        assert process.poll() is None  # told to stop (below), still stopping: not waited for
        process.wait(timeout=10)
        assert process.returncode == 0  # it stopped by its SIGTERM handler, not a kill
    else:
        assert process.returncode == 0


def test_the_server_is_stopped_when_the_work_meanwhile_fails(slow_to_stop, monkeypatch):
    from ptqflow.flows.cluster import shared_prefect_api

    made: list[TemporaryPrefectServer] = []
    real_launch = TemporaryPrefectServer.launch
    monkeypatch.setattr(TemporaryPrefectServer, "launch", lambda self: real_launch(self) or made.append(self))
    process = None

    def failing_import() -> None:
        nonlocal process
        process = made[0].process
        raise ImportError("no TensorFlow")

    with pytest.raises(ImportError), shared_prefect_api(meanwhile=failing_import):
        pass
    assert process is not None and process.poll() is not None
