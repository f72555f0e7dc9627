"""Data sources: Parquet files and directories by URL, in every accepted layout, and every bad input named."""

from __future__ import annotations

import io
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from keras_cache import sha256_of, write_cifar10, write_fashion_mnist, write_mnist

from conftest import write_huggingface_images
from ptqflow.storage.tables import Columns, TensorTable
from ptqflow.tasks.core.errors import InvalidDataset
from ptqflow.tasks.data.datasets import (
    SOURCE_KINDS,
    Draw,
    ParquetSource,
    load_dataset,
    open_source,
    peek_dataset,
    source_fingerprint,
)
from ptqflow.tasks.data.sampling import check_dataset


def images(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8), rng.integers(0, 4, n)


def write(path, table: pa.Table) -> None:
    pq.write_table(table, str(path))


def test_directory_of_fixed_shape_tensor_files_with_custom_columns(tmp_path):
    x, y = images()
    for part in range(2):
        sl = slice(part * 20, (part + 1) * 20)
        write(
            tmp_path / f"part-{part}.parquet",
            pa.table({"image": pa.FixedShapeTensorArray.from_numpy_ndarray(x[sl]), "y": pa.array(y[sl])}),
        )
    (tmp_path / "README.txt").write_text("not parquet, ignored")
    table = load_dataset(str(tmp_path), Columns(features="image", label="y"))
    np.testing.assert_array_equal(table.features, x)
    np.testing.assert_array_equal(table.labels, y)
    assert table.metadata["value_range"] == [0.0, 255.0]


def test_files_of_several_row_groups_are_read_in_order_into_one_table(tmp_path):
    """The source is read a row group at a time into one array (a file read whole would hold it twice)."""
    x, y = images(100)
    for part in range(3):
        sl = slice(part * 40, (part + 1) * 40)
        table = pa.table({"image": pa.FixedShapeTensorArray.from_numpy_ndarray(x[sl]), "y": pa.array(y[sl])})
        pq.write_table(table, str(tmp_path / f"part-{part}.parquet"), row_group_size=7)
    loaded = load_dataset(str(tmp_path), Columns(features="image", label="y"))
    np.testing.assert_array_equal(loaded.features, x)
    np.testing.assert_array_equal(loaded.labels, y)


def test_files_of_different_schemas_are_refused_with_the_fix(tmp_path):
    x, y = images(20)
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(x)
    write(tmp_path / "a.parquet", pa.table({"image": tensor, "y": pa.array(y)}))
    wider = pa.FixedShapeTensorArray.from_numpy_ndarray(np.concatenate([x, x], axis=1))
    write(tmp_path / "b.parquet", pa.table({"image": wider, "y": pa.array(y)}))
    with pytest.raises(InvalidDataset, match="have different schemas: give them one schema"):
        load_dataset(str(tmp_path), Columns(features="image", label="y"))


def test_tabular_fixed_size_list_on_memory_filesystem():
    values = np.random.default_rng(0).normal(5, 2, (30, 7)).astype(np.float32)
    sink = io.BytesIO()
    pq.write_table(
        pa.table(
            {
                "features": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), 7),
                "label": pa.array(np.arange(30) % 3),
            }
        ),
        sink,
    )
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
        (
            lambda p: write(
                p, pa.table({"pixels": pa.array([[1, 2]] * 4, pa.list_(pa.uint8(), 2)), "label": [0, 1, 0, 1]})
            ),
            "no column\\(s\\) 'features'.*--feature-column",
        ),
        (
            lambda p: write(
                p,
                pa.table(
                    {"features": pa.array([[1.0, 2.0]] * 4, pa.list_(pa.float32(), 2)), "label": [0.0, 1.0, 0.0, 1.0]}
                ),
            ),
            "labels must be integer class indices",
        ),
        (
            lambda p: write(
                p, pa.table({"features": pa.array([[1.0, 2.0]] * 4, pa.list_(pa.float64(), 2)), "label": [0, 1, 0, 1]})
            ),
            "store them as uint8 \\(images\\) or float32",
        ),
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
    from ptqflow.storage.tables import TensorTable

    labels = np.repeat([0, 1, 5], 10)
    with pytest.raises(InvalidDataset, match="3 of 0..5 have no samples \\(2, 3, 4\\): remap"):
        check_dataset(TensorTable(np.zeros((30, 2), np.float32), labels))


