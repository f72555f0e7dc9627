"""Data sources, loaded as tensor tables of raw values (no scaling: the model scales its own input).

A source is a built-in name (``digits``) or any fsspec URL of a Parquet file or of a directory of Parquet files,
whose sample column is a ``fixed_shape_tensor``, a fixed-size list, or fixed-size binary (shape from the type,
``--input-shape`` or the file's ``ptqflow`` metadata) and whose label column holds integer class indices.
"""

from __future__ import annotations

import hashlib
import json
import os

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.store import StoreError, filesystem_for
from storage.tables import Columns, TensorTable, TensorTableError, arrow_to_tensor_table, check_columns
from tasks.errors import InvalidDataset


def _load_digits() -> TensorTable:
    # scikit-learn ships this set inside the wheel: no download, so it is the offline default.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    features = bunch.images.astype(np.uint8)[..., np.newaxis]  # raw 0..16 intensities, 8x8x1
    labels = bunch.target.astype(np.int64)
    return TensorTable(
        features,
        labels,
        {
            "source": "digits",
            "value_range": [0.0, 16.0],
            "class_names": [str(name) for name in bunch.target_names],
        },
    )


BUILTIN_DATASETS = {"digits": _load_digits}


def is_builtin(name: str) -> bool:
    return name in BUILTIN_DATASETS


def _parquet_files(url: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The Parquet files of a source URL (a file, or every ``*.parquet`` below a directory, sorted)."""
    looks_like_path = "://" in url or "/" in url or url.endswith(".parquet") or os.path.exists(url)
    if not looks_like_path:
        raise InvalidDataset(
            f"unknown data set {url!r}: choose one of {', '.join(sorted(BUILTIN_DATASETS))}, "
            "or pass the URL of a Parquet file or directory"
        )
    try:
        fs, path = filesystem_for(url)
    except StoreError as error:
        raise InvalidDataset(f"cannot open the data set: {error}") from None
    if not fs.exists(path):
        raise InvalidDataset(
            f"data set {url!r} does not exist: pass a Parquet file or directory URL, or a built-in name "
            f"({', '.join(sorted(BUILTIN_DATASETS))})"
        )
    files = [path] if fs.isfile(path) else sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    if not files:
        raise InvalidDataset(f"no .parquet files under {url!r}: point --dataset at a Parquet file or directory")
    return fs, files


def source_fingerprint(name: str) -> str:
    """What the source holds now, cheaply: for a URL, each file's path, size and ETag / checksum / mtime (as the
    backend offers). Part of the sampling stage's cache key, so new or changed files mean a new sample."""
    if is_builtin(name):
        return f"builtin:{name}"
    return files_fingerprint(*_parquet_files(name))


def files_fingerprint(fs: fsspec.AbstractFileSystem, files: list[str]) -> str:
    """sha256 of each file's path, size and ETag / checksum / mtime, as the backend offers: cheap (no reads)."""
    listing = []
    for path in files:
        info = fs.info(path)
        version = next((str(info[k]) for k in ("ETag", "etag", "md5Hash", "checksum", "mtime", "LastModified",
                                                  "last_modified", "created") if info.get(k) is not None), "")
        listing.append([path, info.get("size"), version])
    return hashlib.sha256(json.dumps(listing, sort_keys=True, default=str).encode()).hexdigest()


def _read_parquet_source(url: str, columns: Columns) -> TensorTable:
    fs, files = _parquet_files(url)
    tables = []
    for path in files:
        try:
            with fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f)
                check_columns(parquet.schema_arrow, columns)
                tables.append(parquet.read(columns=[columns.features, columns.label]))
        except TensorTableError as error:
            raise InvalidDataset(f"{fs.unstrip_protocol(path)}: {error}") from None
        except (pa.ArrowException, OSError) as error:
            raise InvalidDataset(
                f"{fs.unstrip_protocol(path)} is not a readable Parquet file ({str(error).splitlines()[0]}): "
                "rewrite it, or remove it from the directory"
            ) from None
    try:
        table = pa.concat_tables(tables)
    except pa.ArrowInvalid:
        raise InvalidDataset(f"the Parquet files under {url!r} have different schemas: give them one schema") from None
    try:
        loaded = arrow_to_tensor_table(table, columns)
    except TensorTableError as error:
        raise InvalidDataset(str(error)) from None
    meta = dict(loaded.metadata)
    meta["source"] = url
    if "value_range" not in meta:
        # Raw uint8 values are pixels: scale by their type's range, not by what this sample happens to contain.
        features = loaded.features
        meta["value_range"] = (
            [0.0, 255.0] if features.dtype == np.uint8 or not len(features)
            else [float(np.nanmin(features)), float(np.nanmax(features))]
        )
    return TensorTable(loaded.features, loaded.labels, meta)


def load_dataset(name: str, columns: Columns = Columns()) -> TensorTable:
    """Load a built-in data set by name, or a Parquet file or directory by URL.

    Raises:
        InvalidDataset: unknown name, missing or unreadable source, or a table ptqflow cannot use.
    """
    if is_builtin(name):
        return BUILTIN_DATASETS[name]()
    return _read_parquet_source(name, columns)
