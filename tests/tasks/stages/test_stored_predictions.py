"""The validate stage reads the shards' predictions window by window: any range of rows, across shards, as the
joined predictions hold it."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.storage.store import ArtifactStore
from ptqflow.storage.tables import TensorTable, no_labels, write_parquet_bytes
from ptqflow.tasks.core.artifacts import PredictedRows, RefusedCall, TflmOnRows
from ptqflow.tasks.stages.validate import StoredPredictions


def _shard(store: ArtifactStore, start: int, stop: int, refused: tuple[RefusedCall, ...] = ()) -> PredictedRows:
    rows = np.arange(start, stop, dtype=np.float32)
    stacked = np.stack([rows, rows + 0.5, rows + 0.25], axis=1)[:, :, None]  # keras, float, quantized
    table = TensorTable(np.ascontiguousarray(stacked), no_labels(stop - start))
    drawn = np.arange(start, stop)[::3]  # TFLM's rows of the range, as positions in the test split
    tflm_table = TensorTable(rows[drawn - start][:, None] + 1, drawn.astype(np.int64))
    return PredictedRows(
        start=start,
        stop=stop,
        outputs=store.put_bytes(write_parquet_bytes(table), ".parquet"),
        quantized_refused=refused,
        tflm=TflmOnRows(outputs=store.put_bytes(write_parquet_bytes(tflm_table), ".parquet")),
    )


def test_windows_across_shards_read_what_the_shards_hold(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    shards = (
        _shard(store, 64, 128, (RefusedCall(start=10, stop=11, message="refused"),)),
        _shard(store, 0, 64),  # in any order
        _shard(store, 128, 150),
    )
    stored = StoredPredictions(store, shards)
    for start, stop in ((0, 50), (50, 100), (100, 150)):
        window = stored.rows(start, stop)
        np.testing.assert_array_equal(window.keras.reshape(-1), np.arange(start, stop))
        np.testing.assert_array_equal(window.quantized_tflite.reshape(-1), np.arange(start, stop) + 0.25)
        assert window.tflm is not None
        drawn = [row for row in range(start, stop) if row % 64 % 3 == 0]  # each shard draws every third of its rows
        np.testing.assert_array_equal(window.tflm.rows, drawn)
        np.testing.assert_array_equal(window.tflm.litert.reshape(-1), np.array(drawn) + 0.25)
        refused = [(f.start + start, f.stop + start) for f in window.quantized_refused]
        assert refused == ([(74, 75)] if start <= 74 < stop else [])


def test_rows_no_shard_holds_are_refused(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    stored = StoredPredictions(store, (_shard(store, 0, 64),))
    with pytest.raises(ValueError, match="do not cover test rows 32 to 96"):
        stored.rows(32, 96)