def test_fingerprint_follows_the_content_not_the_url(tmp_path):
    x, y = images()
    write(
        tmp_path / "a.parquet",
        pa.table({"features": pa.FixedShapeTensorArray.from_numpy_ndarray(x), "label": pa.array(y)}),
    )
    first = source_fingerprint(str(tmp_path))
    assert source_fingerprint(str(tmp_path)) == first
    write(
        tmp_path / "b.parquet",
        pa.table({"features": pa.FixedShapeTensorArray.from_numpy_ndarray(x), "label": pa.array(y)}),
    )
    assert source_fingerprint(str(tmp_path)) != first
    assert source_fingerprint("digits") == "builtin:digits"


def test_without_version_info_the_fingerprint_hashes_the_content():
    from fsspec.implementations.memory import MemoryFileSystem

    from ptqflow.tasks.data.datasets import files_fingerprint

    class NoVersions(MemoryFileSystem):
        def info(self, path, **kwargs):
            return {k: v for k, v in super().info(path, **kwargs).items() if k != "created"}

    fs, path = NoVersions(), f"/fingerprint-{uuid.uuid4().hex}/a.parquet"
    fs.pipe(path, b"12345678")
    first = files_fingerprint(fs, [path])
    fs.pipe(path, b"87654321")  # same path, same size, new content
    assert files_fingerprint(fs, [path]) != first
    fs.rm(path)


# --sample-size: a seeded, stratified draw made while reading, by row groups.


def write_parts(folder, x, y, parts: int = 3, row_group_size: int = 7, layout: str = "tensor") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for part, rows in enumerate(np.array_split(np.arange(len(y)), parts)):
        if layout == "tensor":
            column = pa.FixedShapeTensorArray.from_numpy_ndarray(x[rows])
        else:
            flat = np.ascontiguousarray(x[rows]).reshape(len(rows), -1)
            column = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(flat.shape[1]), len(rows), [None, pa.py_buffer(flat.tobytes())]
            )
        pq.write_table(
            pa.table({"features": column, "label": pa.array(y[rows])}),
            str(folder / f"part-{part}.parquet"),
            row_group_size=row_group_size,
        )


@pytest.mark.parametrize("layout", ["tensor", "binary"])
def test_a_draw_while_reading_equals_the_same_draw_from_memory(tmp_path, layout):
    x, y = images(n=200)
    write_parts(tmp_path / "src", x, y, layout=layout)
    columns = Columns(shape=(6, 6, 3))
    draw = Draw(60, (7, 1), min_per_class=5)
    streamed = load_dataset(str(tmp_path / "src"), columns, draw)
    whole = load_dataset(str(tmp_path / "src"), columns)
    expected = whole.take(draw.indices(whole.labels, "the source"))
    np.testing.assert_array_equal(streamed.features, expected.features)
    np.testing.assert_array_equal(streamed.labels, expected.labels)
    # Stratified: each class within one sample of its share.
    assert np.abs(np.bincount(streamed.labels) - np.bincount(y) * 60 / 200).max() < 1
    other_seed = load_dataset(str(tmp_path / "src"), columns, Draw(60, (8, 1), min_per_class=5))
    assert not np.array_equal(other_seed.features, streamed.features)


