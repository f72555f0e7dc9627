"""Data sources, loaded as tensor tables of raw values (no scaling: the model scales its own input).

A source is a built-in name (``digits`` from scikit-learn, offline; ``mnist``, ``fashion_mnist``, ``cifar10``
through ``keras.datasets``) or any fsspec URL of:

* Parquet (a file, or every ``*.parquet`` below a directory): a sample column that is a ``fixed_shape_tensor``, a
  fixed-size list or fixed-size binary (shape from the type, ``--input-shape`` or the file's ``ptqflow``
  metadata), encoded images (bytes, or the Hugging Face ``Image`` struct), one column per model input, or a wide
  table of one numeric column per feature;
* CSV (a file, or the ``*.csv`` of a directory): a wide table, streamed in blocks;
* an image folder (``<class>/<image>``, or ``<split>/<class>/<image>``; ``tasks.data.images``).

Labels are integer class indices, regression targets, or none (``--task``); a source may carry its own splits
(``tasks.data.splits``). A source can grow (a folder of files), and can be narrowed to the files of a date window.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import posixpath
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Protocol

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ptqflow.storage.limits import check_label_range, check_source_size, declared_sample_bytes
from ptqflow.storage.store import StoreError, filesystem_for
from ptqflow.storage.tables import (
    Columns,
    TensorTable,
    TensorTableError,
    arrow_to_tensor_table,
    check_columns,
    features_to_numpy,
    no_labels,
    read_labels,
    resolve_columns,
    source_metadata,
)
from ptqflow.tasks.core.errors import InvalidDataset
from ptqflow.tasks.data.images import ImageFolder, decode_images, image_metadata, is_image_folder, list_image_folder
from ptqflow.tasks.data.splits import (
    SPLITS,
    codes_of_column,
    origin_of_column,
    origin_of_files,
    split_codes,
    splits_of_files,
)
from ptqflow.tasks.data.stratify import check_class_labels, draw_stratified

SPLIT_ORIGIN = "split_origin"  # metadata: where each given split came from


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


@dataclass(frozen=True)
class KerasDataset:
    """A ``keras.datasets`` set: Keras downloads it once into its cache and checks it; ptqflow only names, for an
    offline machine, which files to put where."""

    module: str
    files: tuple[tuple[str, str], ...]  # (origin URL, path under Keras's cache directory)
    class_names: tuple[str, ...]

    def cache_dir(self) -> str:
        from keras.src.backend import config  # where get_file caches: $KERAS_HOME, else ~/.keras

        base = os.path.expanduser(config.keras_home())
        if not os.access(base, os.W_OK):  # get_file's own fallback for a read-only home
            base = os.path.join(tempfile.gettempdir(), ".keras")
        return os.path.join(base, "datasets")

    def where_to_put_the_files(self) -> str:
        return "; ".join(f"{origin} as {os.path.join(self.cache_dir(), name)}" for origin, name in self.files)


_KERAS_STORE = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
KERAS_DATASETS = {
    "mnist": KerasDataset("mnist", ((f"{_KERAS_STORE}mnist.npz", "mnist.npz"),), tuple(str(d) for d in range(10))),
    "fashion_mnist": KerasDataset(
        "fashion_mnist",
        tuple(
            (f"{_KERAS_STORE}{f}", f"fashion-mnist/{f}")
            for f in (
                "train-labels-idx1-ubyte.gz",
                "train-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz",
            )
        ),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    "cifar10": KerasDataset(
        "cifar10",
        (("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-batches-py-target_archive"),),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    ),
}


def _load_keras_dataset(name: str) -> TensorTable:
    """The real ``keras.datasets`` loader (downloads once, then reads Keras's cache); its train and test parts are
    the given splits (``--splits resplit`` pools them)."""
    import importlib

    dataset = KERAS_DATASETS[name]
    loader = importlib.import_module(f"keras.datasets.{dataset.module}")
    try:
        # Keras prints its download progress to stdout; stderr keeps stdout for ptqflow's own output (--json).
        with contextlib.redirect_stdout(sys.stderr):
            (x_train, y_train), (x_test, y_test) = loader.load_data()
    except Exception as error:  # Keras raises a bare Exception for a failed download
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "URL fetch failure" in reason:
            raise InvalidDataset(
                f"cannot download the {name} data set ({reason}); on a machine without internet, put "
                f"{dataset.where_to_put_the_files()}, then rerun"
            ) from None
        raise InvalidDataset(
            f"Keras's cached copy of {name} in {dataset.cache_dir()} is unreadable ({reason}): delete it and rerun "
            "to download it again"
        ) from None
    features = np.concatenate([x_train, x_test])
    if features.ndim == 3:  # grayscale images come without a channel axis
        features = features[..., np.newaxis]
    labels = np.concatenate([np.ravel(y_train), np.ravel(y_test)]).astype(np.int64)
    return TensorTable(
        np.ascontiguousarray(features, dtype=np.uint8),
        labels,
        {
            "source": name,
            "value_range": [0.0, 255.0],
            "class_names": list(dataset.class_names),
            SPLIT_ORIGIN: {
                "train": f"keras.datasets.{dataset.module} train part",
                "test": f"keras.datasets.{dataset.module} test part",
            },
        },
        split_codes(["train"] * len(y_train) + ["test"] * len(y_test)),
    )


BUILTIN_DATASETS = {"digits": _load_digits} | {
    name: functools.partial(_load_keras_dataset, name) for name in KERAS_DATASETS
}


def is_builtin(name: str) -> bool:
    return name in BUILTIN_DATASETS


@dataclass(frozen=True)
class Listing:
    """A source URL listed once (every file below a directory, or the file itself): whether it is an image folder,
    CSV or Parquet is read from this, so a remote directory is not listed again for each question."""

    fs: fsspec.AbstractFileSystem
    path: str
    files: tuple[str, ...]
    is_dir: bool


def list_source(url: str) -> Listing | None:
    """None for a name that is not a path, or a URL that does not open or exist (``_parquet_files`` says why)."""
    if "://" not in url and "/" not in url and not os.path.exists(url):
        return None
    try:
        fs, path = filesystem_for(url)
    except StoreError:
        return None
    if fs.isdir(path):
        return Listing(fs, path.rstrip("/"), tuple(sorted(fs.find(path))), True)
    if fs.isfile(path):
        return Listing(fs, path, (path,), False)
    return None


def _modified_since(
    fs: fsspec.AbstractFileSystem, files: list[str], since: datetime | None, url: str, kind: str
) -> list[str]:
    """``files`` modified at or after ``since`` (all of them without it); none is an error with the fix."""
    if since is None:
        return files
    recent = [p for p in files if modified_at(fs, p) >= since]
    if not recent:
        raise InvalidDataset(
            f"no {kind} under {url!r} was modified since {since:%Y-%m-%d %H:%M} UTC: widen --window-days or move "
            "--since back"
        )
    return recent


def _csv_files(
    url: str, since: datetime | None, listing: Listing | None
) -> tuple[fsspec.AbstractFileSystem, list[str]] | None:
    """The CSV files of a source (a ``.csv`` file, or a directory holding ``*.csv`` and no Parquet file), sorted;
    None when the source is not CSV."""
    if listing is None or any(p.endswith(".parquet") for p in listing.files):
        return None
    files = [p for p in listing.files if p.lower().endswith(".csv")]
    if not files:
        return None
    return listing.fs, _modified_since(listing.fs, files, since, url, ".csv file")


def _csv_batches(fs: fsspec.AbstractFileSystem, path: str, names: list[str]) -> Iterator[pa.RecordBatch]:
    """The named columns of one CSV file, streamed in blocks; a file that cannot be parsed is named."""
    from pyarrow import csv

    try:
        with fs.open(path, "rb") as f:
            yield from csv.open_csv(f, convert_options=csv.ConvertOptions(include_columns=names))
    except (pa.ArrowException, OSError) as error:
        raise InvalidDataset(
            f"{fs.unstrip_protocol(path)} is not a readable CSV file with columns {', '.join(names)} "
            f"({str(error).splitlines()[0][:200]}): fix or remove it"
        ) from None


def _read_csv_source(
    url: str,
    files: tuple[fsspec.AbstractFileSystem, list[str]],
    columns: Columns,
    draw: Draw | None,
    root: str,
    first_only: bool = False,
) -> TensorTable:
    """A wide table in CSV: one pass for the labels, then one for the drawn rows' feature columns, block by block
    (a CSV has no row groups to skip, but nothing is held whole)."""
    from pyarrow import csv

    fs, paths = files
    for path in paths:
        with fs.open(path, "rb") as f:
            start = f.read(4)
        if start[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in start:
            raise InvalidDataset(
                f"{fs.unstrip_protocol(path)} is not UTF-8 text (UTF-16 or binary): save the CSV as UTF-8"
            )
    try:
        with fs.open(paths[0], "rb") as f:
            schema = csv.open_csv(f).schema
        columns = resolve_columns(schema, columns)
        check_columns(schema, columns)
    except TensorTableError as error:
        raise InvalidDataset(f"{fs.unstrip_protocol(paths[0])}: {error}") from None
    except (pa.ArrowException, OSError) as error:
        raise InvalidDataset(
            f"{fs.unstrip_protocol(paths[0])} is not a readable CSV file ({str(error).splitlines()[0][:200]}): fix it"
        ) from None
    if not columns.wide:
        raise InvalidDataset(
            f"{url} is CSV, which holds one value per column: name the feature columns with --feature-columns "
            "(names or globs, e.g. f_*)"
        )
    given = _GivenSplits.of(url, fs, paths, columns, root)
    split_column = given.wanted(schema)
    labels_per_file = []
    for path in paths:
        batches = list(_csv_batches(fs, path, [*_label_or_row_column(columns), *split_column]))
        try:
            labels_per_file.append(np.concatenate([read_labels(b, columns) for b in batches] or [_no_rows(columns)]))
        except TensorTableError as error:
            raise InvalidDataset(f"{fs.unstrip_protocol(path)}: {error}") from None
        column = (
            pa.chunked_array([b.column(1) for b in batches] or [pa.array([], pa.string())]) if split_column else None
        )
        given.add(path, len(labels_per_file[-1]), column)
    labels = np.concatenate(labels_per_file)
    if not len(labels):
        raise InvalidDataset(f"the data set {url} is empty: point it at a table with samples")
    codes, origin = given.result()
    if first_only:
        chosen = np.arange(1)
    else:
        chosen = np.arange(len(labels)) if draw is None else draw.indices(labels, f"{draw.role} {url}", codes)
    check_source_size(url, len(labels), 4 * len(columns.wide), len(chosen))
    if labels.ndim == 1:
        check_label_range(url, int(labels.max()))
    by_position = np.argsort(chosen, kind="stable")
    wanted = chosen[by_position]
    features = np.empty((len(chosen), len(columns.wide)), np.float32)
    filled, start = 0, 0
    for path in paths:
        for batch in _csv_batches(fs, path, list(columns.wide)):
            lo, hi = np.searchsorted(wanted, [start, start + batch.num_rows])
            if lo < hi:
                try:
                    values = features_to_numpy(batch.take(pa.array(wanted[lo:hi] - start)), {}, columns)
                except TensorTableError as error:
                    raise InvalidDataset(f"{fs.unstrip_protocol(path)}: {error}") from None
                features[by_position[filled : filled + len(values)]] = values
                filled += len(values)
            start += batch.num_rows
    read = TensorTable(features, labels[chosen], {})
    return _with_source(_with_given_splits(read, None if codes is None else codes[chosen], origin), url)


def _parquet_files(
    url: str, since: datetime | None = None, listing: Listing | None = None
) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The Parquet files of a source URL (a file, or every ``*.parquet`` below a directory, sorted; from
    ``listing`` when the source was listed already); with ``since``, only those modified at or after it."""
    if listing is not None:
        files = [p for p in listing.files if p.endswith(".parquet")] if listing.is_dir else list(listing.files)
        if not files:
            raise InvalidDataset(f"no .parquet files under {url!r}: point --dataset at a Parquet file or directory")
        return listing.fs, _modified_since(listing.fs, files, since, url, ".parquet file")
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
    return fs, _modified_since(fs, files, since, url, ".parquet file")


def modified_at(fs: fsspec.AbstractFileSystem, path: str) -> datetime:
    """When a file was last written, from the listing (mtime locally, LastModified on S3, updated on GCS, ...)."""
    info = fs.info(path)
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, timezone.utc)
        if isinstance(value, str):
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    raise InvalidDataset(
        f"{fs.unstrip_protocol(path)}: the storage does not say when it was modified, so --since / --window-days "
        "cannot select it: put each day's files under a dated path and use a {date} template instead"
    )


