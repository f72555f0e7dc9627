"""Content-addressed artifact store over any fsspec filesystem.

Every artifact is written once under a key derived from its sha256, so two runs that produce the same bytes
share one blob and a reference (URI, sha256, size) names exactly one content. Writes are atomic: on a local
disk the bytes go to a temporary name in the same directory and are renamed into place; on object stores a
single upload becomes visible only when it is complete. Reads verify the sha256 before anything is returned,
so a truncated or corrupted blob is never handed to a stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field

_CHUNK = 1 << 20


class StoreError(Exception):
    """Base class for artifact store errors; the message says how to fix the problem."""


class ArtifactMissing(StoreError):
    pass


class ArtifactCorrupted(StoreError):
    pass


class ArtifactRef(BaseModel):
    """A small, JSON-serialisable reference to one immutable artifact in the store."""

    model_config = ConfigDict(frozen=True)

    uri: str = Field(description="Full fsspec URI of the blob.")
    sha256: str = Field(description="Hex sha256 of the blob's bytes.", pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(description="Size of the blob in bytes.", ge=0)

    def short(self) -> str:
        return f"{self.uri} (sha256 {self.sha256[:12]}, {self.bytes} bytes)"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    """Writes and reads artifacts under one root URL (``./ptqflow-store``, ``s3://bucket/prefix``, ``memory://x``).

    Args:
        url: any fsspec URL or local path; it is created on first write.
        storage_options: passed to fsspec for the backend (credentials come from the backend's own sources).
    """

    BLOB_DIR = "blobs"

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
        self.root = root.rstrip("/")
        # Canonical form (absolute for local paths) so cache keys and references do not depend on the cwd.
        self.url = self.fs.unstrip_protocol(self.root)
        self._is_local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    # -- keys and URIs ---------------------------------------------------------------------------------
    def _blob_path(self, digest: str, suffix: str) -> str:
        return f"{self.root}/{self.BLOB_DIR}/{digest[:2]}/{digest}{suffix}"

    def _uri(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def _path(self, ref: ArtifactRef) -> str:
        path = self.fs._strip_protocol(ref.uri)
        if not path.startswith(self.root + "/"):
            raise StoreError(
                f"artifact {ref.uri} is not in the store {self.url}: pass --store with the store that holds it"
            )
        return path

    def path_for(self, name: str) -> str:
        """Full path of a named (not content-addressed) object under the store root, e.g. Prefect results."""
        return f"{self.root}/{name.strip('/')}"

    def uri_for(self, name: str) -> str:
        return self._uri(self.path_for(name))

    # -- writing ---------------------------------------------------------------------------------------
    def put_bytes(self, data: bytes, suffix: str = "") -> ArtifactRef:
        """Store ``data`` under its sha256 and return its reference; storing the same bytes twice is a no-op."""
        digest = sha256_bytes(data)
        path = self._blob_path(digest, suffix)
        ref = ArtifactRef(uri=self._uri(path), sha256=digest, bytes=len(data))
        if self._intact(path, ref):
            return ref
        self._atomic_write(path, data)
        return ref

    def put_file(self, local_path: str | os.PathLike[str], suffix: str = "") -> ArtifactRef:
        with open(local_path, "rb") as f:
            return self.put_bytes(f.read(), suffix)

    def _atomic_write(self, path: str, data: bytes) -> None:
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if not self._is_local:
            # One PUT (or a multipart upload completed at the end) is visible only once complete.
            self.fs.pipe_file(path, data)
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # -- reading ---------------------------------------------------------------------------------------
    def _intact(self, path: str, ref: ArtifactRef) -> bool:
        """True when ``path`` exists with the expected size and digest (a cheap size check first)."""
        try:
            size = self.fs.size(path)
        except FileNotFoundError:
            return False
        return size == ref.bytes and self._digest_of(path) == ref.sha256

    def _digest_of(self, path: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
        return h.hexdigest()

    def exists(self, ref: ArtifactRef) -> bool:
        """Cheap presence check (size only); reads still verify the digest."""
        try:
            return self.fs.size(self._path(ref)) == ref.bytes
        except FileNotFoundError:
            return False

    def verify(self, ref: ArtifactRef) -> None:
        """Raise ArtifactMissing or ArtifactCorrupted unless the blob matches its reference (streamed, bounded memory)."""
        path = self._path(ref)
        try:
            size = self.fs.size(path)
        except FileNotFoundError:
            raise ArtifactMissing(
                f"artifact {ref.uri} is missing from the store: rerun the pipeline to recompute it"
            ) from None
        actual = self._digest_of(path) if size == ref.bytes else None
        if actual != ref.sha256:
            raise ArtifactCorrupted(
                f"artifact {ref.uri} is corrupted (expected sha256 {ref.sha256[:12]} and {ref.bytes} bytes, "
                f"found {size} bytes{'' if actual is None else ', sha256 ' + actual[:12]}): "
                "delete it and rerun the pipeline to recompute it"
            )

    def read_bytes(self, ref: ArtifactRef) -> bytes:
        """The artifact's bytes, verified against the reference."""
        try:
            data = self.fs.cat_file(self._path(ref))
        except FileNotFoundError:
            raise ArtifactMissing(
                f"artifact {ref.uri} is missing from the store: rerun the pipeline to recompute it"
            ) from None
        if len(data) != ref.bytes or sha256_bytes(data) != ref.sha256:
            raise ArtifactCorrupted(
                f"artifact {ref.uri} is corrupted (expected sha256 {ref.sha256[:12]}, {ref.bytes} bytes; "
                f"found sha256 {sha256_bytes(data)[:12]}, {len(data)} bytes): "
                "delete it and rerun the pipeline to recompute it"
            )
        return data

    @contextmanager
    def open(self, ref: ArtifactRef) -> Iterator[IO[bytes]]:
        """A seekable binary file for the verified artifact, for readers that stream (e.g. Parquet row groups).

        The digest is checked by a streamed pass first, so a reader never sees a corrupted blob.
        """
        self.verify(ref)
        with self.fs.open(self._path(ref), "rb") as f:
            yield f

    def read_json(self, ref: ArtifactRef) -> Any:
        return json.loads(self.read_bytes(ref))

    def put_json(self, obj: Any) -> ArtifactRef:
        return self.put_bytes(json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n", ".json")

    # -- Prefect integration ---------------------------------------------------------------------------
    def prefect_result_storage(self) -> Any:
        """Where Prefect keeps task results and cache records: beside the artifacts, so the cache lives as long
        as the store and is shared by every machine that can reach it.

        A local store is passed as a path; a remote one as a saved ``RemoteFileSystem`` block named after the
        store's URL (Prefect only accepts saved blocks for task result storage). Credentials stay out of the
        block: they come from the backend's standard sources, so ``storage_options`` are not stored in it.
        """
        path = self.path_for("prefect-results")
        if self._is_local:
            return Path(path)
        from prefect.filesystems import RemoteFileSystem

        block = RemoteFileSystem(basepath=self._uri(path))
        block.save(f"ptqflow-results-{sha256_bytes(self.url.encode())[:16]}", overwrite=True)
        return block