def test_a_draw_reads_only_the_row_groups_it_needs(tmp_path, monkeypatch):
    labels = np.repeat(np.arange(2), 50)
    x = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1).repeat(4, axis=1)
    write_parts(tmp_path / "src", x, labels, parts=1, row_group_size=10)
    read_groups = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, row_groups=None, **kwargs):
        read_groups.extend(row_groups or [])
        return real(self, *args, row_groups=row_groups, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    table = load_dataset(str(tmp_path / "src"), Columns(), Draw(10, (0, 1)))
    assert len(table) == 10 and set(np.unique(table.labels)) == {0, 1}
    groups_with_drawn_rows = {int(v) // 10 for v in table.features[:, 0, 0, 0]}
    assert sorted(read_groups) == sorted(groups_with_drawn_rows)


def test_sample_size_errors_name_the_fix(tmp_path):
    x, y = images(n=200)
    y = np.where(np.arange(200) < 10, 3, y % 3)  # class 3 is rare: 10 of 200
    write_parts(tmp_path / "src", x, y)
    with pytest.raises(InvalidDataset, match="has only 200: pass --sample-size 200 or less"):
        load_dataset(str(tmp_path / "src"), Columns(), Draw(500, (0, 1), min_per_class=5))
    with pytest.raises(
        InvalidDataset, match="gives class 3 1 samples, but the splits need 5 per class: pass --sample-size 100 or more"
    ):
        load_dataset(str(tmp_path / "src"), Columns(), Draw(20, (0, 1), min_per_class=5))
    with pytest.raises(InvalidDataset, match="has only 1797: pass --sample-size 1797 or less"):
        load_dataset("digits", Columns(), Draw(5000, (0, 1), min_per_class=5))


# keras.datasets: the real loaders, on files in Keras's cache format that the tests write.


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    """A Keras cache directory of the test's own (Keras reads $KERAS_HOME once, at import) and no network."""
    import urllib.error

    from keras.src.backend import config
    from keras.src.utils import file_utils

    (tmp_path / "keras").mkdir()  # Keras creates its home at import
    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path / "keras"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    return tmp_path / "keras" / "datasets"


@pytest.fixture
def published_hash_is(monkeypatch):
    """Keras checks mnist and cifar10 against the published files' sha256, which a test-sized file cannot have:
    map that one hash to the test file's own, so Keras's check itself still runs."""
    from keras.src.utils import file_utils

    real = file_utils.validate_file
    own: dict[str, str] = {}

    def validate_file(fpath, file_hash, algorithm="auto", chunk_size=65535):
        return real(fpath, own.get(file_hash, file_hash), algorithm=algorithm, chunk_size=chunk_size)

    monkeypatch.setattr(file_utils, "validate_file", validate_file)

    def stand_in(published: str, path) -> None:
        own[published] = sha256_of(path)

    return stand_in


MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"


def test_fashion_mnist_through_the_keras_loader(keras_home):
    images_written, labels_written = write_fashion_mnist(keras_home)
    table = load_dataset("fashion_mnist")
    assert table.sample_shape == (28, 28, 1) and table.features.dtype == np.uint8
    np.testing.assert_array_equal(table.features[..., 0], images_written)
    np.testing.assert_array_equal(table.labels, labels_written)
    assert table.metadata["class_names"][0] == "T-shirt/top" and table.metadata["value_range"] == [0.0, 255.0]
    assert table.splits.tolist() == [0] * 300 + [2] * 100  # Keras's own train and test parts
    assert load_dataset("fashion_mnist", Columns(split=None)).splits is None  # --splits resplit


def test_mnist_through_the_keras_loader(keras_home, published_hash_is):
    images_written, labels_written = write_mnist(keras_home)
    published_hash_is(MNIST_SHA256, keras_home / "mnist.npz")
    table = load_dataset("mnist", draw=Draw(50, (0, 1), min_per_class=5))
    assert len(table) == 50 and table.sample_shape == (28, 28, 1)
    assert np.bincount(table.labels).tolist() == [5] * 10
    whole = load_dataset("mnist")
    np.testing.assert_array_equal(whole.features[..., 0], images_written)


@pytest.mark.slow
def test_cifar10_through_the_keras_loader(keras_home, published_hash_is):
    images_written, labels_written = write_cifar10(keras_home)
    published_hash_is(CIFAR10_SHA256, keras_home / "cifar-10-batches-py-target_archive")
    table = load_dataset("cifar10")
    assert table.sample_shape == (32, 32, 3) and len(table) == 60_000
    np.testing.assert_array_equal(table.features[::997], images_written[::997])
    np.testing.assert_array_equal(table.labels, labels_written)
    assert table.metadata["class_names"][9] == "truck"


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("mnist", "mnist.npz"),
        ("fashion_mnist", "fashion-mnist/train-labels-idx1-ubyte.gz"),
        ("cifar10", "cifar-10-batches-py-target_archive"),
    ],
)
def test_offline_the_error_says_where_to_put_the_file(keras_home, name, where):
    with pytest.raises(InvalidDataset) as error:
        load_dataset(name)
    message = str(error.value)
    assert message.startswith(f"cannot download the {name} data set")
    assert f"{keras_home / where}" in message and "\n" not in message


