"""Content-addressed artifact store over any fsspec filesystem.

Every artifact is written once under a key derived from its sha256, so two runs that produce the same bytes
share one blob and a reference (URI, sha256, size) names exactly one content. Writes are atomic: on a local
disk the bytes go to a temporary name in the same directory and are renamed into place; on object stores a
single upload becomes visible only when it is complete. Reads verify the sha256 before anything is returned,
so a truncated or corrupted blob is never handed to a stage.

Besides blobs the store holds a few *named* objects (run manifests, export pointers, Prefect's cache records).
Their keys may come from user text, so every key is checked: relative, no ``..``, only ``[A-Za-z0-9._-]`` in each
part. Credentials never pass through here as text a user typed: they come from the backend's standard sources
(environment variables, profiles) or from ``storage_options`` JSON in an environment variable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field

from ptqflow.storage.credentials import options_from_block
from ptqflow.storage.errors import StoreError as StoreError  # re-exported: callers catch the store's errors here

_CHUNK = 1 << 20
_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_BLOB_SUFFIX = re.compile(r"^(\.[A-Za-z0-9]{1,16})?$")  # what put_bytes is given: "", ".json", ".tflite", ...

TEMPORARY_MARK = ".tmp-"  # <name>.tmp-<uuid>: a local write in progress, renamed into place when complete
_TEMPORARY_NAME = re.compile(r"^[A-Za-z0-9._-]+\.tmp-[0-9a-f]{32}$")
# What ptqflow writes under a store's or an export's root: the folders of its blobs and named keys, and its
# top-level files. Only there are a killed writer's temporaries swept.
OWN_FOLDERS = ("blobs", "quarantine", "runs", "prefect-results", "versions", "history")
OWN_TOP_FILES = ("latest.json",)
STORE_OPTIONS_ENV = "PTQFLOW_STORAGE_OPTIONS"
EXPORT_OPTIONS_ENV = "PTQFLOW_EXPORT_STORAGE_OPTIONS"
# The Prefect block (storage.credentials) that replaces each variable's options for a run: its name only.
BLOCK_ENV = {STORE_OPTIONS_ENV: "PTQFLOW_STORAGE_BLOCK", EXPORT_OPTIONS_ENV: "PTQFLOW_EXPORT_STORAGE_BLOCK"}


class ArtifactMissing(StoreError):
    pass


class ArtifactCorrupted(StoreError):
    pass


class UnsafeKey(StoreError):
    pass


class ConcurrentUpdate(StoreError):
    """A conditional replace found the object changed since it was read: another writer got there first."""


class ForeignReference(StoreError):
    """A reference whose URI is not the blob its digest names in this store (another store's, or tampered)."""


# Where runs keep their artifacts unless told otherwise (the CLI, the API and the flows' default).
DEFAULT_STORE = os.environ.get("PTQFLOW_STORE", "./ptqflow-store")


class ArtifactRef(BaseModel):
    """A small, JSON-serialisable reference to one immutable artifact in the store."""

    model_config = ConfigDict(frozen=True)

    uri: str = Field(description="Full fsspec URI of the blob.")
    sha256: str = Field(description="Hex sha256 of the blob's bytes.", pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(description="Size of the blob in bytes.", ge=0)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safe_key(key: str) -> str:
    """Return ``key`` if it is a relative key that cannot leave the store root, else raise UnsafeKey.

    Each ``/``-separated part must start with a letter or digit and hold only letters, digits, ``.``, ``_``
    and ``-`` (so no ``..``, no absolute paths, no empty parts, no control or shell characters).
    """
    parts = key.split("/")
    if not key or any(not _SAFE_PART.match(part) or set(part) == {"."} for part in parts):
        raise UnsafeKey(
            f"{key!r} cannot be used as a storage key: use letters, digits, '.', '_' and '-' "
            "(no '..', no leading '/', no spaces)"
        )
    return key


# Azure's fsspec URLs name the container where other URLs name a user: abfs://container@account.dfs.../path.
_CONTAINER_AT_ACCOUNT = frozenset({"abfs", "abfss", "az", "adl"})


SIGNED_URLS_ENV = "PTQFLOW_SIGNED_URLS"
# Query parameters that make a URL a credential: S3 presigned, GCS signed, Azure SAS, and plain tokens.
_SECRET_QUERY_KEYS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "sig",
        "signature",
        "token",
        "access_token",
        "sas",
    }
)


