"""Tensor tables: the layout ptqflow writes, and the layouts it reads."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ptqflow.storage.tables import (
    TensorTable,
    TensorTableError,
    iter_feature_batches,
    read_parquet,
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