DATE_TEMPLATE = re.compile(r"\{date(?::([^{}]*))?\}")


def resolve_source(
    dataset: str, run_time: datetime, since: date | None = None, window_days: int | None = None
) -> tuple[str, datetime | None]:
    """The source a run reads: ``{date}`` / ``{date:%Y/%m/%d}`` in the URL filled with the run's date, and the
    earliest modification time of the files it trains on (``since``, or ``window_days`` before the run's date)."""
    url = DATE_TEMPLATE.sub(lambda m: run_time.strftime(m.group(1) or "%Y-%m-%d"), dataset)
    if window_days is not None:
        since = (run_time - timedelta(days=window_days)).date()
    return url, None if since is None else datetime.combine(since, time(), timezone.utc)


def _image_folder(
    url: str, since: datetime | None, listing: Listing | None, given_splits: bool = True
) -> ImageFolder | None:
    """The source as an image folder; None when it is not one (a Parquet or CSV source, or a name)."""
    if listing is None or not listing.is_dir or not is_image_folder(listing.files):
        return None
    folder = list_image_folder(listing.fs, listing.path, url, listing.files, since, modified_at, given_splits)
    if not folder.paths:
        raise InvalidDataset(
            f"no image under {url!r} was modified since {since:%Y-%m-%d %H:%M} UTC: widen --window-days or move "
            "--since back"
        )
    return folder