def test_an_unreadable_keras_cache_file_is_named(keras_home):
    write_fashion_mnist(keras_home)
    images_file = keras_home / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    images_file.write_bytes(images_file.read_bytes()[:100])
    with pytest.raises(InvalidDataset, match="Keras's cached copy of fashion_mnist .* is unreadable .*delete it"):
        load_dataset("fashion_mnist")


# Fresh data: {date} templates and --since / --window-days.


def test_a_date_template_is_filled_with_the_run_date():
    from datetime import datetime, timezone

    from ptqflow.tasks.data.datasets import resolve_source

    run = datetime(2026, 11, 27, 2, 0, tzinfo=timezone.utc)
    assert resolve_source("s3://b/events/{date}/", run) == ("s3://b/events/2026-11-27/", None)
    assert (
        resolve_source("s3://b/events/{date:%Y/%m/%d}/part.parquet", run)[0] == "s3://b/events/2026/11/27/part.parquet"
    )
    assert resolve_source("s3://b/events/", run, window_days=7) == (
        "s3://b/events/",
        datetime(2026, 11, 20, tzinfo=timezone.utc),
    )
    assert resolve_source("s3://b/events/", run, since=datetime(2026, 11, 1).date())[1] == datetime(
        2026, 11, 1, tzinfo=timezone.utc
    )


def test_since_selects_the_files_modified_since(tmp_path):
    import os
    from datetime import datetime, timezone

    x, y = images(60)
    write_parts(tmp_path, x, y, parts=3)
    old = datetime(2026, 11, 1, tzinfo=timezone.utc).timestamp()
    for part in ("part-0.parquet", "part-1.parquet"):
        os.utime(tmp_path / part, (old, old))
    since = datetime(2026, 11, 20, tzinfo=timezone.utc)
    assert len(load_dataset(str(tmp_path), since=since)) == 20  # part-2 only
    assert len(load_dataset(str(tmp_path))) == 60
    recent = source_fingerprint(str(tmp_path), since)
    os.utime(tmp_path / "part-0.parquet", (old + 1, old + 1))  # an old file touched, still before the window
    assert source_fingerprint(str(tmp_path), since) == recent
    with pytest.raises(InvalidDataset, match="modified since 2030-01-01.*widen --window-days"):
        load_dataset(str(tmp_path), since=datetime(2030, 1, 1, tzinfo=timezone.utc))