def redact_url(url: str) -> str:
    """``url`` reduced to scheme, host and path when its query carries a signature or a token; else unchanged."""
    parts = urlsplit(url)
    keys = {key.lower() for key, _ in parse_qsl(parts.query, keep_blank_values=True)}
    if not keys & _SECRET_QUERY_KEYS:
        return url
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _signed_urls() -> dict[str, str]:
    try:
        held = json.loads(os.environ.get(SIGNED_URLS_ENV) or "{}")
    except json.JSONDecodeError:
        return {}
    return held if isinstance(held, dict) else {}


def hold_signed_url(url: str) -> str:
    """Keep a signed URL's secret out of everything ptqflow and Prefect record: return the redacted URL, and keep
    the original in this process's environment (inherited by the processes it starts, never logged), where
    ``filesystem_for`` finds it again. A URL without a secret comes back unchanged."""
    redacted = redact_url(url)
    if redacted != url:
        os.environ[SIGNED_URLS_ENV] = json.dumps({**_signed_urls(), redacted: url})
    return redacted


def scrub_signed_urls(text: str) -> str:
    """``text`` with every held signed URL replaced by its redacted form (for error messages from libraries)."""
    for redacted, original in _signed_urls().items():
        text = text.replace(original, redacted)
    return text


# A URL inside free text (an error message): a scheme, then everything up to whitespace or a quote, less the
# punctuation that ends a sentence or a clause after it.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]*[^\s'\"<>`:;,.)\]]")


def scrub_secrets(text: str) -> str:
    """``text`` with every secret a URL in it can carry taken out: held signed URLs reduced as ``redact_url`` does,
    every other URL's query string and fragment (a token can hide under any name), and passwords in a URL's user
    part. For what is recorded (errors); a URL a run opens keeps its query."""
    text = scrub_signed_urls(text)

    def scrubbed(match: re.Match[str]) -> str:
        url = match.group(0)
        parts = urlsplit(url)
        try:
            password = parts.password
        except ValueError:  # not a URL after all (an unparsable port): nothing to take out
            return url
        netloc = parts.netloc.replace(f":{password}@", ":***@", 1) if password else parts.netloc
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    return _URL_IN_TEXT.sub(scrubbed, text)


def carries_credentials(url: str) -> bool:
    """True when ``url`` has a password, or a user name where no backend reads one as a location."""
    parts = urlsplit(url)
    return bool(parts.password) or bool(parts.username and parts.scheme not in ("", "file", *_CONTAINER_AT_ACCOUNT))


def check_url(url: str) -> str:
    """Refuse URLs that carry credentials: they would end up in flow parameters, logs and manifests."""
    if not url or not url.strip():
        raise StoreError("the storage URL is empty: pass a folder or an fsspec URL such as s3://bucket/prefix")
    parts = urlsplit(url)
    if carries_credentials(url):
        raise StoreError(
            f"the URL for {parts.scheme}://{parts.hostname or ''}{parts.path} carries credentials: remove them and "
            "use the backend's standard sources (AWS_ACCESS_KEY_ID / profiles, GOOGLE_APPLICATION_CREDENTIALS, ...) "
            f"or {STORE_OPTIONS_ENV}"
        )
    return url


def storage_options_from_env(variable: str) -> dict[str, Any]:
    """``storage_options`` for fsspec: from the Prefect block named in ``variable``'s block variable (``BLOCK_ENV``)
    when one is set, else from a JSON object in ``variable`` (never echoed: it may hold secrets)."""
    block = os.environ.get(BLOCK_ENV.get(variable, ""), "").strip()
    if block:
        return options_from_block(block)
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as error:
        raise StoreError(f"{variable} is not valid JSON (at character {error.pos}): set it to a JSON object") from None
    if not isinstance(options, dict):
        raise StoreError(f"{variable} must be a JSON object of fsspec storage options")
    return options