def source_fingerprint(name: str, since: datetime | None = None) -> str:
    """What the source holds now, cheaply: for a URL, each file's path, size and ETag / checksum / mtime (as the
    backend offers). Part of the sampling stage's cache key, so new or changed files mean a new sample."""
    return open_source(name, since).fingerprint()


def files_fingerprint(fs: fsspec.AbstractFileSystem, files: list[str]) -> str:
    """sha256 of each file's path, size and ETag / checksum / mtime, as the backend offers: cheap (no reads). A
    backend that offers none gets the file's content hashed instead (a read), never just its size."""
    listing = []
    for path in files:
        info = fs.info(path)
        version = next(
            (
                str(info[k])
                for k in ("ETag", "etag", "md5Hash", "checksum", "mtime", "LastModified", "last_modified", "created")
                if info.get(k) is not None
            ),
            "",
        )
        listing.append([path, info.get("size"), version or f"sha256:{_content_sha256(fs, path)}"])
    return hashlib.sha256(json.dumps(listing, sort_keys=True, default=str).encode()).hexdigest()


def _content_sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _reading(fs: fsspec.AbstractFileSystem, path: str, columns: Columns) -> Iterator[pq.ParquetFile]:
    """Open one Parquet file of a source; any problem with it becomes a one-line error naming the file."""
    try:
        with fs.open(path, "rb") as f:
            # No pre-buffering: pyarrow would otherwise read whole column chunks ahead (see storage/tables.py).
            parquet = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
            check_columns(parquet.schema_arrow, columns)
            yield parquet
    except TensorTableError as error:
        raise InvalidDataset(f"{fs.unstrip_protocol(path)}: {error}") from None
    except (pa.ArrowException, OSError) as error:
        raise InvalidDataset(
            f"{fs.unstrip_protocol(path)} is not a readable Parquet file ({str(error).splitlines()[0]}): "
            "rewrite it, or remove it from the directory"
        ) from None


