"""Training data streamed from a split's row groups: memory bounded by a shuffle window, not by the split's size.

A split is read as row groups (``RowGroups``: a stored Parquet file, or a table already in memory). Each epoch
the groups are taken in an order drawn from (seed, epoch), cut into windows of whole batches, and each window's
rows are shuffled by (seed, epoch, window): batch ``i`` of an epoch is the same whichever order Keras asks for it,
so training is deterministic under the seed. The sample stage stores each split in the seeded order of its rows'
content hashes (``tasks.data.sampling``), which interleaves the classes: a window of a few row groups is a random
draw of the split, whatever order the source was in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import keras
import numpy as np

from ptqflow.storage.tables import InputSlot, TensorTable, split_inputs
from ptqflow.tasks.models.feeds import keras_feed

# The raw bytes of features one shuffle window holds. With the row group it is cut from (ROW_GROUP_BYTES), it is
# what training holds of a split, whatever the split's size; the stored order is random already (see above).
WINDOW_BYTES = 16 << 20
# Rows of an in-memory table per group, as the sample stage writes a stored split.
TABLE_GROUP_BYTES = 32 << 20


class RowGroups(Protocol):
    """A split, one group of rows at a time, or in order a given number of rows at a time."""

    @property
    def row_counts(self) -> Sequence[int]: ...

    def read(self, group: int) -> TensorTable: ...

    def iter_rows(self, rows: int) -> Iterator[TensorTable]: ...


class TableRowGroups:
    """A table already in memory, as row groups (tests, benchmarks, the Python API)."""

    def __init__(self, table: TensorTable, group_bytes: int = TABLE_GROUP_BYTES) -> None:
        self._table = table
        row_bytes = max(1, table.features[:1].nbytes)
        rows = max(1, group_bytes // row_bytes)
        self._starts = list(range(0, len(table), rows)) or [0]
        self.row_counts = tuple(min(rows, len(table) - start) for start in self._starts)

    def read(self, group: int) -> TensorTable:
        start = self._starts[group]
        return self._table.take(np.arange(start, start + self.row_counts[group]))

    def iter_rows(self, rows: int) -> Iterator[TensorTable]:
        for start in range(0, len(self._table), rows):
            yield self._table.take(np.arange(start, min(start + rows, len(self._table))))


def row_groups(data: RowGroups | TensorTable) -> RowGroups:
    return TableRowGroups(data) if isinstance(data, TensorTable) else data


class SplitBatches(keras.utils.PyDataset):
    """Keras batches ``(inputs, labels)`` of a split, read window by window."""

    def __init__(
        self,
        groups: RowGroups,
        batch_size: int,
        *,
        inputs: tuple[InputSlot, ...] = (),
        seed: int = 0,
        shuffle: bool = True,
        window_bytes: int = WINDOW_BYTES,
    ) -> None:
        super().__init__(workers=1, use_multiprocessing=False)
        self.groups, self.batch_size, self.inputs = groups, batch_size, inputs
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        self.rows = int(sum(groups.row_counts))
        if self.rows == 0:
            raise ValueError("a split with no rows cannot be trained or validated on")
        first = groups.read(0)
        row_bytes = max(1, first.features[:1].nbytes)
        self.window_rows = max(1, window_bytes // row_bytes // batch_size) * batch_size
        # Read in order (validation): window after window from a reader that holds about one window, never a
        # whole group; shuffled: from the groups, the last one read kept.
        self._cached_group: tuple[int, TensorTable | None] = (0, first) if shuffle else (-1, None)
        self._in_order: tuple[int, Iterator[TensorTable]] | None = None  # (the window it gives next, the reader)
        self._window: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return -(-self.rows // self.batch_size)

    def on_epoch_end(self) -> None:
        self.epoch += 1

    def _group(self, group: int) -> TensorTable:
        if self._cached_group[0] != group or self._cached_group[1] is None:
            self._cached_group = (group, self.groups.read(group))
        table = self._cached_group[1]
        assert table is not None
        return table

    def _window_in_order(self, window: int) -> TensorTable:
        """Rows ``[window * window_rows, ...)`` of the stored order, read on from the previous window when Keras
        asks for them in order (as it does), else from the start."""
        if self._in_order is None or self._in_order[0] > window:
            self._in_order = (0, self.groups.iter_rows(self.window_rows))
        position, reader = self._in_order
        for _ in range(window - position):
            next(reader)
        self._in_order = (window + 1, reader)
        return next(reader)

    def _sequence(self) -> tuple[np.ndarray, int]:
        """This epoch's order of the groups, and the row of that sequence the epoch starts at: a different cut
        into windows each epoch, so that rows batched together change from one epoch to the next."""
        count = len(self.groups.row_counts)
        if not self.shuffle:
            return np.arange(count), 0
        rng = np.random.default_rng((self.seed, self.epoch))
        return rng.permutation(count), int(rng.integers(self.rows))

    def _segment(self, order: np.ndarray, start: int, stop: int) -> list[TensorTable]:
        """Rows ``[start, stop)`` of the groups taken in ``order``, as slices of the groups they are in."""
        counts = np.asarray(self.groups.row_counts)[order]
        ends = np.cumsum(counts)
        found = []
        for position in range(int(np.searchsorted(ends, start, side="right")), len(order)):
            group_start = int(ends[position] - counts[position])
            if group_start >= stop:
                break
            table = self._group(int(order[position]))
            low, high = max(start, group_start) - group_start, min(stop, int(ends[position])) - group_start
            found.append(TensorTable(table.features[low:high], table.labels[low:high]))
        return found

    def _load_window(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[window * window_rows, ...)`` of this epoch's sequence of groups, shuffled."""
        key = (self.epoch if self.shuffle else 0, window)
        if self._window is not None and self._window[0] == key:
            return self._window[1], self._window[2]
        if not self.shuffle:
            part = self._window_in_order(window)
            self._window = (key, part.features, part.labels)
            return part.features, part.labels
        order, shift = self._sequence()
        start = window * self.window_rows + shift
        stop = min((window + 1) * self.window_rows, self.rows) + shift
        parts = self._segment(order, start, min(stop, self.rows))
        if stop > self.rows:  # the epoch's last window wraps around to the sequence's first rows
            parts += self._segment(order, max(start - self.rows, 0), stop - self.rows)
        features = np.concatenate([p.features for p in parts]) if len(parts) > 1 else parts[0].features
        labels = np.concatenate([p.labels for p in parts]) if len(parts) > 1 else parts[0].labels
        if self.shuffle:
            rows = np.random.default_rng((self.seed, self.epoch, window)).permutation(len(labels))
            features, labels = features[rows], labels[rows]
        self._window = (key, features, labels)
        return features, labels

    def __getitem__(self, index: int) -> tuple[Any, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        first = index * self.batch_size
        window, offset = divmod(first, self.window_rows)
        features, labels = self._load_window(window)
        batch = slice(offset, offset + self.batch_size)
        return keras_feed(features[batch], self.inputs), labels[batch]


@dataclass(frozen=True)
class Moments:
    """Each feature's mean and variance over a split, gathered group by group (float64)."""

    count: int
    mean: np.ndarray
    variance: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray) -> Moments:
        flat = values.reshape(len(values), -1).astype(np.float64)
        return cls(len(flat), flat.mean(axis=0), flat.var(axis=0))

    def merged(self, other: Moments) -> Moments:
        """Both groups' moments together (Chan et al.'s pairwise update: no sum of squares to lose precision)."""
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        variance = (self.count * self.variance + other.count * other.variance) / count + delta**2 * (
            self.count * other.count / count**2
        )
        return Moments(count, mean, variance)


def feature_moments(groups: RowGroups, inputs: tuple[InputSlot, ...] = ()) -> list[Moments]:
    """The split's moments, one pass over its groups: of the features, or of each input's part of them."""
    found: list[Moments] | None = None
    for group in range(len(groups.row_counts)):
        features = groups.read(group).features
        parts = split_inputs(features, inputs) if inputs else [features]
        moments = [Moments.of(part) for part in parts]
        found = moments if found is None else [a.merged(b) for a, b in zip(found, moments, strict=True)]
    if found is None:
        raise ValueError("a split with no rows has no moments")
    return found
