"""sample_dataset's pure functions, without Prefect."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.storage.tables import TensorTable
from ptqflow.tasks.datasets import load_dataset
from ptqflow.tasks.errors import InvalidDataset
from ptqflow.tasks.parameters import SamplingParameters
from ptqflow.tasks.sample import SPLIT_SCHEME, check_dataset, feature_spec, hash_split, split_dataset, split_positions
from ptqflow.tasks.stratify import stratified_choice


def test_digits_are_raw_uint8_values_with_their_range():
    table = load_dataset("digits")
    assert table.features.dtype == np.uint8 and table.sample_shape == (8, 8, 1)
    assert table.features.max() == 16 and table.metadata["value_range"] == [0.0, 16.0]
    spec = feature_spec(table)
    assert spec.n_classes == 10 and spec.value_range == (0.0, 16.0)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(
        InvalidDataset, match="unknown data set .nope.: choose one of cifar10, digits, fashion_mnist, mnist"
    ):
        load_dataset("nope")


def distinct_rows(n: int, seed: int = 0) -> np.ndarray:
    """``n`` different 8x8 uint8 samples."""
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def test_splits_are_disjoint_complete_and_stratified():
    labels = np.repeat(np.arange(4), [1000, 500, 300, 200])
    splits = hash_split(distinct_rows(len(labels)), labels, 0.15, 0.2, seed=0)
    joined = np.concatenate(list(splits.values()))
    assert len(joined) == len(labels) == len(np.unique(joined))
    class_sizes = np.array([1000, 500, 300, 200])
    for name, fraction in (("test", 0.2), ("validation", 0.15)):
        counts = np.bincount(labels[splits[name]], minlength=4)
        # Each row is placed on its own: per class, the count is binomial around its share (4 standard deviations).
        noise = 4 * np.sqrt(class_sizes * fraction * (1 - fraction))
        assert np.all(np.abs(counts - class_sizes * fraction) <= noise), (name, counts)


def test_splits_are_seeded():
    labels = np.repeat(np.arange(3), 40)
    rows = distinct_rows(len(labels))
    a, b = hash_split(rows, labels, 0.2, 0.2, 7), hash_split(rows, labels, 0.2, 0.2, 7)
    c = hash_split(rows, labels, 0.2, 0.2, 8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])


def membership(rows: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[bytes, str]:
    """Which split each row (by its bytes) lands in."""
    splits = hash_split(rows, labels, 0.15, 0.2, seed)
    return {rows[i].tobytes(): name for name, indices in splits.items() for i in indices}


def test_appending_rows_never_moves_a_row_between_splits():
    table = load_dataset("digits")
    old, new = slice(0, 1500), slice(0, None)  # the case: 297 rows appended
    before = membership(table.features[old], table.labels[old])
    after = membership(table.features[new], table.labels[new])
    moved = {row for row, split in before.items() if after[row] != split}
    assert not moved
    new_test = [row for row, split in after.items() if split == "test"]
    assert not [row for row in new_test if before.get(row) == "train"]  # 0 of today's test rows trained yesterday
    assert all(after[row] == "test" for row, split in before.items() if split == "test")


def test_removing_or_reordering_rows_moves_none_of_the_others():
    table = load_dataset("digits")
    full = membership(table.features, table.labels)
    keep = np.random.default_rng(3).permutation(len(table))[: len(table) * 3 // 4]  # a quarter removed, shuffled
    assert membership(table.features[keep], table.labels[keep]) == {
        table.features[i].tobytes(): full[table.features[i].tobytes()] for i in keep
    }


def test_identical_rows_never_straddle_splits():
    rows = distinct_rows(300)
    labels = np.arange(300) % 3
    doubled = np.concatenate([rows, rows[:100], rows[:100]])
    doubled_labels = np.concatenate([labels, labels[:100], labels[:100]])
    splits = hash_split(doubled, doubled_labels, 0.15, 0.2, seed=0)
    where = {}
    for name, indices in splits.items():
        for i in indices:
            assert where.setdefault(doubled[i].tobytes(), name) == name


def test_a_rows_place_depends_on_its_content_and_the_seed_only():
    rows = distinct_rows(50)
    places = split_positions(rows, seed=0)
    assert np.array_equal(split_positions(rows[::-1], seed=0), places[::-1])
    assert np.all((places >= 0) & (places < 1)) and not np.array_equal(split_positions(rows, seed=1), places)
    assert SPLIT_SCHEME == "sha256-row-v1"  # a new rule needs a new name: exported models record this one


def test_a_class_with_no_row_in_a_split_is_refused_with_the_fix():
    labels = np.array([0] * 200 + [1] * 5)
    with pytest.raises(InvalidDataset, match="class 1 has 5 samples and none fell in the .* split.*another --seed"):
        for seed in range(50):  # some seed leaves one of class 1's five rows out of a split
            hash_split(distinct_rows(205), labels, 0.15, 0.2, seed)


def test_stratified_choice_hits_the_exact_size():
    labels = np.repeat(np.arange(3), [7, 11, 13])
    for size in (1, 5, 10, 31):
        chosen = stratified_choice(labels, size, np.random.default_rng(0))
        assert len(chosen) == size == len(np.unique(chosen))


def test_split_dataset_keeps_metadata():
    table = load_dataset("digits")
    splits = split_dataset(table, SamplingParameters(), seed=0)
    assert sum(len(s) for s in splits.values()) == len(table)
    assert splits["test"].metadata["value_range"] == [0.0, 16.0]


@pytest.mark.parametrize(
    ("features", "labels", "message"),
    [
        (np.zeros((0, 2), np.float32), np.zeros(0, np.int64), "empty"),
        (np.zeros((20, 2), np.float32), np.zeros(20, np.int64), "at least two classes"),
        (np.array([[np.nan, 0]] * 10 + [[0, 0]] * 10, np.float32), np.repeat([0, 1], 10), "NaN or Inf.*rows 0, 1"),
        (np.zeros((12, 2), np.float32), np.array([0] * 10 + [1] * 2), "class 1 has only 2 samples"),
    ],
)
def test_bad_data_sets_are_refused_with_a_fix(features, labels, message):
    with pytest.raises(InvalidDataset, match=message):
        check_dataset(TensorTable(features, labels))


def test_fractions_must_leave_training_data():
    with pytest.raises(ValueError, match="below 0.8"):
        SamplingParameters(validation_fraction=0.45, test_fraction=0.45)
