"""Storage credentials from Prefect blocks: ``--storage-block`` / ``--export-block`` (and the flows' parameters of
the same names) name a block; only its name travels (parameters, manifests, the UI's form), its values are read
in the process that opens the storage and are never printed or stored.

A reference is ``NAME`` or ``secret/NAME`` (a ``Secret`` block holding a JSON object of fsspec storage options),
or, with ``prefect-aws`` installed, ``aws-credentials/NAME`` or ``s3-bucket/NAME`` (its credentials, as s3fs
options).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, cast

from ptqflow.storage.errors import StoreError

CACHE_SECONDS = 60.0  # a rotated secret reaches a long-lived process (``ptqflow serve``) within a minute

_cache: dict[str, tuple[float, dict[str, Any]]] = {}
_lock = threading.Lock()


def _split(reference: str) -> tuple[str, str]:
    kind, _, name = reference.strip().rpartition("/")
    return (kind or "secret"), name


def _secret_options(name: str) -> dict[str, Any]:
    from prefect.blocks.system import Secret

    value = cast(Secret, Secret.load(name)).get()  # synchronous here: no event loop runs in this thread
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, dict):
        raise StoreError(
            f"the Secret block {name!r} does not hold a JSON object of fsspec storage options: store one, e.g. "
            '{"key": "...", "secret": "...", "endpoint_url": "..."}'
        )
    return value


def _aws_options(credentials: Any) -> dict[str, Any]:
    """s3fs options from a prefect-aws ``AwsCredentials`` block."""
    options: dict[str, Any] = {}
    if credentials.aws_access_key_id:
        options["key"] = credentials.aws_access_key_id
    if credentials.aws_secret_access_key is not None:
        options["secret"] = credentials.aws_secret_access_key.get_secret_value()
    if credentials.aws_session_token:
        options["token"] = credentials.aws_session_token
    if credentials.profile_name:
        options["profile"] = credentials.profile_name
    client_kwargs = {}
    if credentials.region_name:
        client_kwargs["region_name"] = credentials.region_name
    endpoint = getattr(credentials.aws_client_parameters, "endpoint_url", None)
    if endpoint:
        options["endpoint_url"] = endpoint
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return options


def _load(reference: str) -> dict[str, Any]:
    kind, name = _split(reference)
    if kind == "secret":
        return _secret_options(name)
    if kind in ("aws-credentials", "s3-bucket"):
        try:
            from prefect_aws import AwsCredentials, S3Bucket
        except ImportError:
            raise StoreError(
                f"the block {reference!r} is a prefect-aws block: pip install prefect-aws, or keep the options in a "
                "Secret block (secret/NAME)"
            ) from None
        if kind == "aws-credentials":
            return _aws_options(AwsCredentials.load(name))
        return _aws_options(cast(S3Bucket, S3Bucket.load(name)).credentials)
    raise StoreError(
        f"unknown block type {kind!r} in {reference!r}: name a Secret block (NAME or secret/NAME), or with "
        "prefect-aws an aws-credentials/NAME or s3-bucket/NAME block"
    )


def options_from_block(reference: str) -> dict[str, Any]:
    """fsspec storage options from the block ``reference`` names (cached for ``CACHE_SECONDS``).

    Raises:
        StoreError: the block does not exist, cannot be read, or holds no storage options; the message names the
            block, never its values.
    """
    now = time.monotonic()
    with _lock:
        cached = _cache.get(reference)
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            return dict(cached[1])
    try:
        options = _load(reference)
    except StoreError:
        raise
    except ValueError as error:  # Prefect's "Unable to find block document named ..."
        raise StoreError(
            f"cannot read the block {reference!r} ({str(error).splitlines()[0][:200]}): create it (prefect block "
            "create, or Secret(value=...).save(NAME)) or fix the name"
        ) from None
    except Exception as error:  # the API unreachable, a block of another schema: say which block, not its values
        raise StoreError(
            f"cannot read the block {reference!r} ({type(error).__name__}): check PREFECT_API_URL and the block"
        ) from None
    with _lock:
        _cache[reference] = (now, options)
    return dict(options)
