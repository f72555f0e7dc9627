"""The commands over what runs left behind: ``runs``, ``show``, ``promote``, ``rollback``, ``sync-registry`` and
``gc``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from typing import Annotated, Any

import typer
from rich.console import Console

from ptqflow.flows.cli.common import EXIT_INVALID_INPUT, EXIT_RUN_FAILED, err_console, fail
from ptqflow.flows.cli.options import (
    LockWaitOption,
    MlflowUriOption,
    RegisteredModelOption,
    RequiredExportOption,
    StoreOption,
)


def _open_store(store: str):
    from ptqflow.storage.store import ArtifactStore, StoreError

    try:
        return ArtifactStore(store)
    except StoreError as error:
        fail(str(error), EXIT_INVALID_INPUT, as_json=False)


def runs(
    store: StoreOption = "./ptqflow-store",
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifests as a JSON list.")] = False,
) -> None:
    """List the complete runs in a store, newest first."""
    from ptqflow.storage.store import StoreError
    from ptqflow.tasks.release.manifest import list_manifests

    try:
        manifests, unreadable = list_manifests(_open_store(store))
    except StoreError as error:
        fail(str(error), EXIT_INVALID_INPUT, as_json=as_json)
    for problem in unreadable:  # skipped, named: one bad file must not hide every run
        err_console.print(f"skipped {problem}", highlight=False, soft_wrap=True)
    if as_json:
        print(json.dumps([manifest.document() for manifest in manifests]))
        return
    if not manifests:
        err_console.print(f"no complete runs in {store}")
        return
    from ptqflow.tasks.views.render import print_runs

    print_runs(manifests, Console(width=None if err_console.is_terminal else 120))


def show(
    run_id: Annotated[str, typer.Argument(help="A run id, or a unique prefix of one.")],
    store: StoreOption = "./ptqflow-store",
) -> None:
    """Print one run's manifest (JSON)."""
    from ptqflow.storage.store import StoreError
    from ptqflow.tasks.release.manifest import find_manifest

    try:
        manifest = find_manifest(_open_store(store), run_id)
    except (LookupError, StoreError) as error:
        fail(str(error), EXIT_INVALID_INPUT, as_json=False)
    print(manifest.to_bytes().decode(), end="")


def _open_export(export: str):
    from ptqflow.storage.store import StoreError
    from ptqflow.tasks.release.publish import export_store

    try:
        return export_store(export)
    except StoreError as error:
        fail(str(error), EXIT_INVALID_INPUT, as_json=False)


@contextmanager
def _export_lock(export: Any, wait_seconds: float) -> Iterator[None]:
    """Hold the export's lock, the one runs hold, so that a run cannot move latest.json in the middle of a
    promote or rollback: through the Prefect server when PREFECT_API_URL is set, on this host otherwise (see
    flows/locks.py)."""
    import logging

    from prefect.events.worker import EventsWorker

    from ptqflow.flows.locks import LockNotAcquired, exclusive

    try:
        with ExitStack() as held:
            try:
                held.enter_context(exclusive(export.url, timeout_seconds=wait_seconds))
            except LockNotAcquired as error:
                fail(f"{error}, or wait longer with --wait (waited {wait_seconds:g} s)", EXIT_RUN_FAILED, as_json=False)
            yield
    finally:
        # The lock's events are sent before the process exits; Prefect's worker would warn that some are pending.
        logging.getLogger("EventsWorker").setLevel(logging.ERROR)
        EventsWorker.drain_all(timeout=10)


def _quiet_lock_service() -> None:
    """Before Prefect is imported: its slot service logs a lock it gave up waiting for as an error of its own;
    `_export_lock` says what happened in one line."""
    os.environ.setdefault("PREFECT_LOGGING_INTERNAL_LEVEL", "CRITICAL")


def _moved(move: Any, what: str) -> None:
    Console().print(
        f"{what}: latest.json now points to {move.version} (was {move.previous_version or 'nothing'}); pointer "
        f"recorded in {move.history}",
        highlight=False,
        soft_wrap=True,
    )


