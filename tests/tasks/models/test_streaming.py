"""Training batches streamed from a split's row groups: every row once an epoch, drawn by the seed, in bounded
memory; moments gathered group by group."""

from __future__ import annotations

import io

import numpy as np
import pytest

from ptqflow.storage.tables import InputSlot, ParquetRowGroups, TensorTable, write_parquet_bytes
from ptqflow.tasks.models.streaming import Moments, SplitBatches, TableRowGroups, feature_moments

ROWS, ROW_BYTES = 103, 12  # 103 rows of 3 float32 values


@pytest.fixture
def stored() -> ParquetRowGroups:
    """103 rows in row groups of 10: row i's features are (i, i, i) and its label i."""
    features = np.repeat(np.arange(ROWS, dtype=np.float32)[:, None], 3, axis=1)
    table = TensorTable(features, np.arange(ROWS))
    return ParquetRowGroups(io.BytesIO(write_parquet_bytes(table, row_group_size=10)))


def _epoch(batches) -> list[np.ndarray]:
    found = [batches[i] for i in range(len(batches))]
    batches.on_epoch_end()
    return [labels for _, labels in found]


def test_each_epoch_gives_every_row_once_in_an_order_drawn_by_the_seed(stored):
    # windows of 24 rows: each takes rows of several groups, and a group straddles two windows
    batches = SplitBatches(stored, batch_size=8, seed=5, window_bytes=24 * ROW_BYTES)
    assert batches.window_rows == 24 and len(batches) == 13
    first, second = _epoch(batches), _epoch(batches)
    for epoch in (first, second):
        assert [len(b) for b in epoch] == [8] * 12 + [7]
        assert sorted(np.concatenate(epoch).tolist()) == list(range(ROWS))
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))
    assert not np.array_equal(np.concatenate(first), np.arange(ROWS))

    again = SplitBatches(stored, batch_size=8, seed=5, window_bytes=24 * ROW_BYTES)
    np.testing.assert_array_equal(np.concatenate(_epoch(again)), np.concatenate(first))
    other_seed = SplitBatches(stored, batch_size=8, seed=6, window_bytes=24 * ROW_BYTES)
    assert not np.array_equal(np.concatenate(_epoch(other_seed)), np.concatenate(first))


def test_a_batch_is_the_same_whatever_order_keras_asks_for_them(stored):
    batches = SplitBatches(stored, batch_size=8, seed=1, window_bytes=24 * ROW_BYTES)
    in_order = [batches[i][1] for i in range(len(batches))]
    backwards = [batches[i][1] for i in reversed(range(len(batches)))][::-1]
    for a, b in zip(in_order, backwards, strict=True):
        np.testing.assert_array_equal(a, b)


def test_features_and_labels_stay_together_and_feed_keras_as_float32(stored):
    features, labels = SplitBatches(stored, batch_size=16, seed=2)[3]
    assert features.dtype == np.float32
    np.testing.assert_array_equal(features[:, 0], labels.astype(np.float32))


def test_validation_batches_keep_the_stored_order(stored):
    batches = SplitBatches(stored, batch_size=16, shuffle=False, window_bytes=24 * ROW_BYTES)
    first = np.concatenate(_epoch(batches))
    np.testing.assert_array_equal(first, np.arange(ROWS))
    np.testing.assert_array_equal(np.concatenate(_epoch(batches)), first)


def test_several_inputs_are_fed_by_name():
    features = np.arange(40, dtype=np.float32).reshape(10, 4)
    slots = (InputSlot("a", (1,)), InputSlot("b", (3,)))
    feed, _ = SplitBatches(TableRowGroups(TensorTable(features, np.arange(10))), batch_size=4, inputs=slots)[0]
    assert set(feed) == {"a", "b"} and feed["a"].shape == (4, 1) and feed["b"].shape == (4, 3)


class Counting:
    """A split's row groups that note what is read: the groups read whole, and the sizes of the parts read in
    order."""

    def __init__(self, stored: ParquetRowGroups) -> None:
        self.stored, self.row_counts = stored, stored.row_counts
        self.groups_read: list[int] = []
        self.parts_read: list[int] = []

    def read(self, group: int) -> TensorTable:
        self.groups_read.append(group)
        return self.stored.read(group)

    def iter_rows(self, rows: int):
        for part in self.stored.iter_rows(rows):
            self.parts_read.append(len(part))
            yield part


def test_a_window_holds_a_bounded_number_of_rows_whatever_the_split(stored):
    """What memory holds at once is the window (and one group), not the split."""
    counting = Counting(stored)
    batches = SplitBatches(counting, batch_size=8, seed=0, window_bytes=24 * ROW_BYTES)
    counting.groups_read.clear()
    held = []
    for index in range(len(batches)):
        batches[index]
        held.append(len(batches._window[2]))  # the rows the window holds while this batch is served
    # 11 groups, each read once, plus at most once more for each window boundary that falls inside a group
    assert len(counting.groups_read) <= len(stored.row_counts) + 5
    assert max(held) <= 24 < ROWS


def test_validation_reads_window_by_window_and_never_a_whole_group(stored):
    """In order, a reader holds a window: a split's row group (32 MB when stored) is never read whole."""
    counting = Counting(stored)
    batches = SplitBatches(counting, batch_size=8, shuffle=False, window_bytes=24 * ROW_BYTES)
    counting.groups_read.clear()  # the first group, read once for the size of a row
    for _ in range(2):
        np.testing.assert_array_equal(np.concatenate(_epoch(batches)), np.arange(ROWS))
    assert not counting.groups_read
    assert counting.parts_read == [24, 24, 24, 24, 7] * 2  # each window read once an epoch, in order
    np.testing.assert_array_equal(batches[12][1], np.arange(96, ROWS))  # out of order: read again from the start
    np.testing.assert_array_equal(batches[0][1], np.arange(8))


def test_moments_over_groups_are_the_whole_splits():
    rng = np.random.default_rng(0)
    values = (rng.normal(size=(1000, 5)) * [1, 10, 100, 1e3, 1e-3] + [0, 5, -50, 1e4, 2]).astype(np.float32)
    whole = values.astype(np.float64)
    groups = TableRowGroups(TensorTable(values, np.zeros(1000, np.int64)), group_bytes=37 * values[:1].nbytes)
    assert len(groups.row_counts) > 20
    (merged,) = feature_moments(groups)
    assert merged.count == 1000
    np.testing.assert_allclose(merged.mean, whole.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.variance, whole.var(axis=0), rtol=1e-10)
    # one group: exactly numpy's own figures
    single = Moments.of(values)
    np.testing.assert_array_equal(single.mean, whole.mean(axis=0))
    np.testing.assert_array_equal(single.variance, whole.var(axis=0))