def _resolved(fs: fsspec.AbstractFileSystem, files: list[str], columns: Columns) -> Columns:
    """The columns as the source's first file names them (a wide table's globs expanded): its footer only."""
    try:
        with fs.open(files[0], "rb") as f:
            schema = pq.ParquetFile(f).schema_arrow
        return resolve_columns(schema, columns)
    except TensorTableError as error:
        raise InvalidDataset(f"{fs.unstrip_protocol(files[0])}: {error}") from None
    except (pa.ArrowException, OSError):
        return columns  # _reading says what is wrong with the file


def _with_source(loaded: TensorTable, url: str) -> TensorTable:
    meta = dict(loaded.metadata)
    meta["source"] = url
    if "value_range" not in meta:
        # Raw uint8 values are pixels: scale by their type's range, not by what this sample happens to contain.
        features = loaded.features
        meta["value_range"] = (
            [0.0, 255.0]
            if features.dtype == np.uint8 or not len(features)
            else [float(np.nanmin(features)), float(np.nanmax(features))]
        )
    return TensorTable(loaded.features, loaded.labels, meta, loaded.splits)


def _without_given_splits(table: TensorTable) -> TensorTable:
    meta = {k: v for k, v in table.metadata.items() if k != SPLIT_ORIGIN}
    return TensorTable(table.features, table.labels, meta)


def _with_given_splits(table: TensorTable, codes: np.ndarray | None, origin: dict[str, str]) -> TensorTable:
    if codes is None:
        return table
    return TensorTable(table.features, table.labels, {**table.metadata, SPLIT_ORIGIN: origin}, codes)


def _root(listing: Listing | None, files: list[str]) -> str:
    """The folder a source's file paths are read below (for the splits their folders or names give)."""
    return listing.path if listing is not None and listing.is_dir else posixpath.dirname(files[0])


@dataclass
class _GivenSplits:
    """Each row's given split, gathered while a source is read file by file: from the file's split column, else
    from its path (``tasks.data.splits.split_of_path``)."""

    url: str
    fs: fsspec.AbstractFileSystem
    column: str | None  # None: --splits resplit, nothing is gathered
    file_splits: dict[str, str] | None
    root: str

    def __post_init__(self) -> None:
        self.codes: list[np.ndarray | None] = []
        self.paths: list[str] = []
        self.any_column = False

    @classmethod
    def of(cls, url: str, fs: fsspec.AbstractFileSystem, files: list[str], columns: Columns, root: str) -> _GivenSplits:
        names = splits_of_files(files, root, url) if columns.split else None
        return cls(url, fs, columns.split, dict(zip(files, names)) if names else None, root)

    def wanted(self, schema: pa.Schema) -> list[str]:
        """The split column to read with the labels, when this file has one."""
        return [self.column] if self.column and self.column in schema.names else []

    def add(self, path: str, rows: int, column: pa.ChunkedArray | pa.Array | None) -> None:
        self.paths.append(path)
        if column is not None:
            self.codes.append(codes_of_column(column, self.fs.unstrip_protocol(path)))
            self.any_column = True
        elif self.file_splits:
            self.codes.append(split_codes([self.file_splits[path]]).repeat(rows))
        else:
            self.codes.append(None)

    def result(self) -> tuple[np.ndarray | None, dict[str, str]]:
        """Every row's split code and where each split came from; (None, {}) when the source holds out nothing."""
        given = [c for c in self.codes if c is not None]
        if not given:
            return None, {}
        if len(given) < len(self.codes):
            bare = next(p for p, c in zip(self.paths, self.codes) if c is None)
            raise InvalidDataset(
                f"{self.fs.unstrip_protocol(bare)} has no {self.column!r} column, while other files of {self.url} "
                "do: give every file the column, or pass --splits resplit to ignore it"
            )
        codes = np.concatenate(given)
        if not (codes != SPLITS.index("train")).any():
            return None, {}
        if self.any_column or not self.file_splits:
            return codes, origin_of_column(codes)
        return codes, origin_of_files(self.paths, self.root, [self.file_splits[p] for p in self.paths])


