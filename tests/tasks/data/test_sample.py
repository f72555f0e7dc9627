"""sample_dataset's pure functions, without Prefect."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.storage.tables import TensorTable
from ptqflow.tasks.core.errors import InvalidDataset
from ptqflow.tasks.core.parameters import SamplingParameters, SplitMode
from ptqflow.tasks.data.datasets import load_dataset
from ptqflow.tasks.data.sampling import (
    GIVEN_SCHEME,
    SPLIT_SCHEME,
    check_dataset,
    feature_spec,
    hash_split,
    read_seen_rows,
    row_digests,
    seen_rows_bytes,
    split_dataset,
    split_positions,
    split_rows,
)
from ptqflow.tasks.data.stratify import stratified_choice


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


def given_table(train: int, validation: int, test: int, seed: int = 0) -> TensorTable:
    """Distinct rows of 3 classes with the given split sizes, classes in turn within each split."""
    n = train + validation + test
    codes = np.repeat(np.array([0, 1, 2], np.int8), [train, validation, test])
    return TensorTable(distinct_rows(n, seed), np.arange(n) % 3, {"value_range": [0.0, 255.0]}, codes)


def test_a_given_test_split_is_kept_whole_and_a_missing_validation_split_is_carved_from_train():
    table = given_table(train=300, validation=0, test=90)
    indices, rule = split_rows(table, SamplingParameters(validation_fraction=0.2), seed=0)
    assert sorted(indices["test"].tolist()) == list(range(300, 390))
    assert set(indices["validation"]) | set(indices["train"]) == set(range(300))
    assert not set(indices["validation"]) & set(indices["train"])
    assert 40 <= len(indices["validation"]) <= 80  # about 20% of 300
    assert rule.scheme == GIVEN_SCHEME and rule.given["validation"].startswith("carved from the given train split")

    resplit, rule = split_rows(table, SamplingParameters(splits=SplitMode.resplit), seed=0)
    assert rule.scheme == SPLIT_SCHEME and rule.given is None
    assert set(resplit["test"]) & set(range(300))  # pooled: training rows reach the test split


def test_given_splits_hold_their_rows_as_the_data_grows():
    small, grown = given_table(300, 30, 60), given_table(300, 30, 60)
    extra = given_table(30, 0, 0, seed=9)
    grown = TensorTable(
        np.concatenate([extra.features, grown.features]),
        np.concatenate([extra.labels, grown.labels]),
        grown.metadata,
        np.concatenate([extra.splits, grown.splits]),
    )
    before, _ = split_rows(small, SamplingParameters(), seed=0)
    after, _ = split_rows(grown, SamplingParameters(), seed=0)
    assert sorted((after["test"] - 30).tolist()) == sorted(before["test"].tolist())
    assert set((after["train"][after["train"] >= 30] - 30).tolist()) == set(before["train"].tolist())


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (given_table(0, 0, 60), "gives its test split but no train split: add the training rows"),
        (
            TensorTable(distinct_rows(90), np.repeat([0, 1, 2], 30), {}, np.repeat(np.int8([0, 2, 2]), 30)),
            "class 1 has 30 samples but none in the train split",
        ),
    ],
)
def test_given_splits_that_cannot_train_are_refused_with_the_fix(table, message):
    with pytest.raises(InvalidDataset, match=message) as refused:
        split_rows(table, SamplingParameters(), seed=0)
    assert "--splits resplit" in str(refused.value)


def test_seen_row_digests_round_trip_and_ignore_order_and_duplicates():
    rows = distinct_rows(50)
    digests = row_digests(rows)
    assert digests.dtype == np.uint64 and len(np.unique(digests)) == 50
    stored = read_seen_rows(seen_rows_bytes(np.concatenate([rows[::-1], rows[:5]])))
    assert stored.tolist() == sorted(digests.tolist())
    assert np.isin(row_digests(rows[:3]), stored).all() and not np.isin(row_digests(distinct_rows(3, 7)), stored).any()
    some = np.array([7, 3, 41])  # the rows of a split, read in place: the same digests as the copied rows'
    assert row_digests(rows, some).tolist() == row_digests(rows[some]).tolist()


@pytest.mark.parametrize("targets", [2, 0])
def test_regression_and_unlabeled_rows_split_by_content_alone(targets):
    from ptqflow.tasks.core.parameters import ModelTask

    rng = np.random.default_rng(0)
    table = TensorTable(
        rng.normal(size=(500, 3)).astype(np.float32), rng.normal(size=(500, targets)).astype(np.float32)
    )
    indices, _ = split_rows(table, SamplingParameters(), seed=0)
    assert sorted(np.concatenate(list(indices.values())).tolist()) == list(range(500))
    assert 60 < len(indices["test"]) < 140  # a fifth, up to hash noise: no class to stratify by
    task = ModelTask.regression if targets else ModelTask.unlabeled
    spec = feature_spec(table, task)
    assert spec.task is task and spec.n_targets == targets and spec.n_classes == 0 and spec.class_names == ()


def test_targets_that_are_not_finite_are_refused_naming_the_rows():
    labels = np.zeros((50, 1), np.float32)
    labels[[3, 7]] = np.nan
    with pytest.raises(InvalidDataset, match=r"2 targets of the data set are NaN or Inf \(rows 3, 7\)"):
        check_dataset(TensorTable(np.arange(100, dtype=np.float32).reshape(50, 2), labels))


@pytest.mark.parametrize(
    ("names", "refusal"),
    [
        (["cat", "line\nbreak"], "holds a control character"),
        (["cat", ""], "class 1's name '' is empty"),
        (["cat", "x" * 201], "is longer than 200 characters"),
        (["cat", "cat"], "class name 'cat' names several classes"),
    ],
)
def test_class_names_a_report_cannot_show_are_refused_at_sampling(names, refusal):
    from ptqflow.tasks.data.sampling import check_class_names

    with pytest.raises(InvalidDataset) as error:
        check_class_names(names)
    assert (
        refusal in str(error.value) and "rename it in the source" in str(error.value) or "own name" in str(error.value)
    )
    check_class_names(["$\\foo$", "naïve", "日本"])  # shown as plain text
