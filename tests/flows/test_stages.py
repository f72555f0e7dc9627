"""Which failures a stage retries: transient storage and network errors only."""

from __future__ import annotations

import errno

import pytest

from ptqflow.flows.stages import is_transient_error
from ptqflow.storage.store import ArtifactCorrupted, UnsafeKey
from ptqflow.storage.tables import TensorTableError
from ptqflow.tasks.core.errors import ConversionFailed, InvalidDataset


class EndpointConnectionError(Exception):
    """Named like botocore's, which does not derive from OSError."""


@pytest.mark.parametrize(
    "error",
    [ConnectionResetError(), TimeoutError(), OSError(5, "I/O error"), EndpointConnectionError("could not connect")],
)
def test_network_and_storage_io_errors_are_retried(error):
    assert is_transient_error(error)


@pytest.mark.parametrize(
    "error",
    [
        InvalidDataset("x"),
        ConversionFailed("x"),
        ArtifactCorrupted("x"),
        UnsafeKey("x"),
        TensorTableError("x"),
        FileNotFoundError("x"),
        ValueError("x"),
        KeyError("x"),
    ],
)
def test_input_and_code_errors_are_not(error):
    assert not is_transient_error(error)


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/store/blobs/ab/x.tmp-1"),
            "the storage is full at /data/store/blobs/ab/x.tmp-1 (No space left on device): free space",
        ),
        (OSError(errno.EROFS, "Read-only file system"), "the storage is read-only (Read-only file system)"),
        (PermissionError(errno.EACCES, "Permission denied"), "the storage refuses writes (permission denied)"),
    ],
)
def test_full_or_read_only_storage_is_said_so_and_not_retried(error, line):
    from ptqflow.flows.stages import storage_refusal

    assert line in storage_refusal(error) and not is_transient_error(error)


def test_a_lock_held_too_long_is_said_so_and_not_called_unreachable():
    from ptqflow.flows.locks import LockNotAcquired
    from ptqflow.flows.stages import storage_refusal

    error = LockNotAcquired("a run is using file:///s (held by pid 7): retry when it has finished")
    assert storage_refusal(error) == str(error) and not is_transient_error(error)
    assert storage_refusal(ConnectionResetError()) is None


def test_a_stage_past_its_time_limit_fails_once_with_a_clear_error(prefect_server, tmp_path):
    import time

    from prefect import flow, task

    from ptqflow.flows.stages import StageRunner
    from ptqflow.storage.store import ArtifactStore
    from ptqflow.tasks.core.artifacts import CalibrationSet
    from ptqflow.tasks.core.caching import StageCachePolicy
    from ptqflow.tasks.core.errors import StageTimedOut

    attempts = []

    @task(
        name="slow_stage", cache_policy=StageCachePolicy(module=__name__), persist_result=True, result_serializer="json"
    )
    def slow_stage(store_url: str) -> CalibrationSet:
        attempts.append(1)
        for _ in range(300):  # Python steps, like training batches: the time limit stops it between them
            time.sleep(0.1)
        raise AssertionError("should have been stopped")

    @flow(persist_result=False)
    def one_stage() -> None:
        StageRunner(ArtifactStore(str(tmp_path / "store")), timeouts={"slow_stage": 2})(slow_stage)

    started = time.monotonic()
    with pytest.raises(StageTimedOut, match="slow_stage ran longer than its 2 s limit and was stopped"):
        one_stage()
    assert attempts == [1]  # a timeout is not retried
    assert time.monotonic() - started < 25


def test_stages_run_on_a_task_runner_get_the_seconds_prefect_recorded(prefect_server, tmp_path):
    import time
    import uuid

    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    from ptqflow.flows.stages import StageRunner
    from ptqflow.storage.store import ArtifactStore
    from ptqflow.tasks.core.artifacts import CalibrationSet
    from ptqflow.tasks.core.caching import StageCachePolicy

    @task(
        name="one_second_stage",
        cache_policy=StageCachePolicy(module=__name__),
        persist_result=True,
        result_serializer="json",
    )
    def one_second_stage(store_url: str) -> CalibrationSet:
        time.sleep(1.0)
        return CalibrationSet(table=ArtifactStore(store_url).put_bytes(b"rows", ".parquet"), samples=1)

    @flow(persist_result=False, task_runner=ThreadPoolTaskRunner(max_workers=1))
    def submitted_stage(unknown_runs: list[str] | None = None) -> dict:
        run = StageRunner(ArtifactStore(str(tmp_path / "store")))
        run.collect(run.submit(one_second_stage))
        assert run.records["one_second_stage"].seconds is None  # the wait in collect is not the run time
        for i, unknown_run in enumerate(unknown_runs or []):  # task runs the API never shows as finished
            run.records[f"lost_stage[{i}]"] = run.records["one_second_stage"].model_copy(update={"seconds": None})
            run._worker_runs[f"lost_stage[{i}]"] = uuid.UUID(unknown_run)
        started = time.monotonic()
        run.record_worker_seconds(wait_seconds=1.0)
        return {"records": run.records, "waited": time.monotonic() - started}

    first = submitted_stage()["records"]["one_second_stage"]
    assert not first.cached and 1.0 <= first.seconds < 10
    # More stages than the API returns in one read (its limit is 200).
    rerun = submitted_stage(unknown_runs=[str(uuid.uuid4()) for _ in range(250)])
    cached = rerun["records"]["one_second_stage"]
    assert cached.cached and cached.seconds is not None and cached.seconds < first.seconds
    lost = [r for name, r in rerun["records"].items() if name.startswith("lost_stage[")]
    assert len(lost) == 250 and all(r.seconds is None for r in lost) and 1.0 <= rerun["waited"] < 5