def _registry(mlflow_uri: str | None, registered_model: str | None) -> Any:
    """The MLflow options, checked (and MLflow asked whether it answers) before anything moves: the registry and
    latest.json are kept in line only if both can be written."""
    if mlflow_uri is None:
        return None
    from ptqflow.flows.options import InvalidOption, parameters
    from ptqflow.flows.registry import RegistryError, check_reachable
    from ptqflow.tasks.core.parameters import RegistryParameters

    try:
        registry = parameters(RegistryParameters, mlflow_uri=mlflow_uri, registered_model=registered_model)
        check_reachable(registry)
    except (InvalidOption, RegistryError) as error:
        fail(str(error), EXIT_INVALID_INPUT, as_json=False)
    return registry


def _follow_in_mlflow(registry: Any, target: Any) -> str | None:
    """With MLflow: move the registry's champion alias to what latest.json now names. Returns why it could not."""
    if registry is None:
        return None
    from ptqflow.flows.registry import sync_with_export

    try:
        record = sync_with_export(registry, target)
    except Exception as error:
        detail = str(error).splitlines()[0][:200] if str(error) else ""
        return (
            f"MLflow at {registry.mlflow_uri} failed ({type(error).__name__}: {detail}): latest.json is as this "
            f"command left it; once MLflow answers, run `ptqflow sync-registry --export {target.url} --mlflow-uri "
            f"{registry.mlflow_uri}` to move the champion alias too"
        )
    Console().print(
        f"MLflow: {record.registered_model} version {record.champion_version} has the champion alias (was "
        f"{record.previous_champion_version or 'none'})",
        highlight=False,
        soft_wrap=True,
    )
    return None


def promote(
    run_id: Annotated[str, typer.Argument(help="A run id, or a unique prefix of one.")],
    export: RequiredExportOption,
    store: StoreOption = "./ptqflow-store",
    wait: LockWaitOption = 60.0,
    mlflow_uri: MlflowUriOption = None,
    registered_model: RegisteredModelOption = None,
) -> None:
    """Point the export's latest.json at a run (publishing it first if it never was), whatever the comparison with
    the exported model said; the run must have passed its gate. Files are verified; history is kept. With MLflow,
    the champion alias follows."""
    _quiet_lock_service()
    from ptqflow.flows.events import MODEL_PROMOTED, emit_pointer_moved
    from ptqflow.storage.store import StoreError
    from ptqflow.tasks.release.manifest import find_manifest
    from ptqflow.tasks.release.promotion import promote as promote_run
    from ptqflow.tasks.release.promotion import read_pointer
    from ptqflow.tasks.release.targets import PointerMoved

    registry = _registry(mlflow_uri, registered_model)
    try:
        manifest = find_manifest(_open_store(store), run_id)
        target = _open_export(export)
        with _export_lock(target, wait):
            move = promote_run(_open_store(store), target, manifest)
            _moved(move, f"promoted run {manifest.run_id}")
            not_followed = _follow_in_mlflow(registry, target)
        emit_pointer_moved(MODEL_PROMOTED, export, move.version, move.previous_version, read_pointer(target))
    except PointerMoved as error:  # another writer (another host, no shared lock) moved latest.json meanwhile
        fail(str(error), EXIT_RUN_FAILED, as_json=False)
    except (LookupError, StoreError) as error:
        fail(str(error), EXIT_INVALID_INPUT, as_json=False)
    if not_followed:
        fail(not_followed, EXIT_RUN_FAILED, as_json=False)


