"""The Prefect API a command's flow and workers share: a temporary server when none is configured."""

from __future__ import annotations

import subprocess
import sys

import pytest


class _Server:
    """Stands in for Prefect's SubprocessASGIServer: a process that takes 3 s to stop once told to."""

    def __init__(self) -> None:
        self.api_url = "http://127.0.0.1:8599/api"
        self.server_process: subprocess.Popen | None = None

    def start(self, timeout: int) -> None:
        slow_to_stop = (
            "import signal, time; signal.signal(signal.SIGTERM, lambda *_: time.sleep(3) or exit()); "
            "print('ready', flush=True); time.sleep(60)"
        )
        self.server_process = subprocess.Popen([sys.executable, "-c", slow_to_stop], stdout=subprocess.PIPE, text=True)
        assert self.server_process.stdout is not None
        assert self.server_process.stdout.readline() == "ready\n"  # its SIGTERM handler is in place

    def stop(self) -> None:
        if self.server_process is not None:
            self.server_process.terminate()
            self.server_process.wait()


@pytest.fixture
def server(monkeypatch):
    import prefect.server.api.server
    from prefect.settings import PREFECT_API_URL, temporary_settings

    made = _Server()
    monkeypatch.setattr(prefect.server.api.server, "SubprocessASGIServer", lambda: made)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(updates={PREFECT_API_URL: None}):
        yield made


@pytest.mark.parametrize("exiting_after", [False, True])
def test_a_temporary_server_is_stopped_and_a_command_does_not_wait_for_it(server, exiting_after):
    from prefect.settings import get_current_settings

    from ptqflow.flows.cluster import shared_prefect_api

    with shared_prefect_api(exiting_after=exiting_after):
        settings = get_current_settings()
        assert str(settings.api.url) == server.api_url
        assert settings.flows.heartbeat_frequency is None  # nothing lasts to mark a crashed run with them
        process = server.server_process
    assert process is not None
    if exiting_after:
        assert process.poll() is None  # told to stop (below), still stopping: not waited for
        process.wait(timeout=10)
        assert process.returncode == 0  # it stopped by its SIGTERM handler, not a kill
    else:
        assert process.returncode == 0