def _survey(fs: fsspec.AbstractFileSystem, files: list[str], columns: Columns) -> tuple[int, int | None, int | None]:
    """From the files' footers only: rows declared, bytes per decoded sample (None when the type does not say),
    and the largest label the column statistics record (None without statistics)."""
    rows, sample_bytes, largest = 0, None, None
    for path in files:
        with _reading(fs, path, columns) as parquet:
            rows += parquet.metadata.num_rows
            schema = parquet.schema_arrow
            sample_bytes = 4 * len(columns.wide) if columns.wide else _declared_bytes(schema, columns)
            label_index = parquet.schema_arrow.get_field_index(columns.label)
            classes = columns.targets in (None, "classes") and label_index >= 0
            for group in range(parquet.num_row_groups if classes else 0):
                column = parquet.metadata.row_group(group).column(label_index)
                stats = column.statistics
                if stats is not None and stats.has_min_max and isinstance(stats.max, int):
                    largest = stats.max if largest is None else max(largest, stats.max)
    return rows, sample_bytes, largest


def _declared_bytes(schema: pa.Schema, columns: Columns) -> int | None:
    """Bytes per sample as the feature columns' types declare them (None when one does not say); packed inputs
    take at most four times their stored bytes (uint8 values packed as float32)."""
    if not columns.inputs:
        return declared_sample_bytes(schema.field(columns.features).type)
    sizes = [declared_sample_bytes(schema.field(name).type) for name in columns.inputs]
    return None if None in sizes else 4 * sum(size or 0 for size in sizes)


def _check_survey(
    url: str, fs: fsspec.AbstractFileSystem, files: list[str], columns: Columns, held_rows: int | None = None
) -> tuple[int, int | None]:
    """Refuse a source the limits do not allow, before its data is read; returns its rows (as its footers declare
    them) and bytes per sample."""
    rows, sample_bytes, largest = _survey(fs, files, columns)
    check_source_size(url, rows, sample_bytes, held_rows)
    if largest is not None:
        check_label_range(url, largest)
    return rows, sample_bytes


def _different_schemas(url: str) -> InvalidDataset:
    return InvalidDataset(f"the Parquet files under {url!r} have different schemas: give them one schema")


def _read_parquet_source(
    url: str, columns: Columns, since: datetime | None = None, listing: Listing | None = None
) -> TensorTable:
    fs, files = _parquet_files(url, since, listing)
    columns = _resolved(fs, files, columns)
    declared_rows, sample_bytes = _check_survey(url, fs, files, columns)
    if sample_bytes is None:
        # Samples of no declared size (encoded images): their decoded size is checked from the images' headers,
        # against the whole column at once, before any is decoded; group by group would check each group alone.
        return _read_parquet_whole(url, fs, files, columns, listing)
    given = _GivenSplits.of(url, fs, files, columns, _root(listing, files))
    wanted = [*columns.feature_names(), *columns.label_names()]
    # Row group by row group into one array (check_source_size bounded its size from the footers): a file read
    # whole, then converted, held the source twice.
    features: np.ndarray | None = None
    labels: list[np.ndarray] = []
    schema: pa.Schema | None = None
    meta: dict[str, Any] = {}
    filled = 0
    for path in files:
        with _reading(fs, path, columns) as parquet:
            file_start = filled
            for group in range(parquet.num_row_groups):
                part = parquet.read_row_group(group, columns=wanted)
                try:
                    if schema is None:
                        schema = part.schema
                        meta = source_metadata(schema, columns)
                        columns = columns.with_targets_of(meta)
                        check_columns(schema, columns)
                    elif not part.schema.equals(schema, check_metadata=False):
                        raise _different_schemas(url)
                    values = features_to_numpy(part, meta, columns)
                    labels.append(read_labels(part, columns))
                except TensorTableError as error:
                    raise InvalidDataset(f"{url}: {error}") from None
                if features is None:
                    features = np.empty((declared_rows, *values.shape[1:]), values.dtype)
                elif values.shape[1:] != features.shape[1:] or values.dtype != features.dtype:
                    raise _different_schemas(url)
                if filled + len(values) > len(features):
                    raise InvalidDataset(f"{fs.unstrip_protocol(path)} holds more rows than its footer declares: "
                                         "rewrite it")  # fmt: skip
                features[filled : filled + len(values)] = values
                filled += len(values)
            split_column = given.wanted(parquet.schema_arrow)
            split = parquet.read(columns=split_column).column(0) if split_column else None
            given.add(path, filled - file_start, split)
    if features is None or schema is None:  # no row group at all: the table as an empty file gives it
        return _read_parquet_whole(url, fs, files, columns, listing)
    try:
        loaded = TensorTable(features[:filled], np.concatenate(labels), meta)
    except TensorTableError as error:
        raise InvalidDataset(f"{url}: {error}") from None
    return _with_source(_with_given_splits(loaded, *given.result()), url)