def filesystem_for(url: str, options_env: str = STORE_OPTIONS_ENV) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of ``url``; credentials come from the environment, never from the URL.

    Raises:
        StoreError: the URL carries credentials, or names a backend that is not installed or understood.
    """
    check_url(url)
    try:
        return fsspec.core.url_to_fs(_signed_urls().get(url, url), **storage_options_from_env(options_env))
    except (ValueError, ImportError) as error:
        raise StoreError(f"cannot open {url!r}: {scrub_signed_urls(str(error))}") from None


def file_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The whole file at ``path``, a path as ``fs`` lists it.

    A local file is read with the operating system's calls directly: for a small file (an image of a folder)
    fsspec's file object costs more Python than decoding it does, and each of its half-dozen system calls hands
    the GIL to another thread and waits to take it back, so threads reading many small files run slower than one.
    """
    if not isinstance(fs, LocalFileSystem):
        return bytes(fs.cat_file(path))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        chunks, wanted = [], 1 << 16
        while True:
            chunks.append(os.read(fd, wanted))
            if len(chunks[-1]) < wanted:  # a regular file reads short only at its end
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            wanted = min(wanted * 2, 1 << 26)
    finally:
        os.close(fd)


def canonical_url(url: str) -> str:
    """``url`` as the store names it (absolute for local paths, no trailing slash), without touching it."""
    fs, path = filesystem_for(url, options_env="")
    return fs.unstrip_protocol(path.rstrip("/"))


