"""Which failures a stage retries: transient storage and network errors only."""

from __future__ import annotations

import pytest

from flows.stages import is_transient_error
from storage.store import ArtifactCorrupted, UnsafeKey
from storage.tables import TensorTableError
from tasks.errors import ConversionFailed, InvalidDataset


class EndpointConnectionError(Exception):
    """Named like botocore's, which does not derive from OSError."""


@pytest.mark.parametrize("error", [ConnectionResetError(), TimeoutError(), OSError(5, "I/O error"),
                                   EndpointConnectionError("could not connect")])
def test_network_and_storage_io_errors_are_retried(error):
    assert is_transient_error(error)


@pytest.mark.parametrize("error", [InvalidDataset("x"), ConversionFailed("x"), ArtifactCorrupted("x"),
                                   UnsafeKey("x"), TensorTableError("x"), FileNotFoundError("x"), ValueError("x"),
                                   KeyError("x")])
def test_input_and_code_errors_are_not(error):
    assert not is_transient_error(error)


def test_a_stage_past_its_time_limit_fails_once_with_a_clear_error(prefect_server, tmp_path):
    import time

    from prefect import flow, task

    from flows.stages import StageRunner
    from storage.store import ArtifactStore
    from tasks.artifacts import CalibrationSet
    from tasks.caching import StageCachePolicy
    from tasks.errors import StageTimedOut

    attempts = []

    @task(name="slow_stage", cache_policy=StageCachePolicy(module=__name__), persist_result=True,
          result_serializer="json")
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
