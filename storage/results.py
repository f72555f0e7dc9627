"""Where Prefect keeps ptqflow's task results and cache records, and why it never unpickles them.

Task results are artifact references serialised as JSON. Prefect's result records say which serializer wrote
them, and Prefect deserialises with whatever a record names, ``pickle`` included; a record planted in shared
storage could therefore run code on the next cache lookup. ``JsonResultStorage`` refuses, on read, any record
whose serializer is not JSON: Prefect then sees no record (a cache miss), recomputes the stage, and overwrites
the planted file with a JSON record. Writes are atomic, like every other write to the store.

The block lives beside the artifacts (``<store>/prefect-results``), so the cache is shared by every machine
that reaches the store and lives as long as it does.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import WritableFileSystem
from pydantic import Field

from storage.store import ArtifactStore, safe_key, sha256_bytes

RESULTS_KEY = "prefect-results"
ALLOWED_SERIALIZERS = frozenset({"json"})


class UnsafeResultRecord(ValueError):
    pass


def check_result_record(content: bytes, where: str) -> bytes:
    """Return ``content`` if it is a Prefect result record written with a JSON serializer, else raise."""
    try:
        record = json.loads(content)
        serializer = record["metadata"]["serializer"]["type"]
    except (ValueError, KeyError, TypeError):
        raise UnsafeResultRecord(f"{where} is not a JSON result record; ignoring it") from None
    if serializer not in ALLOWED_SERIALIZERS:
        raise UnsafeResultRecord(f"{where} was written with serializer {serializer!r}, not JSON; ignoring it")
    return content


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
        return self.read_path(path, _sync=True)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        store = self._store()
        key = self._key(path)
        return check_result_record(store.read_named(key), store.uri_for(key))

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self.write_path(path, content, _sync=True)

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:
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
