"""Tensor tables: how ptqflow reads and writes samples as Parquet.

Layout written (measured by ``benchmarks/tensor_layout.py``; see README "Tensor tables"):

* ``features``: ``fixed_size_binary(prod(shape) * itemsize)``, one sample's raw values per row, C order;
* ``label``: ``int64`` class indices; for regression targets a ``fixed_size_list<float32>[k]``; absent for unlabeled
  data;
* schema metadata key ``ptqflow`` (JSON): ``{"shape": [...], "dtype": "uint8"|"float32", "targets": "classes"|
  "values"|"none", ...}`` plus whatever the writer adds about the data set (value range, class names, source).

A model with several inputs reads several feature columns (``Columns.inputs``); each row's values are packed side
by side, flattened, into the one ``features`` array (float32 unless every input is uint8), and the metadata's
``inputs`` (``[{"name", "shape", "dtype"}, ...]``) says where each input's values are (``InputSlot``).

Arrow's canonical ``fixed_shape_tensor`` extension type (a fixed-size list underneath) is accepted on read, as is
a plain fixed-size list with the shape in the metadata, but it is an order of magnitude slower to write and read
than fixed-size binary, which maps to a numpy array with no copy.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FEATURES = "features"
LABEL = "label"
METADATA_KEY = b"ptqflow"
SUPPORTED_DTYPES = ("uint8", "float32")
# What a table's labels are: integer class indices, numeric targets (regression), or nothing (unlabeled data, for
# which the float model's own outputs are the reference).
TARGET_KINDS = ("classes", "values", "none")


class TensorTableError(ValueError):
    """A table that ptqflow cannot use; the message says what to change."""


INPUT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")  # what a model input and a .tflite signature can be named


@dataclass(frozen=True)
class InputSlot:
    """One model input's place in packed features: its name (the column's, and the model input's), the shape of
    one sample and the type it was stored as."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def input_slots(meta: dict[str, Any]) -> tuple[InputSlot, ...]:
    """The inputs a table's (checked) metadata declares; none for a table of one-input samples."""
    return tuple(InputSlot(i["name"], tuple(i["shape"]), i.get("dtype", "float32")) for i in meta.get("inputs") or ())


def split_inputs(features: np.ndarray, slots: tuple[InputSlot, ...]) -> list[np.ndarray]:
    """Packed features as one array per input, each of shape ``(n, *slot.shape)`` (views, no copy)."""
    flat = features.reshape(len(features), -1)
    parts, start = [], 0
    for slot in slots:
        parts.append(flat[:, start : start + slot.size].reshape(len(features), *slot.shape))
        start += slot.size
    return parts


@dataclass(frozen=True)
class TensorTable:
    """Samples in memory: ``features`` of shape ``(n, *shape)`` and their ``labels``: int64 class indices of shape
    ``(n,)``, float32 targets of shape ``(n, k)``, or none, shape ``(n, 0)``; ``splits``, when the source gives its
    own, each row's split (an index into ``tasks.data.splits.SPLITS``)."""

    features: np.ndarray
    labels: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    splits: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.features.dtype.name not in SUPPORTED_DTYPES:
            raise TensorTableError(
                f"features have dtype {self.features.dtype}: convert them to one of {', '.join(SUPPORTED_DTYPES)}"
            )
        if len(self.features) != len(self.labels):
            raise TensorTableError(
                f"{len(self.features)} feature rows but {len(self.labels)} labels: give one label per sample"
            )

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])

    @property
    def targets(self) -> str:
        """Which of ``TARGET_KINDS`` the labels are."""
        return target_kind(self.labels)

    @property
    def inputs(self) -> tuple[InputSlot, ...]:
        """Where each model input's values are in ``features``; none when the samples feed one input."""
        return input_slots(self.metadata)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray) -> TensorTable:
        return TensorTable(
            self.features[indices],
            self.labels[indices],
            dict(self.metadata),
            None if self.splits is None else self.splits[indices],
        )


def target_kind(labels: np.ndarray) -> str:
    if labels.ndim == 1:
        return "classes"
    return "values" if labels.shape[1] else "none"


