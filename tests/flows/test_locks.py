"""The store and export lock without a Prefect server: a host-wide flock that a killed holder cannot keep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ptqflow.flows.locks import LOCK_DIR, LockNotAcquired, exclusive


@pytest.fixture
def no_server(tmp_path, monkeypatch):
    """No PREFECT_API_URL (the CLI on its own), and a lock folder of the test's own."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv(LOCK_DIR, str(tmp_path / "locks"))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield tmp_path


def hold_in_a_process(target: str, lock_dir: str) -> subprocess.Popen:
    """Another process that takes the lock on ``target`` and says so, then sleeps holding it."""
    code = textwrap.dedent(f"""
        import time
        from prefect.settings import PREFECT_API_URL, temporary_settings
        from ptqflow.flows.locks import exclusive
        with temporary_settings(restore_defaults={{PREFECT_API_URL}}), exclusive({target!r}):
            print("holding", flush=True)
            time.sleep(600)
    """)
    env = {**os.environ, LOCK_DIR: lock_dir}
    env.pop("PREFECT_API_URL", None)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
    return holder


def test_a_held_lock_makes_the_next_run_wait_and_names_the_holder(no_server):
    holder = hold_in_a_process("file:///data/store", os.environ[LOCK_DIR])
    try:
        started = time.monotonic()
        with pytest.raises(LockNotAcquired, match=rf"a run is using file:///data/store \(held by pid {holder.pid}"):
            with exclusive("file:///data/store", timeout_seconds=1.5):
                pass
        assert time.monotonic() - started >= 1.5
        with exclusive("file:///data/other", timeout_seconds=1):  # another target is free
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_killed_with_sigkill_never_blocks_the_next_run(no_server):
    holder = hold_in_a_process("s3://bucket/export", os.environ[LOCK_DIR])
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    with exclusive("s3://bucket/export", "file:///data/store", timeout_seconds=5) as names:
        assert len(names) == 2
    assert time.monotonic() - started < 2  # at once: the kernel dropped the dead holder's lock


def test_the_lock_is_released_when_the_block_ends_or_raises(no_server):
    with pytest.raises(RuntimeError), exclusive("file:///data/store", timeout_seconds=1):
        raise RuntimeError("a stage failed")
    with exclusive("file:///data/store", timeout_seconds=1):
        pass


def test_a_limit_another_run_created_first_is_used_as_it_is(prefect_server, monkeypatch):
    """Two runs on a new store: both read no limit, both create it, and the later one's create meets Prefect's 409
    (its client raises ObjectAlreadyExists): that run goes on with the limit the other created."""
    import uuid

    from prefect.client.orchestration import SyncPrefectClient, get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    from ptqflow.flows.locks import _ensure_limits

    name = f"ptqflow-test-{uuid.uuid4().hex[:10]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))

    def read_before_the_other_run_created_it(self, name):
        raise ObjectNotFound(http_exc=Exception(name))

    monkeypatch.setattr(
        SyncPrefectClient, "read_global_concurrency_limit_by_name", read_before_the_other_run_created_it
    )
    _ensure_limits([name])


def test_the_temporary_server_a_command_starts_for_itself_is_no_server_to_coordinate_on(monkeypatch):
    """Its slots would outlive a killed run (they die with it nowhere): the flock is used, as without a server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ptqflow.flows.locks import TEMPORARY_SERVER_ENV, _coordinated_by_a_server

    monkeypatch.setenv(TEMPORARY_SERVER_ENV, "http://127.0.0.1:8517/api")
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:8517/api"}):
        assert not _coordinated_by_a_server()
    with temporary_settings(updates={PREFECT_API_URL: "http://prefect.internal:4200/api"}):
        assert _coordinated_by_a_server()