def rollback(
    export: RequiredExportOption,
    wait: LockWaitOption = 60.0,
    mlflow_uri: MlflowUriOption = None,
    registered_model: RegisteredModelOption = None,
) -> None:
    """Point the export's latest.json back at the version published before the current one (verified; history
    is kept). With MLflow, the champion alias follows."""
    _quiet_lock_service()
    from ptqflow.flows.events import EXPORT_ROLLED_BACK, emit_pointer_moved
    from ptqflow.storage.store import StoreError
    from ptqflow.tasks.release.promotion import read_pointer
    from ptqflow.tasks.release.promotion import rollback as roll_back
    from ptqflow.tasks.release.targets import PointerMoved

    registry = _registry(mlflow_uri, registered_model)
    try:
        target = _open_export(export)
        with _export_lock(target, wait):
            move = roll_back(target)
            _moved(move, "rolled back")
            not_followed = _follow_in_mlflow(registry, target)
        emit_pointer_moved(EXPORT_ROLLED_BACK, export, move.version, move.previous_version, read_pointer(target))
    except PointerMoved as error:
        fail(str(error), EXIT_RUN_FAILED, as_json=False)
    except StoreError as error:
        fail(str(error), EXIT_INVALID_INPUT, as_json=False)
    if not_followed:
        fail(not_followed, EXIT_RUN_FAILED, as_json=False)


def sync_registry(
    export: RequiredExportOption,
    mlflow_uri: Annotated[
        str,
        typer.Option(envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI (or MLFLOW_TRACKING_URI)."),
    ],
    registered_model: RegisteredModelOption = None,
    wait: LockWaitOption = 60.0,
) -> None:
    """Move MLflow's champion alias to the version the export's latest.json names, registering it from the
    export's files if the registry lacks it (after a command that could not reach MLflow)."""
    _quiet_lock_service()
    registry = _registry(mlflow_uri, registered_model)
    target = _open_export(export)
    with _export_lock(target, wait):
        not_followed = _follow_in_mlflow(registry, target)
    if not_followed:
        fail(not_followed, EXIT_RUN_FAILED, as_json=False)


def gc(
    store: StoreOption = "./ptqflow-store",
    keep_runs: Annotated[int, typer.Option(help="Keep this many of the newest runs.", min=0)] = 10,
    keep_days: Annotated[
        float | None, typer.Option(help="Also keep every run younger than this many days.", min=0)
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be deleted; delete nothing.")] = False,
    wait: LockWaitOption = 60.0,
) -> None:
    """Delete what no kept run needs: older runs' manifests, cache records and blobs. A kept run reruns all from
    cache; exports hold their own copies and are not touched. Takes the store's lock, so no running flow loses
    anything."""
    _quiet_lock_service()
    from ptqflow.flows.locks import LockNotAcquired, exclusive
    from ptqflow.storage.store import StoreError
    from ptqflow.tasks.release.garbage_collection import apply_collection, plan_collection

    target = _open_store(store)
    try:
        with exclusive(target.url, timeout_seconds=wait):
            plan = plan_collection(target, keep_runs, keep_days, datetime.now(timezone.utc))
            for note in plan.notes:
                err_console.print(note, highlight=False, soft_wrap=True)
            if not dry_run:
                apply_collection(target, plan)
    except LockNotAcquired as error:
        fail(f"{error}, or wait longer with --wait (waited {wait:g} s)", EXIT_RUN_FAILED, as_json=False)
    except StoreError as error:
        fail(str(error), EXIT_INVALID_INPUT, as_json=False)
    except OSError as error:  # the storage said no (read-only, full, permissions)
        from ptqflow.storage.errors import refused_by_storage

        refusal = refused_by_storage(error, "--store") or f"the store could not be changed ({error})"
        fail(f"gc stopped: {refusal}; what it removed is gone, the next gc finishes", EXIT_RUN_FAILED, as_json=False)
    verb = "would free" if dry_run else "freed"
    Console().print(
        f"{verb} {plan.freed_bytes:,} B: {len(plan.delete)} objects, {len(plan.removed_runs)} runs "
        f"({', '.join(r[:8] for r in plan.removed_runs) or 'none'}); kept {len(plan.kept_runs)} runs",
        highlight=False,
        soft_wrap=True,
    )