def no_labels(rows: int) -> np.ndarray:
    """The labels of unlabeled data: none per row."""
    return np.zeros((rows, 0), np.float32)


def _labels_array(labels: np.ndarray) -> pa.Array:
    if labels.ndim == 1:
        return pa.array(labels.astype(np.int64), pa.int64())
    values = pa.array(np.ascontiguousarray(labels, np.float32).reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(values, labels.shape[1])


def _features_array(features: np.ndarray) -> pa.FixedSizeBinaryArray:
    flat = np.ascontiguousarray(features).reshape(len(features), -1)
    width = flat.shape[1] * flat.dtype.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(flat), [None, pa.py_buffer(flat.view(np.uint8))])


def to_arrow(table: TensorTable) -> pa.Table:
    meta = dict(table.metadata)
    meta.update(shape=list(table.sample_shape), dtype=table.features.dtype.name, targets=table.targets)
    arrays = [_features_array(table.features)]
    if table.targets != "none":
        arrays.append(_labels_array(table.labels))
    names = [FEATURES, LABEL][: len(arrays)]
    schema = pa.schema(
        [pa.field(name, array.type) for name, array in zip(names, arrays)],
        metadata={METADATA_KEY: json.dumps(meta, sort_keys=True).encode()},
    )
    return pa.Table.from_arrays(arrays, schema=schema)


ROW_GROUP_BYTES = 32 << 20


