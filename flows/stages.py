"""Running a stage inside a flow: result storage in the artifact store, retries on flaky storage, verification of
every artifact a stage hands on, and cache-hit bookkeeping."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID

from prefect import Task, get_run_logger
from prefect.futures import PrefectFuture

from ptqflow.storage.errors import refused_by_storage
from ptqflow.storage.results import result_storage_for
from ptqflow.storage.store import ArtifactCorrupted, ArtifactMissing, ArtifactStore, ForeignReference, StoreError
from ptqflow.storage.tables import TensorTableError
from ptqflow.tasks.core.artifacts import StageOutput
from ptqflow.tasks.core.errors import PtqflowError, StageTimedOut
from ptqflow.tasks.core.progress import report
from ptqflow.tasks.release.outcome import StageRecord

Output = TypeVar("Output", bound=StageOutput)

# Transient storage failures (a dropped connection, a throttled bucket) are retried with backoff; errors in the
# user's input or model are not, since a retry cannot fix them.
STORAGE_RETRY_DELAYS_SECONDS = [2.0, 8.0]
USER_ERRORS = (PtqflowError, StoreError, TensorTableError)
NOT_TRANSIENT = (*USER_ERRORS, ValueError, TypeError, KeyError, FileNotFoundError)


def storage_refusal(error: BaseException) -> str | None:
    """One line for a run that failed because the storage refused (full, read-only, locked by another run), or
    None for any other error."""
    from ptqflow.flows.locks import LockNotAcquired

    if isinstance(error, LockNotAcquired):
        return str(error)
    refusal = refused_by_storage(error, "--store")
    return f"{refusal}; completed stages are reused on the rerun" if refusal else None


# What the storage backends raise when they find no credentials at all (botocore, google-auth, azure-identity).
NO_CREDENTIALS = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "DefaultCredentialsError",
    "CredentialUnavailableError",
}


def missing_credentials(error: BaseException) -> str | None:
    """One line for a run that failed because the storage backend found no credentials, with where to give them;
    None for any other error."""
    if type(error).__name__ not in NO_CREDENTIALS:
        return None
    return (
        f"no credentials for the storage ({type(error).__name__}: {str(error).splitlines()[0][:200]}): set the "
        "backend's own (AWS_ACCESS_KEY_ID / a profile, GOOGLE_APPLICATION_CREDENTIALS, ...), "
        "PTQFLOW_STORAGE_OPTIONS, or name a Prefect block with --storage-block / --export-block"
    )


def is_transient_error(error: BaseException) -> bool:
    """True for errors a retry may fix (network and storage I/O), False for problems with input or code, and
    for a stage stopped at its time limit (it would only run as long again)."""
    from prefect.task_engine import TaskRunTimeoutError

    if isinstance(error, (*NOT_TRANSIENT, TaskRunTimeoutError, StageTimedOut)) or storage_refusal(error):
        return False
    if isinstance(error, (OSError, TimeoutError, ConnectionError)):
        return True
    # botocore's and aiohttp's connection errors do not all derive from OSError.
    name = type(error).__name__.lower()
    return "connect" in name or "timeout" in name


def is_transient(task: Task, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry a failed stage only for transient errors (a stage that ran past its time
    limit is not: it would only do so again)."""
    if state.name == "TimedOut":
        return False
    try:
        state.result()
    except Exception as error:
        return is_transient_error(error)
    return False


def record_key(state: Any) -> str | None:
    """The name of the result record a stage's state was stored as or read from (its cache key); None for a stage
    that persists nothing. The state's own ``cache_key`` is not filled in on the state the caller gets back."""
    data = getattr(state, "data", None)
    key = getattr(data, "storage_key", None) or getattr(getattr(data, "metadata", None), "storage_key", None)
    return str(key).rsplit("/", 1)[-1] if key else None


# Guards against a runaway stage, far above any normal run: a scheduled run that never ends must fail and free the
# store's lock. Prefect stops a synchronous stage between Python steps (e.g. between training batches); a call
# blocked inside C code is stopped when it returns.
STAGE_TIMEOUT_SECONDS = {"train_float_model": 6 * 3600.0}
DEFAULT_STAGE_TIMEOUT_SECONDS = 2 * 3600.0
# How long record_worker_seconds waits for Prefect's API to show every worker stage's task run as finished.
WORKER_SECONDS_WAIT = 10.0
TASK_RUNS_PER_READ = 100


