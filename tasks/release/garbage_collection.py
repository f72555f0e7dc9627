"""``ptqflow gc``: reclaim what no kept run needs. Every run adds blobs, cache records and a manifest; a nightly
schedule would fill a bucket.

What is kept:

* the newest ``keep_runs`` runs and those younger than ``keep_days``;
* everything a kept run reaches: the artifacts its manifest names, the splits its ``dataset.json`` names, the
  cache records of its stages (their keys are in its manifest) and every blob those records name, so a rerun of
  a kept run is all cache hits.

Exports are not touched and need nothing from the store: they hold verified copies, their own manifests and
pointers, so a removed run's export still verifies, and promote and rollback still work on it. Whatever cannot be
read is kept, not guessed at: a manifest that is not one, and, for a kept run from before stage cache keys were
recorded, every cache record and what it names. Deletion runs under the store's lock, manifests first, then records,
then blobs: interrupted at any point, no kept run has lost anything, and the next ``gc`` finishes the job.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from ptqflow.storage.results import RESULTS_KEY
from ptqflow.storage.store import ArtifactStore, StoreError
from ptqflow.tasks.release.manifest import RUNS_PREFIX, CorruptManifest, read_manifest


class CollectionPlan(BaseModel):
    kept_runs: list[str]
    removed_runs: list[str]
    delete: list[str]  # store keys, in the order they are deleted
    freed_bytes: int
    notes: list[str]


def _refs_in(payload: Any) -> Iterator[str]:
    """The sha256 of every artifact reference in a JSON document, at any depth."""
    if isinstance(payload, dict):
        if isinstance(payload.get("sha256"), str) and "uri" in payload:
            yield payload["sha256"]
        for value in payload.values():
            yield from _refs_in(value)
    elif isinstance(payload, list):
        for item in payload:
            yield from _refs_in(item)


def plan_collection(store: ArtifactStore, keep_runs: int, keep_days: float | None, now: datetime) -> CollectionPlan:
    """Pure but for reads: what ``gc`` would delete from ``store``, and why the rest stays."""
    notes: list[str] = []
    manifests, keep_keys = [], set()
    for key in store.list_named(RUNS_PREFIX):
        try:
            manifests.append((key, read_manifest(store, key)))
        except CorruptManifest as error:
            keep_keys.add(key)
            notes.append(f"kept {key}: {error}")
    manifests.sort(key=lambda item: item[1].created_at, reverse=True)
    cutoff = (now - timedelta(days=keep_days)).isoformat() if keep_days is not None else None
    kept = [(key, m) for i, (key, m) in enumerate(manifests) if i < keep_runs or (cutoff and m.created_at >= cutoff)]
    kept_ids = {m.run_id for _, m in kept}

    live_blobs: set[str] = set()
    records = store.list_named(RESULTS_KEY)
    live_records: set[str] = set()
    every_record = False
    for key, m in kept:
        keep_keys.add(key)
        live_blobs |= {ref.sha256 for ref in m.artifacts.values()}
        dataset = m.artifacts.get("dataset")
        if dataset:
            try:
                live_blobs |= set(_refs_in(store.read_json(dataset)))
            except StoreError:
                pass  # gone or damaged already: nothing more it can keep alive
        stages = m.tasks.values()
        if any("cache_key" not in stage.model_fields_set for stage in stages):  # written before keys were recorded
            every_record = True
        # None: a stage that is never cached (a fingerprint), so it has no record.
        live_records |= {f"{RESULTS_KEY}/{stage.cache_key}" for stage in stages if stage.cache_key}
    if every_record:
        notes.append("kept every cache record: a kept run's manifest predates recorded cache keys")
        live_records = set(records)
    for key in sorted(live_records & set(records)):
        try:
            record = json.loads(store.read_named(key))
            live_blobs |= set(_refs_in(json.loads(record["result"])))
        except (StoreError, ValueError, KeyError, TypeError):
            continue  # a record that is not one is never read by a run: nothing to keep for it

    delete = [key for key, m in manifests if m.run_id not in kept_ids and key not in keep_keys]
    delete += [key for key in records if key not in live_records]
    blob_keys = [key for key in _blob_keys(store) if key.rsplit("/", 1)[-1][:64] not in live_blobs]
    delete += blob_keys
    freed = sum(_size(store, key) for key in delete)
    removed = [m.run_id for key, m in manifests if m.run_id not in kept_ids and key not in keep_keys]
    return CollectionPlan(
        kept_runs=sorted(kept_ids), removed_runs=removed, delete=delete, freed_bytes=freed, notes=notes
    )


def _blob_keys(store: ArtifactStore) -> list[str]:
    return [key for folder in store.list_named(ArtifactStore.BLOB_DIR) for key in store.list_named(folder)]


def _size(store: ArtifactStore, key: str) -> int:
    try:
        return int(store.fs.size(store.path_for(key)))
    except FileNotFoundError:
        return 0


def apply_collection(store: ArtifactStore, plan: CollectionPlan) -> int:
    """Delete what ``plan`` lists, in its order; returns how many objects went."""
    for key in plan.delete:
        store.delete_named(key)
    return len(plan.delete)