def rows_per_group(row_bytes: int, target_bytes: int = ROW_GROUP_BYTES) -> int:
    """Rows per Parquet row group so that a group holds about ``target_bytes``: a streaming reader holds one
    group at a time, so this bounds its memory whatever the sample size (8x8 digits or 256x256 RGB)."""
    return max(1, min(1 << 20, target_bytes // max(1, row_bytes)))


def write_parquet_bytes(table: TensorTable, row_group_size: int | None = None) -> bytes:
    """Serialise a tensor table to Parquet bytes (deterministic for the same table)."""
    sink = io.BytesIO()
    rows = row_group_size or rows_per_group(int(np.prod(table.sample_shape)) * table.features.dtype.itemsize)
    pq.write_table(to_arrow(table), sink, row_group_size=rows, compression="zstd")
    return sink.getvalue()


def write_parquet_rows(table: TensorTable, indices: np.ndarray) -> bytes:
    """``write_parquet_bytes(table.take(indices))``, gathered one row group at a time: the same bytes, without a
    copy of all the rows (a split of a large source would be most of the source again)."""
    rows = rows_per_group(int(np.prod(table.sample_shape)) * table.features.dtype.itemsize)
    if not len(indices):  # (no split is empty: sampling refuses that first)
        return write_parquet_bytes(table.take(indices), rows)
    sink = io.BytesIO()
    writer: pq.ParquetWriter | None = None
    for start in range(0, len(indices), rows):
        # Whole groups per call: the row groups, and so the file, are those pq.write_table writes in one call.
        part = to_arrow(table.take(indices[start : start + rows]))
        writer = writer or pq.ParquetWriter(sink, part.schema, compression="zstd")
        writer.write_table(part, row_group_size=rows)
    assert writer is not None
    writer.close()
    return sink.getvalue()


def source_metadata(schema: pa.Schema, columns: Columns) -> dict[str, Any]:
    """``table_metadata``, with the class names of a Hugging Face ``ClassLabel`` label column when ptqflow's own
    metadata gives none."""
    meta = table_metadata(schema)
    if "class_names" not in meta and (names := huggingface_class_names(schema, columns.label)):
        meta = {**meta, "class_names": names}
    if columns.inputs:
        slots = _slots_of(schema, meta, columns.inputs)
        meta = {k: v for k, v in meta.items() if k not in ("shape", "dtype")}
        meta["inputs"] = [slot.as_json() for slot in slots]
    return meta


def _slots_of(schema: pa.Schema, meta: dict[str, Any], names: tuple[str, ...]) -> tuple[InputSlot, ...]:
    """Each input column's sample shape and type, from the schema (and the shapes the metadata declares for
    columns whose type does not carry one): known before a row is read."""
    declared = {slot.name: slot for slot in input_slots(meta)}
    slots = []
    for name in names:
        if name not in schema.names:
            continue  # check_columns names every missing column
        if not INPUT_NAME.fullmatch(name):
            raise TensorTableError(
                f"column {name!r} cannot name a model input (a letter, then letters, digits or _): rename the column"
            )
        kind = schema.field(name).type
        if isinstance(kind, pa.FixedShapeTensorType):
            shape, dtype = tuple(kind.shape), kind.value_type
        elif pa.types.is_fixed_size_list(kind):
            shape, dtype = (kind.list_size,), kind.value_type
        elif _numeric(kind):
            shape, dtype = (1,), kind
        elif pa.types.is_fixed_size_binary(kind) and name in declared:
            slots.append(declared[name])
            continue
        else:
            raise TensorTableError(
                f"input column {name!r} has type {kind}: store each input as a fixed_shape_tensor, a fixed-size list "
                "or a number per row"
            )
        if name in declared and declared[name].size == int(np.prod(shape)):
            shape = declared[name].shape
        stored = "uint8" if pa.types.is_uint8(dtype) else "float32"
        slots.append(InputSlot(name, tuple(int(d) for d in shape), stored))
    return tuple(slots)


def table_metadata(schema: pa.Schema) -> dict[str, Any]:
    """The table's ``ptqflow`` schema metadata (shape, value range, class names), checked: it is written by
    whoever wrote the file.

    Raises:
        TensorTableError: it is not JSON of that form.
    """
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        shape, value_range, names = meta.get("shape"), meta.get("value_range"), meta.get("class_names")
        if meta.get("targets", "classes") not in TARGET_KINDS:
            raise ValueError(f"targets {meta.get('targets')!r} is none of {', '.join(TARGET_KINDS)}")
        if shape is not None and not _positive_shape(shape):
            raise ValueError(f"shape {shape!r} is not a list of positive integers")
        if value_range is not None and not (
            isinstance(value_range, list)
            and len(value_range) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value_range)
        ):
            raise ValueError(f"value_range {value_range!r} is not [low, high]")
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ValueError("class_names is not a list of strings")
        _check_declared_inputs(meta.get("inputs"), shape)
    except ValueError as error:  # json.JSONDecodeError is a ValueError
        raise TensorTableError(
            f"the table's '{METADATA_KEY.decode()}' schema metadata is malformed ({str(error)[:120]}): write the file "
            "without it (ptqflow then reads shape and range from the data and --input-shape)"
        ) from None
    return meta


def _positive_shape(shape: Any) -> bool:
    return (
        isinstance(shape, list)
        and bool(shape)
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    )


def _check_declared_inputs(inputs: Any, shape: Any) -> None:
    """Raise ValueError unless ``inputs`` is None or a list of distinct, well-named inputs with shapes and types
    (packed into ``shape``, when the table gives it)."""
    if inputs is None:
        return
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise ValueError("inputs is not a list of objects")
    names = [i.get("name") for i in inputs]
    for entry, name in zip(inputs, names):
        if not isinstance(name, str) or not INPUT_NAME.fullmatch(name):
            raise ValueError(f"input name {name!r} is not a letter followed by letters, digits or _")
        if not _positive_shape(entry.get("shape")):
            raise ValueError(f"input {name!r} shape {entry.get('shape')!r} is not a list of positive integers")
        if entry.get("dtype", "float32") not in SUPPORTED_DTYPES:
            raise ValueError(f"input {name!r} dtype {entry.get('dtype')!r} is none of {', '.join(SUPPORTED_DTYPES)}")
    if len(set(names)) != len(names):
        raise ValueError("inputs names one input twice")
    if shape is not None and inputs and [sum(int(np.prod(i["shape"])) for i in inputs)] != shape:
        raise ValueError(f"inputs do not add up to the features' shape {shape}")


@dataclass(frozen=True)
class Columns:
    """Which columns hold the samples and the labels, and the sample shape when the table does not say."""

    features: str = FEATURES
    label: str = LABEL
    shape: tuple[int, ...] | None = None
    # Image folders only: the size every image is resized to (height, width), and rgb or grayscale.
    image_size: tuple[int, int] | None = None
    color_mode: str | None = None
    # Wide tables: one numeric column per feature, by name or glob ("f_*"); resolve_columns expands the globs.
    wide: tuple[str, ...] | None = None
    # Models with several inputs: one feature column per input, in the order the model takes them.
    inputs: tuple[str, ...] | None = None
    # The column naming each row's split (train / validation / test); None ignores the splits a source gives
    # (this column, and folders or files named after splits): --splits resplit.
    split: str | None = "split"
    # What the label column holds (one of TARGET_KINDS; "none" reads no label column even if there is one); None:
    # what the table's metadata says, else classes.
    targets: str | None = None

    def feature_names(self) -> list[str]:
        return list(self.wide or self.inputs or [self.features])

    def label_names(self) -> list[str]:
        """The label column to read: none for unlabeled data."""
        return [] if self.targets == "none" else [self.label]

    def with_targets_of(self, meta: dict[str, Any]) -> Columns:
        """These columns, with ``targets`` from a table's metadata when they do not say."""
        return self if self.targets is not None else replace(self, targets=meta.get("targets", "classes"))


def _numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def resolve_columns(schema: pa.Schema, columns: Columns) -> Columns:
    """The columns as this schema names them. ``wide`` globs expand to the matching columns, in schema order; a
    table with the label but no features column is wide too, with every numeric column but the label.

    Raises:
        TensorTableError: a name or glob that matches no column, or a feature column that is not numeric.
    """
    if columns.inputs:
        return columns  # one named column per model input: never a wide table
    if columns.wide:
        unmatched = [p for p in columns.wide if not any(fnmatch.fnmatchcase(n, p) for n in schema.names)]
        if unmatched:
            raise TensorTableError(
                f"--feature-columns {unmatched[0]!r} matches no column (the table has {', '.join(schema.names)})"
            )
        names = [
            n
            for n in schema.names
            if n not in (columns.label, columns.split) and any(fnmatch.fnmatchcase(n, p) for p in columns.wide)
        ]
    elif columns.features not in schema.names and (columns.label in schema.names or columns.targets == "none"):
        names = [n for n in schema.names if n not in (columns.label, columns.split) and _numeric(schema.field(n).type)]
        if not names:
            return columns  # check_columns says the features column is missing
    else:
        return columns
    for name in names:
        if not _numeric(schema.field(name).type):
            raise TensorTableError(
                f"feature column {name!r} has type {schema.field(name).type}, not a number: leave it out of "
                "--feature-columns (or encode it as numbers)"
            )
    if columns.shape is not None:  # a wide table's sample is its columns, one value each: nothing to reshape
        raise TensorTableError(
            f"--input-shape {','.join(map(str, columns.shape))} does not apply to a wide table (its {len(names)} "
            "feature columns are one value each): leave --input-shape out, or store each sample as one fixed-size "
            "list column to give it a shape"
        )
    return replace(columns, wide=tuple(names))


def features_to_numpy(
    data: pa.Table | pa.RecordBatch, meta: dict[str, Any], columns: Columns = Columns()
) -> np.ndarray:
    """The samples of ``data``: its features column, a wide table's columns side by side as float32, or each input
    column's samples packed side by side (``meta["inputs"]``, from ``source_metadata``)."""
    if columns.inputs:
        return _packed_inputs(data, input_slots(meta))
    if not columns.wide:
        return column_to_numpy(data.column(columns.features), meta, columns)
    stacked = np.empty((data.num_rows, len(columns.wide)), np.float32)
    for i, name in enumerate(columns.wide):
        stacked[:, i] = _without_nulls(data.column(name), name).to_numpy(zero_copy_only=False)
    return stacked


def _without_nulls(column: pa.Array | pa.ChunkedArray, name: str) -> pa.Array:
    """``column`` as one array.

    Raises:
        TensorTableError: it has null rows.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if column.null_count:
        raise TensorTableError(f"column '{name}' has {column.null_count} null rows: drop them from the source")
    return column


def _packed_inputs(data: pa.Table | pa.RecordBatch, slots: tuple[InputSlot, ...]) -> np.ndarray:
    dtype = np.uint8 if all(slot.dtype == "uint8" for slot in slots) else np.float32
    packed = np.empty((data.num_rows, sum(slot.size for slot in slots)), dtype)
    start = 0
    for slot in slots:
        column = _without_nulls(data.column(slot.name), slot.name)
        if _numeric(column.type):
            values = column.to_numpy(zero_copy_only=False)
        else:
            one = {"shape": list(slot.shape), "dtype": slot.dtype}
            values = column_to_numpy(column, one, Columns(features=slot.name, shape=slot.shape))
        packed[:, start : start + slot.size] = values.reshape(data.num_rows, slot.size)
        start += slot.size
    return packed


def _shape_for(count: int, meta: dict[str, Any], columns: Columns) -> tuple[int, ...]:
    shape = tuple(columns.shape or meta.get("shape") or (count,))
    if int(np.prod(shape)) != count:
        raise TensorTableError(
            f"column '{columns.features}' holds {count} values per sample, which does not fit shape {list(shape)}: "
            "pass --input-shape with the sample's shape"
        )
    return shape


def _checked_dtype(values: np.ndarray, columns: Columns) -> np.ndarray:
    if values.dtype.name not in SUPPORTED_DTYPES:
        raise TensorTableError(
            f"column '{columns.features}' has values of type {values.dtype}: store them as uint8 (images) or float32"
        )
    return values


def column_to_numpy(
    column: pa.Array | pa.ChunkedArray, meta: dict[str, Any], columns: Columns = Columns()
) -> np.ndarray:
    name = columns.features
    column = _without_nulls(column, name)
    kind = column.type
    if isinstance(kind, pa.FixedShapeTensorType):
        values = column.to_numpy_ndarray()
        if columns.shape and tuple(values.shape[1:]) != tuple(columns.shape):
            values = values.reshape(len(values), *_shape_for(int(np.prod(values.shape[1:])), meta, columns))
        return _checked_dtype(values, columns)
    if pa.types.is_fixed_size_binary(kind):
        dtype = meta.get("dtype") or "uint8"
        if dtype not in SUPPORTED_DTYPES:
            raise TensorTableError(f"column '{name}' declares dtype {dtype!r}: ptqflow reads uint8 and float32")
        width = kind.byte_width
        if meta.get("shape") is None and columns.shape is None:
            raise TensorTableError(
                f"column '{name}' is fixed-size binary with no shape in the schema metadata: pass --input-shape"
            )
        raw = np.frombuffer(column.buffers()[1], dtype=np.uint8)
        raw = raw[column.offset * width : (column.offset + len(column)) * width].view(np.dtype(dtype))
        return raw.reshape(len(column), *_shape_for(width // np.dtype(dtype).itemsize, meta, columns))
    if pa.types.is_fixed_size_list(kind):
        values = column.flatten().to_numpy(zero_copy_only=False)
        return _checked_dtype(values.reshape(len(column), *_shape_for(kind.list_size, meta, columns)), columns)
    encoded = _encoded_images(column)
    if encoded is not None:
        return _decoded(encoded, columns)
    raise TensorTableError(
        f"column '{name}' has type {kind}: store samples as fixed_shape_tensor, fixed-size list or fixed-size binary"
    )


def _encoded_images(column: pa.Array) -> pa.Array | None:
    """The image bytes of a column of encoded images: binary, or the Hugging Face ``Image`` struct (bytes, path)."""
    kind = column.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return column
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        field = column.field("bytes")
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            return field
    return None


def _decoded(encoded: pa.Array, columns: Columns) -> np.ndarray:
    """Decode a column of encoded images, on a thread pool (the JPEG decoder releases the GIL), into one uint8
    array."""
    from concurrent.futures import ThreadPoolExecutor

    from ptqflow.storage.images import IMAGES_PER_TASK, UndecodableImage, decode_image, image_header
    from ptqflow.storage.limits import MAX_DECODED_BYTES  # the setting a user raises for larger images

    name = columns.features
    if encoded.null_count:
        raise TensorTableError(
            f"column '{name}' has {encoded.null_count} rows without image bytes (a path alone is not read): embed the "
            "images (datasets' to_parquet does)"
        )

    def refused(row: int, error: UndecodableImage) -> TensorTableError:
        return TensorTableError(
            f"column '{name}' row {row} cannot be decoded as an image ({error}): replace or remove it"
        )

    # What the images declare, from their headers, before any is decoded: a few kilobytes of PNG can declare
    # hundreds of megabytes of pixels.
    declared = 0
    for row in range(len(encoded)):
        try:
            declared += image_header(encoded[row].as_py()).decoded_bytes(columns.image_size, columns.color_mode)
        except UndecodableImage as error:
            raise refused(row, error) from None
        if declared > MAX_DECODED_BYTES.value:
            raise TensorTableError(
                MAX_DECODED_BYTES.refusal(
                    f"column '{name}' declares images of {declared:,} bytes once decoded (by row {row})"
                )
                + "; --sample-size draws fewer, --image-size makes them smaller"
            )

    def decode(row: int) -> np.ndarray:
        try:
            return decode_image(encoded[row].as_py(), columns.image_size, columns.color_mode)
        except UndecodableImage as error:
            raise refused(row, error) from None

    def decode_run(rows: range) -> list[np.ndarray]:
        return [decode(row) for row in rows]

    # The bytes are in memory: one thread per core.
    runs = [
        range(start, min(start + IMAGES_PER_TASK, len(encoded))) for start in range(0, len(encoded), IMAGES_PER_TASK)
    ]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = [image for run in pool.map(decode_run, runs) for image in run]
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise TensorTableError(
            f"column '{name}' holds images of different sizes or colour modes ({', '.join(sorted(map(str, shapes)))}): "
            "pass --image-size H,W (and --color-mode rgb|grayscale)"
        )
    return np.stack(images) if images else np.zeros((0, 1, 1, 1), np.uint8)


def huggingface_class_names(schema: pa.Schema, label: str) -> list[str] | None:
    """The class names a Hugging Face ``datasets`` Parquet file records for its ``ClassLabel`` column ``label``."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        features = json.loads(raw)["info"]["features"]
        names = features[label]["names"] if features[label].get("_type") == "ClassLabel" else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # someone else's metadata: the labels still work, named by their numbers
    return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def labels_to_numpy(column: pa.ChunkedArray | pa.Array, columns: Columns = Columns()) -> np.ndarray:
    """A label column as ``columns.targets`` says: int64 class indices, or float32 targets of shape (n, k) from a
    number or a fixed-size list of numbers per row."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if column.null_count:
        raise TensorTableError(f"column '{columns.label}' has {column.null_count} null rows: drop them from the source")
    kind = column.type
    if columns.targets == "values":
        if _numeric(kind):
            return column.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, 1)
        if pa.types.is_fixed_size_list(kind) and _numeric(kind.value_type):
            flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
            return flat.reshape(len(column), kind.list_size)
        raise TensorTableError(
            f"column '{columns.label}' has type {kind}: regression targets must be numbers, or a fixed-size list of "
            "numbers per row"
        )
    if not pa.types.is_integer(kind):
        fix = "; numeric targets need --task regression" if _numeric(kind) else ""
        raise TensorTableError(
            f"column '{columns.label}' has type {kind}: labels must be integer class indices 0..n-1{fix}"
        )
    return column.to_numpy().astype(np.int64, copy=False)


def check_columns(schema: pa.Schema, columns: Columns = Columns()) -> None:
    missing = [c for c in (*columns.feature_names(), *columns.label_names()) if c not in schema.names]
    if missing:
        fix = "name them with --feature-column and --label-column"
        if columns.label in missing and columns.targets != "values":
            fix += " (or, for a model whose float outputs are the reference, --task unlabeled)"
        raise TensorTableError(
            f"table has no column(s) {', '.join(repr(c) for c in missing)} (it has {', '.join(schema.names)}): {fix}"
        )


def read_labels(data: pa.Table | pa.RecordBatch, columns: Columns) -> np.ndarray:
    """The labels of ``data`` as ``columns.targets`` says (none for unlabeled data)."""
    if columns.targets == "none":
        return no_labels(data.num_rows)
    return labels_to_numpy(data.column(columns.label), columns)


def arrow_to_tensor_table(table: pa.Table, columns: Columns = Columns()) -> TensorTable:
    meta = source_metadata(table.schema, columns)
    columns = columns.with_targets_of(meta)
    check_columns(table.schema, columns)
    return TensorTable(features_to_numpy(table, meta, columns), read_labels(table, columns), meta)


def read_parquet(source: IO[bytes] | bytes, columns: Columns = Columns()) -> TensorTable:
    """Read a whole tensor table (any accepted layout) into memory."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    return arrow_to_tensor_table(pq.read_table(source, columns=None), columns)


class ParquetRowGroups:
    """A stored tensor table read one Parquet row group at a time (``tasks.models.streaming.RowGroups``): what a
    reader holds is one group (about ``ROW_GROUP_BYTES``), whatever the table's size. ``source`` stays open for as
    long as groups are read."""

    def __init__(self, source: IO[bytes], columns: Columns = Columns()) -> None:
        # no pre-buffering: pyarrow would otherwise read ahead whole column chunks (see iter_feature_batches)
        self._parquet = pq.ParquetFile(source, pre_buffer=False, buffer_size=1 << 20)
        self._columns = columns
        metadata = self._parquet.metadata
        self.row_counts = tuple(metadata.row_group(g).num_rows for g in range(metadata.num_row_groups))
        self.metadata = source_metadata(self._parquet.schema_arrow, columns)

    def read(self, group: int) -> TensorTable:
        return arrow_to_tensor_table(self._parquet.read_row_group(group), self._columns)

    def iter_rows(self, rows: int) -> Iterator[TensorTable]:
        """The table in order, ``rows`` rows at a time (the last part shorter), decoded page by page: what the
        reader holds is about ``rows`` rows, not a row group."""
        pending: list[pa.RecordBatch] = []
        held = 0
        for batch in self._parquet.iter_batches(batch_size=rows):
            pending.append(batch)
            held += batch.num_rows
            if held >= rows:  # batches end at row group ends too: gather exactly ``rows``
                table = pa.Table.from_batches(pending).combine_chunks()
                yield arrow_to_tensor_table(table.slice(0, rows), self._columns)
                rest = table.slice(rows)
                pending, held = rest.to_batches(), rest.num_rows
        if held:
            yield arrow_to_tensor_table(pa.Table.from_batches(pending).combine_chunks(), self._columns)

    def read_rows(self, start: int, stop: int) -> TensorTable:
        """Rows ``start`` to ``stop``, reading only the groups that hold them."""
        ends = np.cumsum(self.row_counts)
        first = int(np.searchsorted(ends, start, side="right"))
        last = int(np.searchsorted(ends, max(start, stop - 1), side="right"))
        groups = list(range(first, min(last, len(ends) - 1) + 1))
        table = self._parquet.read_row_groups(groups) if groups else self._parquet.schema_arrow.empty_table()
        offset = int(ends[first - 1]) if first > 0 else 0
        return arrow_to_tensor_table(table.slice(start - offset, stop - start), self._columns)


def iter_feature_batches(source: IO[bytes], batch_size: int) -> Iterator[np.ndarray]:
    """Stream the ``features`` column in batches of at most ``batch_size`` rows; memory stays bounded by a batch
    (plus one Parquet row group)."""
    # No pre-buffering: by default pyarrow reads ahead whole column chunks (measured: a 1 GiB source peaked at
    # 1 GiB of RSS); a buffered stream keeps a streaming reader to about one row group.
    parquet = pq.ParquetFile(source, pre_buffer=False, buffer_size=1 << 20)
    schema = parquet.schema_arrow
    meta = table_metadata(schema)
    check_columns(schema, Columns().with_targets_of(meta))
    for batch in parquet.iter_batches(batch_size=batch_size, columns=[FEATURES]):
        yield column_to_numpy(batch.column(0), meta)