class StageRunner:
    """Runs stages against one store and remembers, per stage, whether it was a cache hit and how long it took."""

    def __init__(self, store: ArtifactStore, timeouts: dict[str, float] | None = None) -> None:
        self.store = store
        self.result_storage = result_storage_for(store)
        self.timeouts = {**STAGE_TIMEOUT_SECONDS, **(timeouts or {})}
        self.records: dict[str, StageRecord] = {}
        self._worker_runs: dict[str, UUID] = {}  # stages collected from workers whose seconds are not known yet

    def _bad_artifacts(self, output: StageOutput) -> list[str]:
        """Verify every artifact of ``output`` (full sha256); move corrupt ones aside. Returns what was wrong."""
        problems = []
        for ref in output.artifact_refs():
            try:
                self.store.verify(ref)
            except (ArtifactMissing, ForeignReference) as error:  # recomputed; nothing is moved or deleted
                problems.append(str(error))
            except ArtifactCorrupted as error:
                moved = self.store.quarantine(ref)
                problems.append(f"{error} (moved to {moved})")
        return problems

    @staticmethod
    def retrying(stage: Task, **options: Any) -> Task:
        """``stage`` with retries (and backoff) on transient storage errors."""
        return stage.with_options(
            retries=len(STORAGE_RETRY_DELAYS_SECONDS),
            retry_delay_seconds=STORAGE_RETRY_DELAYS_SECONDS,
            retry_condition_fn=is_transient,
            **options,
        )

    def effect(self, step: Task[..., Any], **inputs: Any) -> Any:
        """Run an uncached step that writes outside the stage cache (the manifest, an export), with retries."""
        get_run_logger().info("%s: starting", step.name)
        report(step.name, "starting")
        result = self.retrying(step)(store_url=self.store.url, **inputs)
        report(step.name, "done")
        return result

    def _configured(self, stage: Task[..., Output], label: str | None, timed: bool = True) -> Task[..., Output]:
        options: dict[str, Any] = {"result_storage": self.result_storage}
        if timed:
            options["timeout_seconds"] = self.timeouts.get(stage.name, DEFAULT_STAGE_TIMEOUT_SECONDS)
        configured = self.retrying(stage, **options)
        return configured.with_options(task_run_name=label) if label else configured

    def _starting(self, name: str) -> None:
        get_run_logger().info("%s: starting", name)
        report(name, "starting")

    def __call__(self, stage: Task[..., Output], label: str | None = None, **inputs: Any) -> Output:
        """Run ``stage`` (cached, retried, its cached outputs verified); ``label`` names a second run of the same
        stage in the records and the progress display."""
        name = label or stage.name
        self._starting(name)
        started = time.perf_counter()
        configured = self._configured(stage, label)
        state = configured(store_url=self.store.url, **inputs, return_state=True)
        output, cached = self._output(name, stage, configured, inputs, state)
        self._record(name, cached, round(time.perf_counter() - started, 3), record_key(state))
        return output

    def submit(self, stage: Task[..., Output], label: str | None = None, **inputs: Any) -> Submitted:
        """Start ``stage`` on the flow's task runner (a Dask worker, say) and return at once; ``collect`` waits
        for it. Inputs are references, so the stage needs nothing from this process but the store.

        No time limit here: on a task runner's worker thread Prefect cannot interrupt a stage (it only warns), so
        the flow's own limit is what bounds a sweep."""
        name = label or stage.name
        self._starting(name)
        configured = self._configured(stage, label, timed=False)
        future = configured.submit(store_url=self.store.url, **inputs)
        return Submitted(name=name, stage=stage, configured=configured, inputs=inputs, future=future)

    def collect(self, submitted: Submitted) -> Any:  # the stage's output; Submitted does not carry its type
        """Wait for a submitted stage; the same checks as a stage run here. Its seconds are not the wait here
        (that includes the time it queued for a worker): ``record_worker_seconds`` fills them in later."""
        submitted.future.wait()
        state = submitted.future.state
        output, cached = self._output(submitted.name, submitted.stage, submitted.configured, submitted.inputs, state)
        self._record(submitted.name, cached, None, record_key(state))
        self._worker_runs[submitted.name] = submitted.future.task_run_id
        return output

    def record_worker_seconds(self, wait_seconds: float = WORKER_SECONDS_WAIT) -> None:
        """Fill in the seconds of the stages collected from a task runner's workers, from Prefect's records of
        their task runs. Done once, late, and waiting at most ``wait_seconds``: the API learns that a task run
        ended from its worker's events, which can arrive after its result. A stage whose run the API does not show
        as finished by then keeps ``seconds=None``."""
        pending = dict(self._worker_runs)
        deadline = time.monotonic() + wait_seconds
        while pending:
            finished = finished_task_run_seconds(pending)
            for name, seconds in (finished or {}).items():
                self.records[name] = self.records[name].model_copy(update={"seconds": seconds})
                del pending[name]
            if finished is None or not pending or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        self._worker_runs = pending

    def _output(self, name: str, stage: Task, configured: Task, inputs: dict[str, Any], state: Any) -> tuple[Any, bool]:
        if state.name == "TimedOut":
            timeout = self.timeouts.get(stage.name, DEFAULT_STAGE_TIMEOUT_SECONDS)
            raise StageTimedOut(
                f"{name} ran longer than its {timeout:.0f} s limit and was stopped: look for a stalled data source "
                "or store in its logs, then rerun; completed stages are reused"
            )
        output = state.result()
        cached = state.name == "Cached"
        problems = self._bad_artifacts(output) if cached else []
        if problems:
            # The cache record outlived or lost its blobs: recompute instead of handing the next stage a
            # reference to nothing or to damaged bytes.
            for problem in problems:
                get_run_logger().warning("%s: %s; recomputing", name, problem)
            report(name, "cached artifacts missing or corrupt; recomputing")
            state = configured.with_options(refresh_cache=True)(store_url=self.store.url, **inputs, return_state=True)
            output, cached = state.result(), False
        return output, cached

    def _record(self, name: str, cached: bool, seconds: float | None, cache_key: str | None) -> None:
        self.records[name] = StageRecord(cached=cached, seconds=seconds, cache_key=cache_key)
        outcome = ("cached" if cached else "done") + (f" in {seconds:.1f}s" if seconds is not None else "")
        get_run_logger().info("%s: %s", name, outcome)
        report(name, outcome)


