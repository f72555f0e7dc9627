"""sample_dataset's pure functions, without Prefect."""

from __future__ import annotations

import numpy as np
import pytest

from storage.tables import TensorTable
from tasks.datasets import load_dataset
from tasks.errors import InvalidDataset
from tasks.parameters import SamplingParameters
from tasks.sample import check_dataset, feature_spec, split_dataset, stratified_choice, stratified_split


def test_digits_are_raw_uint8_values_with_their_range():
    table = load_dataset("digits")
    assert table.features.dtype == np.uint8 and table.sample_shape == (8, 8, 1)
    assert table.features.max() == 16 and table.metadata["value_range"] == [0.0, 16.0]
    spec = feature_spec(table)
    assert spec.n_classes == 10 and spec.value_range == (0.0, 16.0)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(InvalidDataset, match="unknown data set .nope.: choose one of cifar10, digits, fashion_mnist, mnist"):
        load_dataset("nope")


def test_splits_are_disjoint_complete_and_stratified():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    splits = stratified_split(labels, 0.15, 0.2, seed=0)
    joined = np.concatenate(list(splits.values()))
    assert len(joined) == len(labels) == len(np.unique(joined))
    for name, fraction in (("test", 0.2), ("validation", 0.15)):
        counts = np.bincount(labels[splits[name]], minlength=4)
        np.testing.assert_allclose(counts, np.array([100, 50, 30, 20]) * fraction, atol=1)


def test_splits_are_seeded():
    labels = np.repeat(np.arange(3), 40)
    a, b = stratified_split(labels, 0.2, 0.2, 7), stratified_split(labels, 0.2, 0.2, 7)
    c = stratified_split(labels, 0.2, 0.2, 8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])


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
