"""Where Prefect keeps ptqflow's task results and cache records, and why reading one never runs code.

Task results are artifact references serialised as JSON. A Prefect result record names the serializer that
wrote it, with its settings, and Prefect rebuilds that serializer from the record: ``pickle`` would unpickle,
and even ``json`` takes its ``object_decoder`` (a dotted name Prefect imports and calls on every decoded
object) from the record, and Prefect's own decoder imports whatever class a payload's ``__class__`` names. A
record planted in shared storage could therefore run code on the next cache lookup. ``JsonResultStorage``
accepts, on read, only records whose serializer settings are exactly the ones ptqflow writes and whose payload
names only ptqflow's own stage-output classes (already imported: nothing new is imported to check it). Anything
else is refused with a warning naming the file: Prefect then sees no record (a cache miss), recomputes the stage
and overwrites the file. Writes are atomic, like every other write to the store.

The block lives beside the artifacts (``<store>/prefect-results``), so the cache is shared by every machine
that reaches the store and lives as long as it does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any, ClassVar

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import WritableFileSystem
from pydantic import BaseModel, Field

from ptqflow.storage.store import ArtifactStore, safe_key, sha256_bytes

RESULTS_KEY = "prefect-results"
# Exactly what ``result_serializer="json"`` writes (Prefect's JSONSerializer with its defaults).
EXPECTED_SERIALIZER: dict[str, Any] = {
    "type": "json",
    "jsonlib": "json",
    "object_encoder": "prefect.serializers.prefect_json_object_encoder",
    "object_decoder": "prefect.serializers.prefect_json_object_decoder",
    "dumps_kwargs": {},
    "loads_kwargs": {},
}

logger = logging.getLogger("ptqflow.results")


class UnsafeResultRecord(ValueError):
    pass


class StoredResult(BaseModel):
    """Base of every type a ptqflow result record may decode into (the stages' outputs subclass it): the
    result storage accepts a payload naming no other class."""


def stage_output_classes() -> frozenset[str]:
    """Qualified names of the classes a ptqflow result may decode into: every loaded StoredResult subclass."""
    found, pending = set(), list(StoredResult.__subclasses__())
    while pending:
        cls = pending.pop()
        found.add(f"{cls.__module__}.{cls.__qualname__}")
        pending += cls.__subclasses__()
    return frozenset(found)


def _named_types(value: Any) -> Iterator[str]:
    """Every type a payload asks Prefect's decoder to import (``__class__``, ``__exc_type__``), at any depth."""
    if isinstance(value, dict):
        for key in ("__class__", "__exc_type__"):
            if key in value:
                yield str(value[key])
        for item in value.values():
            yield from _named_types(item)
    elif isinstance(value, list):
        for item in value:
            yield from _named_types(item)


def check_result_record(content: bytes, where: str) -> bytes:
    """Return ``content`` if it is a result record exactly as ptqflow writes them, else raise.

    Raises:
        UnsafeResultRecord: not a JSON record, other serializer settings than ptqflow's, or a payload that
            names a type outside ptqflow's stage outputs.
    """
    not_a_record = UnsafeResultRecord(f"{where} is not a JSON result record; ignoring it")
    try:
        serializer = json.loads(content)["metadata"]["serializer"]
        kind = serializer["type"]
    except (ValueError, KeyError, TypeError):
        raise not_a_record from None
    if kind != "json":
        raise UnsafeResultRecord(f"{where} was written with serializer {kind!r}, not JSON; ignoring it")
    try:
        payload = json.loads(json.loads(content)["result"])  # plain JSON: no decoder of the record's runs here
    except (ValueError, KeyError, TypeError):
        raise not_a_record from None
    if serializer != EXPECTED_SERIALIZER:
        changed = sorted(
            k for k in EXPECTED_SERIALIZER.keys() | serializer.keys() if serializer.get(k) != EXPECTED_SERIALIZER.get(k)
        )
        raise UnsafeResultRecord(
            f"{where} has serializer settings ptqflow never writes ({', '.join(changed)}); ignoring it"
        )
    allowed = stage_output_classes()
    foreign = sorted({name for name in _named_types(payload) if name not in allowed})
    if foreign:
        raise UnsafeResultRecord(
            f"{where} names types outside ptqflow's stage outputs ({', '.join(foreign)}); ignoring it"
        )
    return content


def _warn(message: str) -> None:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        get_run_logger().warning(message)  # in the run's logs and the Prefect UI
    except MissingContextError:
        logger.warning(message)


class JsonResultStorage(WritableFileSystem):
    """Prefect result storage over an ArtifactStore root: atomic writes, JSON-only reads."""

    _block_type_name: ClassVar[str] = "ptqflow JSON result storage"
    _block_type_slug: ClassVar[str] = "ptqflow-json-result-storage"
    _description: ClassVar[str] = "Task results and cache records of ptqflow, JSON only, beside the artifacts."

    store_url: str = Field(description="The ptqflow store whose prefect-results folder holds the records.")

    def _store(self) -> ArtifactStore:
        return ArtifactStore(self.store_url)

    def _key(self, path: str) -> str:
        # Prefect passes the cache key (the policy makes it "<module>-<sha256>"), never a user path.
        return f"{RESULTS_KEY}/{safe_key(path.rsplit('/', 1)[-1])}"

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path, _sync=True)  # type: ignore[call-arg, return-value]

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:  # type: ignore[override]  # Prefect's sync/async dispatch
        store = self._store()
        key = self._key(path)
        try:
            return check_result_record(store.read_named(key), store.uri_for(key))
        except UnsafeResultRecord as refused:
            # Prefect treats the error as "no record": the stage is recomputed and the file overwritten.
            _warn(f"{refused} (the stage is recomputed and the file overwritten)")
            raise

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self.write_path(path, content, _sync=True)  # type: ignore[call-arg, return-value]

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:  # type: ignore[override]
        return self._store().write_named(self._key(path), content)


def result_storage_for(store: ArtifactStore) -> Any:
    """The saved result-storage block for ``store`` (Prefect accepts only saved blocks as task result storage).

    Its name is derived from the store URL; it holds the URL only, never storage options or credentials."""
    from prefect.exceptions import ObjectAlreadyExists

    block = JsonResultStorage(store_url=store.url)
    name = f"ptqflow-results-{sha256_bytes(store.url.encode())[:16]}"
    for attempt in range(3):
        try:
            block.save(name, overwrite=True)
            return block
        except ObjectAlreadyExists:
            # Two runs on the same store registering the block at the same moment: the other one won.
            if attempt == 2:
                raise
    return block