def finished_task_run_seconds(task_runs: dict[str, UUID]) -> dict[str, float] | None:
    """For each named task run that Prefect's API shows as finished, how long it ran (``total_run_time``: time in
    the Running state, which leaves out the queue for a worker; for a cache hit, the lookup). Runs not finished
    there yet are left out; None if the API cannot be reached."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId

    names = {run_id: name for name, run_id in task_runs.items()}
    ids = list(names)
    runs = []
    try:
        with get_client(sync_client=True) as client:
            # In pages: the API refuses a limit above its default (200), and a large grid has more stages.
            for start in range(0, len(ids), TASK_RUNS_PER_READ):
                page = ids[start : start + TASK_RUNS_PER_READ]
                runs += client.read_task_runs(
                    task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=page)), limit=len(page)
                )
    except httpx.HTTPError as error:
        get_run_logger().debug("no run times for the stages run on workers: %s", error)
        return None
    return {
        names[run.id]: round(run.total_run_time.total_seconds(), 3)
        for run in runs
        if run.id in names and run.state is not None and run.state.is_final()
    }


@dataclass
class Submitted:
    """A stage started with ``StageRunner.submit``: what ``collect`` needs to check its result."""

    name: str
    stage: Task
    configured: Task
    inputs: dict[str, Any]
    future: PrefectFuture


def sweep_leftovers(held_locks: list[str], *stores: ArtifactStore | None) -> None:
    """With the stores' locks held (``held_locks`` from ``flows.locks.exclusive``), delete the temporary files of
    writers that were killed between writing and renaming, once older than the lock's lease."""
    from ptqflow.flows.locks import LEASE_SECONDS

    if not held_locks:  # without the lock another run may be writing them right now
        return
    for store in stores:
        for uri in store.sweep_temporaries(LEASE_SECONDS) if store else []:
            get_run_logger().info("removed %s, left by a writer that was killed mid-write", uri)