class ArtifactStore:
    """Writes and reads artifacts under one root URL (``./ptqflow-store``, ``s3://bucket/prefix``, ``memory://x``).

    Args:
        url: any fsspec URL or local path; it is created on first write.
        storage_options: passed to fsspec; by default read from the JSON in ``options_env``.
        options_env: the environment variable holding default storage options.
    """

    BLOB_DIR = "blobs"
    QUARANTINE_DIR = "quarantine"

    def __init__(
        self, url: str, storage_options: dict[str, Any] | None = None, options_env: str = STORE_OPTIONS_ENV
    ) -> None:
        check_url(url)
        self.storage_options = dict(
            storage_options if storage_options is not None else storage_options_from_env(options_env)
        )
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
        except (ValueError, ImportError) as error:  # an unknown protocol, or its backend not installed
            raise StoreError(
                f"cannot open the store {url!r}: {error}; use a folder or an installed backend's URL (s3://, gs://, "
                "az://, memory://: pip install 'ptqflow[s3]' and the like)"
            ) from None
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
        """The blob's path, built from its digest and a checked suffix, never taken from the URI: a reference
        (from a cache record anyone with write access to the store could edit) cannot point outside the store.

        Raises:
            ForeignReference: the URI is not ``blobs/<2 hex>/<sha256><suffix>`` under this store's root.
        """
        blob = self._blob_path(ref.sha256, "")
        path = self.fs._strip_protocol(ref.uri)
        suffix = path[len(blob) :] if path.startswith(blob) else None
        if suffix is None or not _BLOB_SUFFIX.match(suffix):
            raise ForeignReference(
                f"artifact {ref.uri} is not in the store {self.url} (a blob there is blobs/<sha256[:2]>/<sha256>"
                "<suffix>): pass --store with the store that holds it"
            )
        return blob + suffix

    def path_for(self, key: str) -> str:
        """Full path of a named (not content-addressed) object under the store root."""
        return f"{self.root}/{safe_key(key)}"

    def uri_for(self, key: str) -> str:
        return self._uri(self.path_for(key))

    def key_of(self, uri: str) -> str:
        """The key of a named object from its URI (the inverse of ``uri_for``)."""
        prefix = self._uri(self.root).rstrip("/") + "/"
        if not uri.startswith(prefix):
            raise StoreError(f"{uri} is not in the store {self.url}")
        return uri[len(prefix) :]

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

    def put_json(self, obj: Any) -> ArtifactRef:
        return self.put_bytes(json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n", ".json")

    def _atomic_write(self, path: str, data: bytes, exclusive: bool = False) -> None:
        """Write so that readers see the old state or the whole new object, never a part.

        Raises:
            FileExistsError: ``exclusive`` and the object exists (the check and the write are one step).
        """
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if not self._is_local:
            # One PUT (or a multipart upload completed at the end) is visible only once complete; "create" is
            # a conditional PUT (If-None-Match: *) on S3.
            self.fs.pipe_file(path, data, mode="create" if exclusive else "overwrite")
            return
        tmp = f"{path}{TEMPORARY_MARK}{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                os.link(tmp, path)  # fails if the name exists, atomically
            else:
                os.replace(tmp, path)
            _fsync_directory(parent)  # the new name survives a power cut, not only the bytes
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def replace_named_if(self, key: str, data: bytes, expected_sha256: str | None) -> str:
        """Replace a named object only if it still holds the bytes whose sha256 is ``expected_sha256`` (None: only
        if it does not exist), as one step: S3's conditional PUT (If-Match on the ETag read with the check,
        If-None-Match), a lock file beside it on local disks. Other backends check, then write (a race window
        remains: coordinate their writers with the run's lock). Returns its URI.

        Raises:
            ConcurrentUpdate: the object is not what the caller read.
        """
        path = self.path_for(key)
        if self._is_local:
            import fcntl

            parent, name = path.rsplit("/", 1)
            self.fs.makedirs(parent, exist_ok=True)
            with open(f"{parent}/.{name}.lock", "a") as guard:
                fcntl.flock(guard, fcntl.LOCK_EX)
                try:
                    self._check_current(key, expected_sha256)
                    self._atomic_write(path, data)
                finally:
                    fcntl.flock(guard, fcntl.LOCK_UN)
            return self._uri(path)
        if hasattr(self.fs, "call_s3"):  # s3fs: S3 and compatible stores with conditional writes
            bucket, object_key, _ = self.fs.split_path(path)
            condition: dict[str, str] = {"IfNoneMatch": "*"}
            if expected_sha256 is not None:
                etag = self._check_current(key, expected_sha256)
                condition = {"IfMatch": etag}
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=object_key, Body=data, **condition)
            except (FileExistsError, OSError) as error:
                if isinstance(error, FileExistsError) or "pre-condition" in str(error).lower():
                    raise ConcurrentUpdate(f"{self._uri(path)} was replaced by another writer meanwhile") from None
                raise
            self.fs.invalidate_cache(path)
            return self._uri(path)
        self._check_current(key, expected_sha256)
        self._atomic_write(path, data)
        return self._uri(path)

    def _check_current(self, key: str, expected_sha256: str | None) -> str:
        """Raise ConcurrentUpdate unless ``key`` holds what ``expected_sha256`` says; returns the ETag it was read
        with (before the bytes, so that a replacement in between fails the conditional write)."""
        path = self.path_for(key)
        etag, current = "", None
        try:
            if hasattr(self.fs, "call_s3"):
                etag = str(self.fs.info(path, refresh=True)["ETag"])
            current = self.fs.cat_file(path)
        except FileNotFoundError:
            pass
        if (None if current is None else sha256_bytes(current)) != expected_sha256:
            raise ConcurrentUpdate(f"{self._uri(path)} was replaced by another writer meanwhile")
        return etag

    def delete_named(self, key: str) -> None:
        """Remove a named object (absent already: nothing to do)."""
        try:
            self.fs.rm_file(self.path_for(key))
        except FileNotFoundError:
            pass

    def write_named(self, key: str, data: bytes, exclusive: bool = False) -> str:
        """Write a named object atomically and return its URI; ``exclusive`` refuses to replace an existing one."""
        path = self.path_for(key)
        self._atomic_write(path, data, exclusive=exclusive)
        return self._uri(path)

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

    @staticmethod
    def _missing(ref: ArtifactRef) -> ArtifactMissing:
        return ArtifactMissing(f"artifact {ref.uri} is missing from the store: rerun the pipeline to recompute it")

    def verify(self, ref: ArtifactRef) -> None:
        """Raise ArtifactMissing or ArtifactCorrupted unless the blob matches its reference (streamed, bounded
        memory)."""
        path = self._path(ref)
        try:
            size = self.fs.size(path)
        except FileNotFoundError:
            raise self._missing(ref) from None
        actual = self._digest_of(path) if size == ref.bytes else None
        if actual != ref.sha256:
            raise ArtifactCorrupted(
                f"artifact {ref.uri} is corrupted (expected sha256 {ref.sha256[:12]} and {ref.bytes} bytes, "
                f"found {size} bytes{'' if actual is None else ', sha256 ' + actual[:12]}): "
                "rerun the pipeline to move it aside and recompute it"
            )

    def read_bytes(self, ref: ArtifactRef) -> bytes:
        """The artifact's bytes, verified against the reference."""
        try:
            data = self.fs.cat_file(self._path(ref))
        except FileNotFoundError:
            raise self._missing(ref) from None
        if len(data) != ref.bytes or sha256_bytes(data) != ref.sha256:
            raise ArtifactCorrupted(
                f"artifact {ref.uri} is corrupted (expected sha256 {ref.sha256[:12]}, {ref.bytes} bytes; "
                f"found sha256 {sha256_bytes(data)[:12]}, {len(data)} bytes): "
                "rerun the pipeline to move it aside and recompute it"
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

    def read_named(self, key: str) -> bytes:
        try:
            return self.fs.cat_file(self.path_for(key))
        except FileNotFoundError:
            raise ArtifactMissing(f"{self.uri_for(key)} does not exist") from None

    def exists_named(self, key: str) -> bool:
        return self.fs.exists(self.path_for(key))

    def list_named(self, prefix: str) -> list[str]:
        """Keys of the named objects directly under ``prefix`` (sorted)."""
        base = self.path_for(prefix)
        try:
            entries = self.fs.ls(base, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = (entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)
        # A killed writer's temporary file is not an object (see sweep_temporaries).
        return sorted(f"{prefix}/{name}" for name in names if TEMPORARY_MARK not in name)

    def sweep_temporaries(self, older_than_seconds: float) -> list[str]:
        """Delete the temporary files that writers killed between writing and renaming left behind (local
        stores only: an object store's upload is never visible half-done), if older than ``older_than_seconds``.
        Call it only while holding the store's lock, so that no live writer of ptqflow's owns them. Returns
        their URIs."""
        if not self._is_local or not os.path.isdir(self.root):
            return []
        cutoff = time.time() - older_than_seconds
        swept = []
        # Only where this store writes (its own folders, never links out of them), and only names of its own
        # temporaries: the root may be a folder that holds other files (a store named "~" by mistake).
        candidates = [
            os.path.join(folder, name)
            for top in self._own_folders()
            for folder, _, names in os.walk(top)
            for name in names
        ]
        candidates += [
            os.path.join(self.root, name)
            for name in os.listdir(self.root)
            if name.split(TEMPORARY_MARK, 1)[0] in OWN_TOP_FILES
        ]
        for path in candidates:
            if (
                _TEMPORARY_NAME.match(os.path.basename(path))
                and not os.path.islink(path)
                and os.path.getmtime(path) < cutoff
            ):
                os.unlink(path)
                swept.append(self._uri(path))
        return swept

    def _own_folders(self) -> list[str]:
        """Where ptqflow writes under the root: its own folders (``OWN_FOLDERS``), not the root's other ones."""
        return [
            path
            for path in (os.path.join(self.root, name) for name in OWN_FOLDERS)
            if os.path.isdir(path) and not os.path.islink(path)
        ]

    # -- repair ----------------------------------------------------------------------------------------
    def quarantine(self, ref: ArtifactRef) -> str | None:
        """Move a bad blob aside (kept for inspection, never read again) and return where it went."""
        path = self._path(ref)
        name = path.rsplit("/", 1)[-1]
        target = f"{self.root}/{self.QUARANTINE_DIR}/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{name}"
        try:
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.mv(path, target)
        except FileNotFoundError:
            return None
        return self._uri(target)
