"""Running a stage inside a flow: result storage in the artifact store, timing, and cache-hit bookkeeping."""

from __future__ import annotations

import time
from typing import Any, TypeVar

from prefect import Task
from pydantic import BaseModel

from storage.store import ArtifactStore
from tasks.artifacts import StageOutput
from tasks.progress import report

Output = TypeVar("Output", bound=StageOutput)


class StageRecord(BaseModel):
    cached: bool
    seconds: float


class StageRunner:
    """Runs stages against one store and remembers, per stage, whether it was a cache hit and how long it took."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self.result_storage = store.prefect_result_storage()
        self.records: dict[str, StageRecord] = {}

    def __call__(self, stage: Task[..., Output], **inputs: Any) -> Output:
        name = stage.name
        configured = stage.with_options(result_storage=self.result_storage)
        report(name, "starting")
        started = time.perf_counter()
        state = configured(store_url=self.store.url, **inputs, return_state=True)
        output: Output = state.result()
        cached = state.name == "Cached"
        if cached and not all(self.store.exists(ref) for ref in output.artifact_refs()):
            # The cache record outlived its blobs (e.g. someone pruned the store): recompute instead of handing
            # the next stage a reference to nothing.
            report(name, "cached artifacts missing from the store; recomputing")
            state = configured.with_options(refresh_cache=True)(store_url=self.store.url, **inputs, return_state=True)
            output = state.result()
            cached = False
        seconds = round(time.perf_counter() - started, 3)
        self.records[name] = StageRecord(cached=cached, seconds=seconds)
        report(name, f"{'cached' if cached else 'done'} in {seconds:.1f}s")
        return output
