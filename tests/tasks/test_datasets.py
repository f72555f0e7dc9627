"""Data sources: Parquet files and directories by URL, in every accepted layout, and every bad input named."""

from __future__ import annotations

import io
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.tables import Columns
from tasks.datasets import load_dataset, source_fingerprint
from tasks.errors import InvalidDataset
from tasks.sample import check_dataset


def images(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8), rng.integers(0, 4, n)


def write(path, table: pa.Table) -> None:
    pq.write_table(table, str(path))


def test_directory_of_fixed_shape_tensor_files_with_custom_columns(tmp_path):
    x, y = images()
    for part in range(2):
        sl = slice(part * 20, (part + 1) * 20)
        write(tmp_path / f"part-{part}.parquet",
              pa.table({"image": pa.FixedShapeTensorArray.from_numpy_ndarray(x[sl]), "y": pa.array(y[sl])}))
    (tmp_path / "README.txt").write_text("not parquet, ignored")
    table = load_dataset(str(tmp_path), Columns(features="image", label="y"))
    np.testing.assert_array_equal(table.features, x)
    np.testing.assert_array_equal(table.labels, y)
    assert table.metadata["value_range"] == [0.0, 255.0]


def test_tabular_fixed_size_list_on_memory_filesystem():
    values = np.random.default_rng(0).normal(5, 2, (30, 7)).astype(np.float32)
    sink = io.BytesIO()
    pq.write_table(pa.table({"features": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), 7),
                             "label": pa.array(np.arange(30) % 3)}), sink)
    url = f"memory://sources-{uuid.uuid4().hex}/tab.parquet"
    fsspec.filesystem("memory").pipe(url, sink.getvalue())
    table = load_dataset(url)
    assert table.sample_shape == (7,) and table.features.dtype == np.float32
    assert table.metadata["value_range"] == [float(values.min()), float(values.max())]


def test_fixed_size_binary_without_metadata_needs_the_input_shape(tmp_path):
    x, y = images()
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(108), len(x), [None, pa.py_buffer(x.tobytes())])
    write(tmp_path / "raw.parquet", pa.table({"features": column, "label": pa.array(y)}))
    with pytest.raises(InvalidDataset, match="pass --input-shape"):
        load_dataset(str(tmp_path / "raw.parquet"))
    table = load_dataset(str(tmp_path / "raw.parquet"), Columns(shape=(6, 6, 3)))
    np.testing.assert_array_equal(table.features, x)
    with pytest.raises(InvalidDataset, match="does not fit shape \\[5, 5, 3\\]"):
        load_dataset(str(tmp_path / "raw.parquet"), Columns(shape=(5, 5, 3)))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "does not exist: pass a Parquet file or directory URL"),
        (lambda p: p.write_bytes(b"PAR1 this is not parquet"), "is not a readable Parquet file"),
        (lambda p: write(p, pa.table({"pixels": pa.array([[1, 2]] * 4, pa.list_(pa.uint8(), 2)),
                                      "label": [0, 1, 0, 1]})), "no column\\(s\\) 'features'.*--feature-column"),
        (lambda p: write(p, pa.table({"features": pa.array([[1.0, 2.0]] * 4, pa.list_(pa.float32(), 2)),
                                      "label": [0.0, 1.0, 0.0, 1.0]})), "labels must be integer class indices"),
        (lambda p: write(p, pa.table({"features": pa.array([[1.0, 2.0]] * 4, pa.list_(pa.float64(), 2)),
                                      "label": [0, 1, 0, 1]})), "store them as uint8 \\(images\\) or float32"),
    ],
    ids=["missing", "not-parquet", "missing-column", "float-labels", "float64-features"],
)
def test_bad_sources_are_named_with_the_fix(tmp_path, make, message):
    path = tmp_path / "data.parquet"
    make(path)
    with pytest.raises(InvalidDataset, match=message):
        load_dataset(str(path))


def test_truncated_parquet_is_refused(tmp_path):
    x, y = images()
    buffer = io.BytesIO()
    pq.write_table(pa.table({"features": pa.FixedShapeTensorArray.from_numpy_ndarray(x), "label": pa.array(y)}), buffer)
    (tmp_path / "cut.parquet").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(InvalidDataset, match="is not a readable Parquet file"):
        load_dataset(str(tmp_path / "cut.parquet"))


def test_labels_with_gaps_are_refused():
    from storage.tables import TensorTable

    labels = np.repeat([0, 1, 5], 10)
    with pytest.raises(InvalidDataset, match="3 of 0..5 have no samples \\(2, 3, 4\\): remap"):
        check_dataset(TensorTable(np.zeros((30, 2), np.float32), labels))


def test_fingerprint_follows_the_content_not_the_url(tmp_path):
    x, y = images()
    write(tmp_path / "a.parquet", pa.table({"features": pa.FixedShapeTensorArray.from_numpy_ndarray(x),
                                            "label": pa.array(y)}))
    first = source_fingerprint(str(tmp_path))
    assert source_fingerprint(str(tmp_path)) == first
    write(tmp_path / "b.parquet", pa.table({"features": pa.FixedShapeTensorArray.from_numpy_ndarray(x),
                                            "label": pa.array(y)}))
    assert source_fingerprint(str(tmp_path)) != first
    assert source_fingerprint("digits") == "builtin:digits"