def _read_parquet_whole(
    url: str, fs: fsspec.AbstractFileSystem, files: list[str], columns: Columns, listing: Listing | None
) -> TensorTable:
    """Each file read whole, then converted at once."""
    given = _GivenSplits.of(url, fs, files, columns, _root(listing, files))
    tables = []
    wanted = [*columns.feature_names(), *columns.label_names()]
    for path in files:
        with _reading(fs, path, columns) as parquet:
            split_column = given.wanted(parquet.schema_arrow)
            read = parquet.read(columns=wanted + split_column)
            given.add(path, read.num_rows, read.column(split_column[0]) if split_column else None)
            tables.append(read.select(wanted))
    try:
        table = pa.concat_tables(tables)
    except pa.ArrowInvalid:
        raise _different_schemas(url) from None
    try:
        loaded = arrow_to_tensor_table(table, columns)
    except TensorTableError as error:
        raise InvalidDataset(f"{url}: {error}") from None
    return _with_source(_with_given_splits(loaded, *given.result()), url)


def _label_or_row_column(columns: Columns) -> list[str]:
    """The column a first pass over a source reads: the labels, or, for unlabeled data, one feature column (only
    to count the rows)."""
    return columns.label_names() or columns.feature_names()[:1]


def _no_rows(columns: Columns) -> np.ndarray:
    """The labels of no rows, shaped as ``columns.targets`` says."""
    if columns.targets == "none":
        return no_labels(0)
    return np.zeros((0, 1), np.float32) if columns.targets == "values" else np.zeros(0, np.int64)


@dataclass(frozen=True)
class Draw:
    """A seeded, stratified draw of ``size`` samples, made while reading a source: ``what``, ``option`` and
    ``min_per_class`` shape its errors (see ``tasks.data.stratify.draw_stratified``)."""

    size: int
    seed: tuple[int, ...]
    role: str = "the data set"
    what: str = "sample"
    option: str = "--sample-size"
    min_per_class: int = 0
    # A calibration draw: never from a test split the source gives (it stays unseen until validation).
    outside_test_split: bool = False

    def indices(self, labels: np.ndarray, where: str, splits: np.ndarray | None = None) -> np.ndarray:
        """Positions in ``labels`` of the drawn rows; ``splits``: each row's given split, if any."""
        pool = np.arange(len(labels))
        if self.outside_test_split and splits is not None:
            pool = np.flatnonzero(splits != SPLITS.index("test"))
            where = f"{where} (outside its test split)"
        if self.min_per_class:
            check_class_labels(labels[pool])
        return pool[
            draw_stratified(
                labels[pool],
                self.size,
                np.random.default_rng(list(self.seed)),
                what=self.what,
                where=where,
                option=self.option,
                min_per_class=self.min_per_class,
            )
        ]


BATCH_BYTES = 16 << 20
UNKNOWN_SIZE_BATCH_ROWS = 1024  # samples of a type with no fixed size (variable lists, binary): read few at once


