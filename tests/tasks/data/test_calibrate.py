from __future__ import annotations

import numpy as np
import pytest

from ptqflow.storage.tables import TensorTable
from ptqflow.tasks.core.errors import InvalidDataset
from ptqflow.tasks.data.calibration import draw_calibration_set


@pytest.fixture
def train() -> TensorTable:
    labels = np.repeat(np.arange(4), [400, 200, 200, 200])
    return TensorTable(np.arange(len(labels), dtype=np.float32)[:, None], labels)


def test_draws_the_asked_size_stratified(train):
    calibration = draw_calibration_set(train, 200, seed=0)
    assert len(calibration) == 200
    np.testing.assert_array_equal(np.bincount(calibration.labels), [80, 40, 40, 40])
    assert len(np.unique(calibration.features)) == 200  # no sample twice


def test_is_seeded(train):
    a, b, c = (draw_calibration_set(train, 50, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.features, b.features)
    assert not np.array_equal(a.features, c.features)


def test_larger_than_the_training_split_says_how_to_fix(train):
    with pytest.raises(InvalidDataset, match="has only 1000: pass --calibration-size 1000 or less"):
        draw_calibration_set(train, 1001, seed=0)


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_the_stored_calibration_set_reads_in_pandas_polars_and_duckdb(tmp_path, dtype):
    """What users inspect it with: each sample is one fixed-size binary value (C order, the dtype and shape in the
    schema's "ptqflow" metadata) and the label an int64."""
    import json

    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.parquet as pq

    from ptqflow.storage.tables import write_parquet_bytes

    rng = np.random.default_rng(0)
    features = (rng.random((60, 6, 6, 3)) * 255).astype(dtype)
    pool = TensorTable(features, np.arange(60) % 3)
    calibration = draw_calibration_set(pool, 30, seed=0)
    path = tmp_path / "calibration.parquet"
    path.write_bytes(write_parquet_bytes(calibration))

    meta = json.loads(pq.read_schema(path).metadata[b"ptqflow"])
    shape, stored_dtype = tuple(meta["shape"]), np.dtype(meta["dtype"])

    def decoded(blobs) -> np.ndarray:
        return np.stack([np.frombuffer(blob, stored_dtype).reshape(shape) for blob in blobs])

    frame = pd.read_parquet(path)
    np.testing.assert_array_equal(decoded(frame["features"]), calibration.features)
    np.testing.assert_array_equal(frame["label"].to_numpy(), calibration.labels)

    polars_frame = pl.read_parquet(path)
    np.testing.assert_array_equal(decoded(polars_frame["features"].to_list()), calibration.features)
    np.testing.assert_array_equal(polars_frame["label"].to_numpy(), calibration.labels)

    rows = duckdb.sql(f"SELECT features, label FROM read_parquet('{path}')").fetchall()
    np.testing.assert_array_equal(decoded([r[0] for r in rows]), calibration.features)
    np.testing.assert_array_equal([r[1] for r in rows], calibration.labels)
    per_class = duckdb.sql(f"SELECT label, count(*) FROM read_parquet('{path}') GROUP BY label ORDER BY label")
    assert per_class.fetchall() == [(0, 10), (1, 10), (2, 10)]


def test_calibration_samples_that_feed_other_inputs_are_refused():
    from ptqflow.storage.tables import InputSlot
    from ptqflow.tasks.core.artifacts import FeatureSpec
    from ptqflow.tasks.data.calibration import check_matches_spec

    slots = (InputSlot("image", (2, 2, 1)), InputSlot("extra", (2,)))
    spec = FeatureSpec(
        shape=(6,), dtype="float32", value_range=(0, 1), n_classes=2, class_names=("a", "b"), inputs=slots
    )
    same_size = {"inputs": [{"name": "image", "shape": [3]}, {"name": "extra", "shape": [3]}]}
    table = TensorTable(np.zeros((4, 6), np.float32), np.arange(4) % 2, same_size)
    with pytest.raises(InvalidDataset, match="feeds the inputs \\[\\('image', \\(3,\\)\\).*calibrate on samples"):
        check_matches_spec(table, spec, "the calibration source")
    one_input = TensorTable(np.zeros((4, 6), np.float32), np.arange(4) % 2)
    with pytest.raises(InvalidDataset, match="of a one-input model"):
        check_matches_spec(one_input, spec, "the calibration source")
    matching = {"inputs": [{"name": "image", "shape": [2, 2, 1]}, {"name": "extra", "shape": [2]}]}
    assert check_matches_spec(TensorTable(np.zeros((4, 6), np.float32), np.arange(4) % 2, matching), spec, "it")
