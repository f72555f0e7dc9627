"""The splits a source gives: names, file layouts, the split column."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ptqflow.tasks.core.errors import InvalidDataset
from ptqflow.tasks.data.splits import (
    SPLITS,
    codes_of_column,
    origin_of_files,
    split_named,
    split_of_path,
    splits_of_files,
)


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("train", "train"),
        ("train-00000-of-00004.parquet", "train"),
        ("Validation", "validation"),
        ("val", "validation"),
        ("valid_2024.csv", "validation"),
        ("test.parquet", "test"),
        ("testing", "test"),
        ("trainer", None),
        ("contest", None),
        ("data", None),
        ("part-0.parquet", None),
    ],
)
def test_a_name_stands_for_a_split_only_as_its_first_word(name, split):
    assert split_named(name) == split


def test_the_first_folder_or_file_name_that_names_a_split_wins():
    assert split_of_path("data/train-00000-of-00001.parquet") == "train"
    assert split_of_path("test/cats/001.jpg") == "test"
    assert split_of_path("2026/part-0.parquet") is None


def test_hugging_face_file_names_give_each_file_its_split():
    files = [
        "/d/data/test-00000-of-00001.parquet",
        "/d/data/train-00000-of-00002.parquet",
        "/d/data/train-00001-of-00002.parquet",
    ]
    assert splits_of_files(files, "/d", "s3://b/d") == ["test", "train", "train"]
    origin = origin_of_files(files, "/d", ["test", "train", "train"])
    assert origin == {
        "train": "2 files: data/train-00000-of-00002.parquet, data/train-00001-of-00002.parquet",
        "test": "1 file: data/test-00000-of-00001.parquet",
    }


def test_files_that_hold_nothing_out_are_not_given_splits():
    assert splits_of_files(["/d/part-0.parquet", "/d/part-1.parquet"], "/d", "/d") is None
    assert splits_of_files(["/d/train-0.parquet", "/d/train-1.parquet"], "/d", "/d") is None


def test_a_file_in_no_split_beside_files_that_name_one_is_refused_with_the_fix():
    with pytest.raises(InvalidDataset, match=r"/d/extra.parquet is in none of the splits .* --splits resplit"):
        splits_of_files(["/d/train.parquet", "/d/test.parquet", "/d/extra.parquet"], "/d", "/d")


def test_a_split_column_maps_every_known_name_and_alias():
    column = pa.chunked_array([["train", "val", "Test"], ["validation", "train"]])
    assert codes_of_column(column, "t").tolist() == [SPLITS.index(s) for s in ["train", "validation", "test"]] + [1, 0]
    dictionary = pa.array(["test", "train", "test"]).dictionary_encode()
    assert codes_of_column(dictionary, "t").tolist() == [2, 0, 2]
    assert codes_of_column(pa.array([], pa.string()), "t").dtype == np.int8


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (pa.array(["train", "holdout"]), r"holds 'holdout', which is none of train, validation \(val, valid\) or test"),
        (pa.array(["train", None]), "has 1 empty rows"),
        (pa.array([0, 1]), "has type int64: give it the split names"),
    ],
)
def test_a_split_column_that_names_no_split_is_refused_with_the_fix(values, message):
    with pytest.raises(InvalidDataset, match=message) as refused:
        codes_of_column(values, "rows.parquet")
    assert "--splits resplit" in str(refused.value)
