"""Tensor tables: the layout ptqflow writes, and the layouts it reads."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ptqflow.storage.tables import (
    Columns,
    InputSlot,
    ParquetRowGroups,
    TensorTable,
    TensorTableError,
    iter_feature_batches,
    read_parquet,
    split_inputs,
    table_metadata,
    write_parquet_bytes,
)


@pytest.fixture(params=["uint8", "float32"])
def table(request) -> TensorTable:
    rng = np.random.default_rng(0)
    features = (rng.random((50, 4, 3, 2)) * 255).astype(request.param)
    return TensorTable(features, rng.integers(0, 5, 50), {"value_range": [0, 255]})


def test_round_trip_keeps_values_shape_dtype_and_metadata(table):
    back = read_parquet(write_parquet_bytes(table))
    assert back.features.dtype == table.features.dtype
    np.testing.assert_array_equal(back.features, table.features)
    np.testing.assert_array_equal(back.labels, table.labels)
    assert back.metadata["value_range"] == [0, 255]
    assert back.metadata["shape"] == [4, 3, 2]


def test_written_schema_is_fixed_size_binary_with_shape_metadata(table):
    schema = pq.read_schema(io.BytesIO(write_parquet_bytes(table)))
    width = 4 * 3 * 2 * table.features.dtype.itemsize
    assert schema.field("features").type == pa.binary(width)
    assert schema.field("label").type == pa.int64()
    meta = table_metadata(schema)
    assert meta["shape"] == [4, 3, 2] and meta["dtype"] == table.features.dtype.name


def test_serialisation_is_deterministic(table):
    assert write_parquet_bytes(table) == write_parquet_bytes(table)


@pytest.mark.parametrize("targets", ["classes", "values"])
def test_rows_gathered_a_group_at_a_time_are_the_bytes_of_the_rows_taken_whole(monkeypatch, targets):
    from ptqflow.storage import tables

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 1000) if targets == "classes" else rng.normal(size=(1000, 2)).astype(np.float32)
    source = TensorTable(rng.integers(0, 255, (1000, 4, 4, 1), dtype=np.uint8), labels, {"value_range": [0, 255]})
    monkeypatch.setattr(tables, "rows_per_group", lambda row_bytes: 96)  # 8 groups of 700 rows, the last one short
    indices = rng.permutation(1000)[:700]
    gathered = tables.write_parquet_rows(source, indices)
    assert pq.ParquetFile(io.BytesIO(gathered)).metadata.num_row_groups == 8
    assert gathered == tables.write_parquet_bytes(source.take(indices))


def test_reads_arrow_fixed_shape_tensor(table):
    arrow = pa.table(
        {"features": pa.FixedShapeTensorArray.from_numpy_ndarray(table.features), "label": pa.array(table.labels)}
    )
    sink = io.BytesIO()
    pq.write_table(arrow, sink)
    back = read_parquet(sink.getvalue())
    np.testing.assert_array_equal(back.features, table.features)


def test_reads_fixed_size_list_with_shape_in_metadata(table):
    flat = table.features.reshape(len(table), -1)
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
    arrow = pa.table({"features": column, "label": pa.array(table.labels)}).replace_schema_metadata(
        {b"ptqflow": json.dumps({"shape": [4, 3, 2]}).encode()}
    )
    sink = io.BytesIO()
    pq.write_table(arrow, sink)
    np.testing.assert_array_equal(read_parquet(sink.getvalue()).features, table.features)


def test_batches_stream_across_row_groups(table):
    data = write_parquet_bytes(table, row_group_size=7)
    batches = list(iter_feature_batches(io.BytesIO(data), batch_size=16))
    assert [len(b) for b in batches] == [16, 16, 16, 2]
    np.testing.assert_array_equal(np.concatenate(batches), table.features)


def test_row_groups_read_one_group_at_a_time_the_rows_of_the_whole_table(table):
    groups = ParquetRowGroups(io.BytesIO(write_parquet_bytes(table, row_group_size=7)))
    assert groups.row_counts == (7,) * 7 + (1,)
    read = [groups.read(group) for group in range(len(groups.row_counts))]
    np.testing.assert_array_equal(np.concatenate([g.features for g in read]), table.features)
    np.testing.assert_array_equal(np.concatenate([g.labels for g in read]), table.labels)
    assert read[0].metadata == groups.metadata == read_parquet(write_parquet_bytes(table)).metadata


@pytest.mark.parametrize("rows", [1, 5, 7, 16, 50, 64])
def test_rows_in_order_come_in_parts_of_the_size_asked_across_row_groups(table, rows):
    groups = ParquetRowGroups(io.BytesIO(write_parquet_bytes(table, row_group_size=7)))
    parts = list(groups.iter_rows(rows))
    assert [len(p) for p in parts] == [min(rows, 50 - start) for start in range(0, 50, rows)]
    np.testing.assert_array_equal(np.concatenate([p.features for p in parts]), table.features)
    np.testing.assert_array_equal(np.concatenate([p.labels for p in parts]), table.labels)
    assert parts[0].metadata == groups.metadata


@pytest.mark.parametrize("start, stop", [(0, 50), (3, 5), (6, 15), (14, 49), (49, 50), (20, 20)])
def test_a_range_of_rows_reads_only_the_groups_that_hold_them(table, start, stop):
    groups = ParquetRowGroups(io.BytesIO(write_parquet_bytes(table, row_group_size=7)))
    rows = groups.read_rows(start, stop)
    np.testing.assert_array_equal(rows.features, table.features[start:stop])
    np.testing.assert_array_equal(rows.labels, table.labels[start:stop])


def test_missing_column_names_the_fix():
    sink = io.BytesIO()
    pq.write_table(pa.table({"pixels": pa.array([b"a"], pa.binary(1)), "label": [1]}), sink)
    with pytest.raises(TensorTableError, match="no column\\(s\\) 'features'.*--feature-column"):
        read_parquet(sink.getvalue())


def test_non_integer_labels_are_refused(table):
    arrow = pa.table(
        {
            "features": pa.FixedShapeTensorArray.from_numpy_ndarray(table.features),
            "label": pa.array(table.labels.astype(float)),
        }
    )
    sink = io.BytesIO()
    pq.write_table(arrow, sink)
    with pytest.raises(TensorTableError, match="integer class indices"):
        read_parquet(sink.getvalue())


def test_unsupported_dtype_is_refused():
    with pytest.raises(TensorTableError, match="uint8, float32"):
        TensorTable(np.zeros((2, 3), np.int16), np.zeros(2, np.int64))


@pytest.mark.parametrize("targets", [1, 3, 0])
def test_regression_targets_and_unlabeled_rows_round_trip(targets):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 5)).astype(np.float32)
    labels = rng.normal(size=(40, targets)).astype(np.float32)
    data = write_parquet_bytes(TensorTable(features, labels))
    back = read_parquet(data)  # what the table is comes from its metadata: no columns to name
    assert back.targets == ("none" if targets == 0 else "values")
    np.testing.assert_array_equal(back.labels, labels)
    np.testing.assert_array_equal(back.features, features)
    schema = pq.read_schema(io.BytesIO(data))
    assert ("label" in schema.names) is bool(targets)
    streamed = np.concatenate(list(iter_feature_batches(io.BytesIO(data), 16)))
    np.testing.assert_array_equal(streamed, features)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def two_input_rows(rows: int = 6) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]:
    images = np.arange(rows * 4, dtype=np.uint8).reshape(rows, 2, 2, 1)
    extra = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) / 2
    age = np.arange(rows, dtype=np.int64) + 30
    arrow = pa.table(
        {
            "image": pa.FixedShapeTensorArray.from_numpy_ndarray(images),
            "extra": pa.FixedSizeListArray.from_arrays(pa.array(extra.ravel()), 3),
            "age": pa.array(age),
            "label": pa.array(np.arange(rows) % 2),
        }
    )
    return arrow, images, extra, age


def test_several_input_columns_are_packed_side_by_side_and_split_back():
    arrow, images, extra, age = two_input_rows()
    read = read_parquet(parquet_bytes(arrow), Columns(inputs=("image", "extra", "age")))
    assert read.inputs == (
        InputSlot("image", (2, 2, 1), "uint8"),
        InputSlot("extra", (3,), "float32"),
        InputSlot("age", (1,), "float32"),
    )
    assert read.features.dtype == np.float32 and read.sample_shape == (8,)  # one float32 input makes all float32
    image_part, extra_part, age_part = split_inputs(read.features, read.inputs)
    np.testing.assert_array_equal(image_part, images)
    np.testing.assert_array_equal(extra_part, extra)
    np.testing.assert_array_equal(age_part[:, 0], age)
    # What the pipeline stores keeps the layout: a stage that reads it back splits it the same way.
    again = read_parquet(write_parquet_bytes(read))
    assert again.inputs == read.inputs
    np.testing.assert_array_equal(again.features, read.features)


def test_inputs_that_are_all_uint8_stay_uint8_and_a_declared_shape_is_kept():
    rows = 4
    flat = np.arange(rows * 8, dtype=np.uint8).reshape(rows, 8)
    meta = {"inputs": [{"name": "left", "shape": [2, 2, 1], "dtype": "uint8"}]}
    arrow = pa.table(
        {
            "left": pa.FixedSizeListArray.from_arrays(pa.array(flat[:, :4].ravel()), 4),
            "right": pa.FixedSizeListArray.from_arrays(pa.array(flat[:, 4:].ravel()), 4),
            "label": pa.array(np.arange(rows)),
        },
    ).replace_schema_metadata({b"ptqflow": json.dumps(meta).encode()})
    read = read_parquet(parquet_bytes(arrow), Columns(inputs=("left", "right")))
    assert read.features.dtype == np.uint8
    assert read.inputs == (InputSlot("left", (2, 2, 1), "uint8"), InputSlot("right", (4,), "uint8"))
    np.testing.assert_array_equal(read.features, flat)


@pytest.mark.parametrize(
    "column, message",
    [
        (pa.array(["a", "b"]), "store each input as a fixed_shape_tensor, a fixed-size list or a number"),
        (pa.array([[1.0], [2.0, 3.0]], pa.list_(pa.float32())), "store each input as"),
    ],
)
def test_an_input_column_of_another_kind_is_refused_with_the_fix(column, message):
    arrow = pa.table({"good": pa.array([1.0, 2.0]), "bad": column, "label": pa.array([0, 1])})
    with pytest.raises(TensorTableError, match=message):
        read_parquet(parquet_bytes(arrow), Columns(inputs=("good", "bad")))


def test_a_column_that_cannot_name_a_model_input_is_refused():
    arrow = pa.table({"my col": pa.array([1.0, 2.0]), "b": pa.array([1.0, 2.0]), "label": pa.array([0, 1])})
    with pytest.raises(TensorTableError, match="'my col' cannot name a model input.*rename the column"):
        read_parquet(parquet_bytes(arrow), Columns(inputs=("my col", "b")))


@pytest.mark.parametrize(
    "inputs, message",
    [
        ("image", "inputs is not a list of objects"),
        ([{"name": "../x", "shape": [2]}], "is not a letter followed by"),
        ([{"name": "a", "shape": [0]}], "shape \\[0\\] is not a list of positive integers"),
        ([{"name": "a", "shape": [2], "dtype": "int64"}], "dtype 'int64' is none of"),
        ([{"name": "a", "shape": [2]}, {"name": "a", "shape": [2]}], "names one input twice"),
        ([{"name": "a", "shape": [3]}], "do not add up to the features' shape \\[2\\]"),
    ],
)
def test_a_malformed_input_layout_in_the_metadata_is_refused(inputs, message):
    meta = {"shape": [2], "dtype": "float32", "inputs": inputs}
    schema = pa.schema([pa.field("features", pa.binary(8))], metadata={b"ptqflow": json.dumps(meta).encode()})
    with pytest.raises(TensorTableError, match=f"malformed.*{message}"):
        table_metadata(schema)