def write_wide_table(path, rows: int = 300, seed: int = 0) -> np.ndarray:
    """One numeric column per feature (f_0 .. f_5, mixed int and float), an unrelated string column, the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, rows)
    features = rng.normal(size=(rows, 6)) + labels[:, None]
    columns = {f"f_{i}": pa.array(features[:, i].astype(np.float64 if i % 2 else np.float32)) for i in range(6)}
    columns["f_5"] = pa.array(np.round(features[:, 5] * 10).astype(np.int32))
    columns["note"] = pa.array([f"row {i}" for i in range(rows)])
    columns["label"] = pa.array(labels)
    pq.write_table(pa.table(columns), str(path), row_group_size=64)
    return features


def test_a_wide_table_is_read_column_by_column_as_float32(tmp_path):
    features = write_wide_table(tmp_path / "wide.parquet")
    table = load_dataset(str(tmp_path / "wide.parquet"))  # no features column: every numeric one but the label
    assert table.features.shape == (300, 6) and table.features.dtype == np.float32
    np.testing.assert_allclose(table.features[:, :5], features[:, :5], rtol=1e-6)
    np.testing.assert_array_equal(table.features[:, 5], np.round(features[:, 5] * 10))
    picked = load_dataset(str(tmp_path / "wide.parquet"), Columns(wide=("f_1", "f_3*")))
    np.testing.assert_allclose(picked.features, features[:, [1, 3]], rtol=1e-6)
    drawn = load_dataset(str(tmp_path / "wide.parquet"), Columns(wide=("f_*",)), Draw(size=60, seed=(2,)))
    assert drawn.features.shape == (60, 6)
    rows = {tuple(np.round(r, 4)) for r in table.features}
    assert all(tuple(np.round(r, 4)) in rows for r in drawn.features)  # drawn rows are the table's own rows


@pytest.mark.parametrize(
    "wide, message",
    [(("f_*", "g_*"), "--feature-columns 'g_\\*' matches no column"), (("f_0", "note"), "'note' has type string")],
)
def test_wide_columns_that_cannot_be_features_are_refused(tmp_path, wide, message):
    write_wide_table(tmp_path / "wide.parquet")
    with pytest.raises(InvalidDataset, match=message):
        load_dataset(str(tmp_path / "wide.parquet"), Columns(wide=wide))


def test_a_wide_csv_is_read_in_blocks_and_drawn_like_parquet(tmp_path):
    import pyarrow.csv as csv

    features = write_wide_table(tmp_path / "wide.parquet", rows=500)
    table = pq.read_table(str(tmp_path / "wide.parquet"))
    (tmp_path / "parts").mkdir()
    csv.write_csv(table.slice(0, 200), str(tmp_path / "parts" / "a.csv"))
    csv.write_csv(table.slice(200), str(tmp_path / "parts" / "b.csv"))
    whole = load_dataset(str(tmp_path / "parts"), Columns(wide=("f_0", "f_1", "f_2")))
    np.testing.assert_allclose(whole.features, features[:, :3], rtol=1e-6)
    np.testing.assert_array_equal(whole.labels, table.column("label").to_numpy())
    default = load_dataset(str(tmp_path / "parts" / "a.csv"))  # every numeric column but the label
    assert default.features.shape == (200, 6)
    drawn = load_dataset(str(tmp_path / "parts"), Columns(wide=("f_*",)), Draw(size=50, seed=(3,)))
    rows = {tuple(np.round(r, 4)) for r in load_dataset(str(tmp_path / "parts"), Columns(wide=("f_*",))).features}
    assert len(drawn) == 50 and all(tuple(np.round(r, 4)) in rows for r in drawn.features)
    assert source_fingerprint(str(tmp_path / "parts"))
    with pytest.raises(InvalidDataset, match="'note' has type string"):
        load_dataset(str(tmp_path / "parts"), Columns(wide=("f_0", "note")))
    with pytest.raises(InvalidDataset, match="holds one value per column: name the feature columns"):
        load_dataset(str(tmp_path / "parts"), Columns(features="note"))


def test_an_input_shape_on_a_wide_table_is_refused_not_ignored(tmp_path):
    import pyarrow.csv as csv

    write_wide_table(tmp_path / "wide.parquet", rows=50)
    csv.write_csv(pq.read_table(str(tmp_path / "wide.parquet")), str(tmp_path / "wide.csv"))
    for source in ("wide.parquet", "wide.csv"):
        with pytest.raises(InvalidDataset, match="--input-shape 2,3 does not apply to a wide table"):
            load_dataset(str(tmp_path / source), Columns(wide=("f_*",), shape=(2, 3)))


def test_a_utf16_csv_is_refused_in_one_line_without_its_bytes(tmp_path):
    import pyarrow.csv as csv

    write_wide_table(tmp_path / "wide.parquet", rows=20)
    csv.write_csv(pq.read_table(str(tmp_path / "wide.parquet")), str(tmp_path / "utf8.csv"))
    (tmp_path / "wide.csv").write_bytes((tmp_path / "utf8.csv").read_text().encode("utf-16"))
    with pytest.raises(InvalidDataset, match="wide.csv is not UTF-8 text .*: save the CSV as UTF-8") as error:
        load_dataset(str(tmp_path / "wide.csv"))
    assert "\x00" not in str(error.value)


def test_hugging_face_image_parquet_is_decoded_with_its_class_names(tmp_path):
    (tmp_path / "data").mkdir()
    labels = write_huggingface_images(tmp_path / "data" / "train-00000-of-00001.parquet")
    table = load_dataset(str(tmp_path / "data"), Columns(features="image"))
    assert table.features.shape == (90, 12, 12, 3) and table.features.dtype == np.uint8
    np.testing.assert_allclose(table.features.mean(axis=(1, 2, 3)), 40 + 80 * labels, atol=3)
    assert table.metadata["class_names"] == ["cat", "dog", "fox", "owl"]
    from ptqflow.tasks.data.sampling import feature_spec

    assert feature_spec(table).class_names == ("cat", "dog", "fox")  # the names of the classes it holds
    drawn = load_dataset(str(tmp_path / "data"), Columns(features="image", color_mode="grayscale"), Draw(30, (1,)))
    assert drawn.features.shape == (30, 12, 12, 1)


def test_hugging_face_images_that_cannot_be_used_are_named(tmp_path):
    write_huggingface_images(tmp_path / "broken.parquet", corrupt_row=17)
    with pytest.raises(InvalidDataset, match="broken.parquet: column 'image' row 17 cannot be decoded"):
        load_dataset(str(tmp_path / "broken.parquet"), Columns(features="image"))
    write_huggingface_images(tmp_path / "mixed.parquet", sizes=((12, 12), (10, 14)))
    with pytest.raises(InvalidDataset, match="images of different sizes.*pass --image-size"):
        load_dataset(str(tmp_path / "mixed.parquet"), Columns(features="image"))
    resized = load_dataset(str(tmp_path / "mixed.parquet"), Columns(features="image", image_size=(8, 8)))
    assert resized.features.shape == (90, 8, 8, 3)


def test_hugging_face_split_files_give_each_row_its_split(tmp_path):
    (tmp_path / "data").mkdir()
    write_huggingface_images(tmp_path / "data" / "train-00000-of-00001.parquet", rows=60)
    write_huggingface_images(tmp_path / "data" / "test-00000-of-00001.parquet", rows=20, seed=1)
    whole = load_dataset(str(tmp_path), Columns(features="image"))
    assert whole.splits.tolist() == [2] * 20 + [0] * 60  # files in name order: test before train
    assert whole.metadata["split_origin"]["test"] == "1 file: data/test-00000-of-00001.parquet"
    drawn = load_dataset(str(tmp_path), Columns(features="image"), Draw(40, (0,)))
    assert len(drawn.splits) == 40 and set(drawn.splits.tolist()) == {0, 2}
    calibration = Draw(30, (0,), outside_test_split=True)  # a calibration draw never takes held-out rows
    assert load_dataset(str(tmp_path), Columns(features="image"), calibration).splits.tolist() == [0] * 30
    assert load_dataset(str(tmp_path), Columns(features="image", split=None)).splits is None


def test_a_split_column_gives_each_row_its_split_in_parquet_and_csv(tmp_path):
    import pyarrow.csv as csv

    split = ["train"] * 50 + ["valid"] * 10 + ["test"] * 20
    write_huggingface_images(tmp_path / "rows.parquet", rows=80, split=split)
    table = load_dataset(str(tmp_path / "rows.parquet"), Columns(features="image"))
    assert table.splits.tolist() == [0] * 50 + [1] * 10 + [2] * 20
    wide = pa.table({"f_0": np.arange(80.0), "f_1": np.ones(80), "label": np.arange(80) % 2, "split": split})
    csv.write_csv(wide, str(tmp_path / "wide.csv"))
    read = load_dataset(str(tmp_path / "wide.csv"), Columns(wide=("f_*",)))
    assert read.features.shape == (80, 2) and read.splits.tolist() == table.splits.tolist()
    assert load_dataset(str(tmp_path / "wide.csv"), Columns(wide=("f_*",)), Draw(20, (1,))).splits is not None
    pq.write_table(wide, str(tmp_path / "wide.parquet"))
    assert load_dataset(str(tmp_path / "wide.parquet")).features.shape == (80, 2)  # the split is no feature


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"train.parquet": ["train"] * 30, "extra.parquet": None}, "extra.parquet has no 'split' column, while other"),
        ({"rows.parquet": ["train"] * 20 + ["dev"] * 10}, "holds 'dev', which is none of train, validation"),
    ],
)
def test_given_splits_that_cannot_be_told_apart_are_refused_with_the_fix(tmp_path, files, message):
    for name, split in files.items():
        write_huggingface_images(tmp_path / name, rows=30, split=split)
    with pytest.raises(InvalidDataset, match=message) as refused:
        load_dataset(str(tmp_path), Columns(features="image"))
    assert "--splits resplit" in str(refused.value)


def write_regression_table(path, rows: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four numeric features and two numeric targets: ``y`` (a number) and ``both`` (a list of two)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (rows, 4)).astype(np.float32)
    y = np.stack([np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2], x[:, 0] - x[:, 3]], axis=1).astype(np.float32)
    columns = {f"x{i}": pa.array(x[:, i]) for i in range(4)}
    columns["y"] = pa.array(y[:, 0].astype(np.float64))
    columns["both"] = pa.FixedSizeListArray.from_arrays(pa.array(y.ravel()), 2)
    pq.write_table(pa.table(columns), str(path), row_group_size=64)
    return x, y


@pytest.mark.parametrize("drawn", [False, True])
def test_regression_targets_are_read_as_float_rows_from_a_number_or_a_list(tmp_path, drawn):
    x, y = write_regression_table(tmp_path / "r.parquet")
    draw = Draw(size=100, seed=(1,)) if drawn else None
    one = load_dataset(str(tmp_path / "r.parquet"), Columns(label="y", wide=("x*",), targets="values"), draw)
    two = load_dataset(str(tmp_path / "r.parquet"), Columns(label="both", wide=("x*",), targets="values"), draw)
    assert one.labels.shape == (100 if drawn else 400, 1) and one.labels.dtype == np.float32
    assert two.labels.shape == (len(one), 2) and one.features.shape == (len(one), 4)
    by_row = {tuple(np.round(r, 5)): t for r, t in zip(x, y)}
    for features, targets in zip(two.features, two.labels):  # each row keeps its own targets
        np.testing.assert_allclose(by_row[tuple(np.round(features, 5))], targets, rtol=1e-6)
    np.testing.assert_allclose(one.labels[:, 0], two.labels[:, 0], rtol=1e-6)


def test_unlabeled_data_needs_no_label_column_and_ignores_one_it_has(tmp_path):
    x, _ = write_regression_table(tmp_path / "r.parquet")
    pq.write_table(pq.read_table(str(tmp_path / "r.parquet")).drop_columns(["y", "both"]), str(tmp_path / "x.parquet"))
    for source, draw in [("x.parquet", None), ("x.parquet", Draw(size=50, seed=(1,))), ("r.parquet", None)]:
        table = load_dataset(str(tmp_path / source), Columns(wide=("x*",), targets="none"), draw)
        assert table.labels.shape == (len(table), 0) and table.features.shape[1] == 4
    default = load_dataset(str(tmp_path / "x.parquet"), Columns(targets="none"))  # every numeric column
    np.testing.assert_allclose(default.features, x, rtol=1e-6)
    digits = load_dataset("digits", Columns(targets="none"))
    assert digits.labels.shape == (1797, 0)


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        (Columns(label="y", wide=("x*",)), "labels must be integer class indices 0..n-1; numeric targets need --task"),
        (Columns(label="nothing", wide=("x*",)), "no column.*'nothing'.*or, for a model whose float outputs are the"),
        (Columns(label="x0", wide=("x1",), targets="values"), None),
    ],
)
def test_labels_that_do_not_fit_the_task_say_which_task_fits(tmp_path, columns, message):
    write_regression_table(tmp_path / "r.parquet")
    if message is None:
        assert load_dataset(str(tmp_path / "r.parquet"), columns).labels.shape == (400, 1)
        return
    with pytest.raises(InvalidDataset, match=message):
        load_dataset(str(tmp_path / "r.parquet"), columns)


def test_class_labelled_sources_have_no_regression_targets(tmp_path):
    with pytest.raises(InvalidDataset, match="digits labels its samples with classes, not numeric targets"):
        load_dataset("digits", Columns(targets="values"))


@pytest.mark.parametrize("sample_size", [None, 40])
def test_input_columns_of_a_parquet_directory_are_read_and_drawn_packed_by_name(tmp_path, sample_size):
    """A number-per-row input column next to a tensor column: the table is several inputs, not a wide table, read
    whole or drawn by row groups, across files."""
    rng = np.random.default_rng(0)
    for part in range(2):
        images = rng.integers(0, 255, (30, 2, 2, 1)).astype(np.uint8)
        table = pa.table(
            {
                "image": pa.FixedShapeTensorArray.from_numpy_ndarray(images),
                "age": pa.array(rng.integers(20, 90, 30)),
                "score": pa.array(rng.random(30)),  # numeric, and not named: not an input
                "label": pa.array(np.arange(30) % 3),
            }
        )
        pq.write_table(table, str(tmp_path / f"part-{part}.parquet"), row_group_size=8)
    columns = Columns(inputs=("image", "age"))
    draw = Draw(sample_size, (0,)) if sample_size else None
    loaded = load_dataset(str(tmp_path), columns, draw)
    assert [(slot.name, slot.shape) for slot in loaded.inputs] == [("image", (2, 2, 1)), ("age", (1,))]
    assert loaded.sample_shape == (5,) and len(loaded) == (sample_size or 60)
    assert loaded.features[:, 4].min() >= 20 and loaded.features[:, :4].max() <= 255


class NumpySource:
    """A kind of source a user might add: an .npz file of ``features`` and ``labels``."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            arrays = np.load(io.BytesIO(f.read()))
            self.table = TensorTable(arrays["features"], arrays["labels"])

    def fingerprint(self) -> str:
        return f"npz:{len(self.table)}"

    def peek(self, columns: Columns) -> TensorTable:
        return self.table.take(np.arange(1))

    def load(self, columns: Columns, draw: Draw | None) -> TensorTable:
        return self.table if draw is None else self.table.take(draw.indices(self.table.labels, "the npz"))


def test_a_kind_of_source_added_to_the_registry_is_fingerprinted_peeked_and_loaded(tmp_path, monkeypatch):
    features, labels = images(40)
    path = tmp_path / "samples.npz"
    np.savez(path, features=features, labels=labels)

    def npz(name, since, listing, given_splits):
        return NumpySource(name) if name.endswith(".npz") else None

    assert isinstance(open_source(str(path)), ParquetSource), "unclaimed, a URL falls to Parquet"
    monkeypatch.setattr("ptqflow.tasks.data.datasets.SOURCE_KINDS", {"npz": npz, **SOURCE_KINDS})
    assert source_fingerprint(str(path)) == "npz:40"
    assert peek_dataset(str(path)).features.shape == (1, *features.shape[1:])
    assert len(load_dataset(str(path))) == 40
    assert len(load_dataset(str(path), draw=Draw(10, (0, 1)))) == 10