def _draw_from_parquet_source(
    url: str, columns: Columns, draw: Draw, since: datetime | None = None, listing: Listing | None = None
) -> TensorTable:
    """Two passes: every file's label column (8 bytes a row), then, in batches of about ``BATCH_BYTES``, only the
    row groups holding drawn rows; a source of any size is never held whole."""
    fs, files = _parquet_files(url, since, listing)
    columns = _resolved(fs, files, columns)
    _, sample_bytes = _check_survey(url, fs, files, columns, held_rows=draw.size)
    given = _GivenSplits.of(url, fs, files, columns, _root(listing, files))
    labels_per_file = []
    for path in files:
        with _reading(fs, path, columns) as parquet:
            split_column = given.wanted(parquet.schema_arrow)
            read = parquet.read(columns=[*_label_or_row_column(columns), *split_column])
            try:
                labels_per_file.append(read_labels(read, columns))
            except TensorTableError as error:
                raise InvalidDataset(f"{fs.unstrip_protocol(path)}: {error}") from None
            given.add(path, read.num_rows, read.column(1) if split_column else None)
    labels = np.concatenate(labels_per_file) if labels_per_file else _no_rows(columns)
    if not len(labels):
        raise InvalidDataset(f"{draw.role} {url} is empty: point it at a table with samples")
    codes, origin = given.result()
    chosen = draw.indices(labels, f"{draw.role} {url}", codes)
    # Rows are read in file order (sorted) and written straight to their place in the draw's order (classes
    # interleaved, as an in-memory draw gives them): one array of the sample's size, no concatenation copies.
    by_position = np.argsort(chosen, kind="stable")
    wanted = chosen[by_position]
    features: np.ndarray | None = None
    filled = 0
    metadata: dict[str, Any] | None = None
    file_start = 0
    for path, file_labels in zip(files, labels_per_file):
        with _reading(fs, path, columns) as parquet:
            meta = source_metadata(parquet.schema_arrow, columns)
            metadata = meta if metadata is None else metadata
            group_start = file_start
            for group in range(parquet.num_row_groups):
                info = parquet.metadata.row_group(group)
                lo, hi = np.searchsorted(wanted, [group_start, group_start + info.num_rows])
                if lo < hi:
                    in_group = wanted[lo:hi] - group_start
                    # From the schema, not from the file's own account of its size, which may be false.
                    rows = max(1, BATCH_BYTES // sample_bytes) if sample_bytes else UNKNOWN_SIZE_BATCH_ROWS
                    batch_start = 0
                    for batch in parquet.iter_batches(
                        batch_size=rows, row_groups=[group], columns=columns.feature_names()
                    ):
                        a, b = np.searchsorted(in_group, [batch_start, batch_start + batch.num_rows])
                        if a < b:
                            taken = batch.take(pa.array(in_group[a:b] - batch_start))
                            try:
                                values = features_to_numpy(taken, meta, columns)
                            except TensorTableError as error:
                                raise InvalidDataset(f"{fs.unstrip_protocol(path)}: {error}") from None
                            if features is None:
                                features = np.empty((len(chosen), *values.shape[1:]), values.dtype)
                            elif values.shape[1:] != features.shape[1:] or values.dtype != features.dtype:
                                raise InvalidDataset(
                                    f"the Parquet files under {url!r} have different schemas: give them one schema"
                                )
                            features[by_position[filled : filled + len(values)]] = values
                            filled += len(values)
                        batch_start += batch.num_rows
                group_start += info.num_rows
        file_start += len(file_labels)
    if features is None:  # no row was chosen: callers ask for at least one
        raise TensorTableError(f"{url}: no rows to read")
    drawn = TensorTable(features, labels[chosen], metadata or {})
    return _with_source(_with_given_splits(drawn, None if codes is None else codes[chosen], origin), url)


def peek_dataset(name: str, columns: Columns = Columns()) -> TensorTable:
    """The source's first sample (one row group read at most): enough to check its shape and type cheaply."""
    return open_source(name, given_splits=columns.split is not None).peek(columns)


def load_dataset(
    name: str, columns: Columns = Columns(), draw: Draw | None = None, since: datetime | None = None
) -> TensorTable:
    """Load a built-in data set by name, or a Parquet file or directory by URL; with ``draw``, only a seeded,
    stratified sample of it (read from Parquet by row groups, never whole).

    Raises:
        InvalidDataset: unknown name, missing or unreadable source, a table ptqflow cannot use, or a draw the
            source cannot give.
    """
    return open_source(name, since, given_splits=columns.split is not None).load(columns, draw)


class Source(Protocol):
    """A data source opened by its kind (``SOURCE_KINDS``): what sampling fingerprints, peeks at and loads."""

    def fingerprint(self) -> str:
        """What the source holds now, without reading it (part of the sampling stage's cache key)."""
        ...

    def peek(self, columns: Columns) -> TensorTable:
        """The first sample, read as cheaply as the kind allows."""
        ...

    def load(self, columns: Columns, draw: Draw | None) -> TensorTable:
        """Every sample, or ``draw``'s seeded, stratified choice of them."""
        ...


@dataclass(frozen=True)
class BuiltinSource:
    name: str

    def fingerprint(self) -> str:
        return f"builtin:{self.name}"

    def peek(self, columns: Columns) -> TensorTable:
        return self.load(columns, None).take(np.arange(1))

    def load(self, columns: Columns, draw: Draw | None) -> TensorTable:
        _inputs_need_parquet(columns, f"{self.name} is a built-in data set")
        table = _class_labels_as_asked(BUILTIN_DATASETS[self.name](), columns, self.name)
        if columns.split is None:
            table = _without_given_splits(table)
        if draw is None:
            return table
        return table.take(draw.indices(table.labels, f"{draw.role} {self.name}", table.splits))


@dataclass(frozen=True)
class ImageFolderSource:
    name: str
    folder: ImageFolder

    def fingerprint(self) -> str:
        return files_fingerprint(self.folder.fs, list(self.folder.paths))

    def peek(self, columns: Columns) -> TensorTable:
        _inputs_need_parquet(columns, f"{self.name} is an image folder")
        return _read_images(self.folder, np.arange(1), columns)

    def load(self, columns: Columns, draw: Draw | None) -> TensorTable:
        name, folder = self.name, self.folder
        _inputs_need_parquet(columns, f"{name} is an image folder")
        check_source_size(name, len(folder.paths), None, draw.size if draw else None)
        check_label_range(name, len(folder.class_names) - 1)
        labels = _class_labels_for(folder.labels, columns, name)
        where = name if draw is None else f"{draw.role} {name}"
        chosen = np.arange(len(folder.paths)) if draw is None else draw.indices(labels, where, folder.splits)
        return _class_labels_as_asked(_read_images(folder, chosen, columns), columns, name)


@dataclass(frozen=True)
class CsvSource:
    name: str
    files: tuple[fsspec.AbstractFileSystem, list[str]]
    root: str

    def fingerprint(self) -> str:
        return files_fingerprint(*self.files)

    def peek(self, columns: Columns) -> TensorTable:
        _inputs_need_parquet(columns, f"{self.name} is CSV")
        return _read_csv_source(self.name, self.files, columns, None, self.root, first_only=True)

    def load(self, columns: Columns, draw: Draw | None) -> TensorTable:
        _inputs_need_parquet(columns, f"{self.name} is CSV")
        return _read_csv_source(self.name, self.files, columns, draw, self.root)


@dataclass(frozen=True)
class ParquetSource:
    name: str
    since: datetime | None
    listing: Listing | None

    def fingerprint(self) -> str:
        return files_fingerprint(*_parquet_files(self.name, self.since, self.listing))

    def peek(self, columns: Columns) -> TensorTable:
        fs, files = _parquet_files(self.name, self.since, self.listing)
        columns = _resolved(fs, files, columns)
        with _reading(fs, files[0], columns) as parquet:
            names = [*columns.feature_names(), *columns.label_names()]
            for batch in parquet.iter_batches(batch_size=1, columns=names):
                try:
                    return _with_source(arrow_to_tensor_table(pa.Table.from_batches([batch]), columns), self.name)
                except TensorTableError as error:
                    raise InvalidDataset(f"{fs.unstrip_protocol(files[0])}: {error}") from None
        raise InvalidDataset(f"{fs.unstrip_protocol(files[0])} is empty: point it at a table with samples")

    def load(self, columns: Columns, draw: Draw | None) -> TensorTable:
        if draw is None:
            return _read_parquet_source(self.name, columns, self.since, self.listing)
        return _draw_from_parquet_source(self.name, columns, draw, self.since, self.listing)


def _builtin(name: str, since: datetime | None, listing: Listing | None, given_splits: bool) -> Source | None:
    return BuiltinSource(name) if is_builtin(name) else None


def _images(name: str, since: datetime | None, listing: Listing | None, given_splits: bool) -> Source | None:
    folder = _image_folder(name, since, listing, given_splits)
    return None if folder is None else ImageFolderSource(name, folder)


def _csv(name: str, since: datetime | None, listing: Listing | None, given_splits: bool) -> Source | None:
    files = _csv_files(name, since, listing)
    return None if files is None else CsvSource(name, files, _root(listing, files[1]))


def _parquet(name: str, since: datetime | None, listing: Listing | None, given_splits: bool) -> Source | None:
    return ParquetSource(name, since, listing)


# The slot for a new kind of source: a function that opens a name or URL as that kind, or answers None when it is
# not one, listed here. Asked in this order; Parquet, last, takes any URL and says what is wrong with it when it
# is not a table. Sampling's fingerprint, the CLI's checks (peek) and the load all open sources here.
SOURCE_KINDS: dict[str, Callable[[str, datetime | None, Listing | None, bool], Source | None]] = {
    "builtin": _builtin,
    "images": _images,
    "csv": _csv,
    "parquet": _parquet,
}


def open_source(name: str, since: datetime | None = None, given_splits: bool = True) -> Source:
    """``name`` (a built-in name or a URL) opened as the first kind in ``SOURCE_KINDS`` that claims it; with
    ``since``, only its files modified since; ``given_splits``: whether an image folder's split folders are read
    as splits."""
    listing = None if is_builtin(name) else list_source(name)
    for opener in SOURCE_KINDS.values():
        if (source := opener(name, since, listing, given_splits)) is not None:
            return source
    raise InvalidDataset(f"no kind of source ({', '.join(SOURCE_KINDS)}) reads {name!r}: point --dataset at one")


def _inputs_need_parquet(columns: Columns, what: str) -> None:
    if columns.inputs:
        raise InvalidDataset(
            f"{what}, whose samples feed one model input: --feature-column {','.join(columns.inputs)} needs a Parquet "
            "source with one column per input"
        )


def _class_labels_for(labels: np.ndarray, columns: Columns, name: str) -> np.ndarray:
    """The class labels of a source that gives classes (a built-in data set, an image folder's class folders), for
    the task: unlabeled drops them; regression finds no targets in them."""
    if columns.targets == "values":
        raise InvalidDataset(
            f"{name} labels its samples with classes, not numeric targets: use --task classification, or give a "
            "table whose --label-column holds the targets"
        )
    return no_labels(len(labels)) if columns.targets == "none" else labels


def _class_labels_as_asked(table: TensorTable, columns: Columns, name: str) -> TensorTable:
    labels = _class_labels_for(table.labels, columns, name)
    return table if labels is table.labels else TensorTable(table.features, labels, table.metadata, table.splits)


def _read_images(folder: ImageFolder, chosen: np.ndarray, columns: Columns) -> TensorTable:
    def within_limits(sample_shape: tuple[int, ...]) -> None:
        check_source_size(folder.url, len(folder.paths), int(np.prod(sample_shape)), len(chosen))

    features = decode_images(folder, chosen, columns, before_allocating=within_limits)
    read = TensorTable(features, folder.labels[chosen], image_metadata(folder, features.shape[1:]))
    codes = None if folder.splits is None else folder.splits[chosen]
    return _with_source(_with_given_splits(read, codes, folder.split_origin), folder.url)
