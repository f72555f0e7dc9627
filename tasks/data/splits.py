"""The splits a data set already has: folders or files named ``train``, ``validation`` (``val``, ``valid``) and
``test`` (the Hugging Face file naming too: ``data/train-00000-of-00001.parquet``), or a ``split`` column.

With ``--splits auto`` (the default) a source that names them is split as given: its test rows never reach
training or calibration. ``--splits resplit`` ignores them and assigns every row by its content's hash
(``tasks.data.sampling.hash_split``), as for a source that names none.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ptqflow.tasks.core.errors import InvalidDataset

SPLITS = ("train", "validation", "test")
SPLIT_COLUMN = "split"
# What owners and Hugging Face call their splits, and the split each name stands for.
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "test": "test",
    "testing": "test",
}
KNOWN_NAMES = "train, validation (val, valid) or test"


def split_named(name: str) -> str | None:
    """The split a folder name, file name or ``split`` value stands for: the whole name, or its first word before
    ``-``, ``_`` or ``.`` (``train-00000-of-00001.parquet``, ``test_2024.csv``); None for any other name."""
    word = re.split(r"[-_.]", name.strip().lower(), maxsplit=1)[0]
    return SPLIT_NAMES.get(word)


def split_of_path(relative: str) -> str | None:
    """The split a file's path below the source names: its first folder, or else its file name, that names one."""
    return next((split for part in relative.split("/") if (split := split_named(part))), None)


def split_codes(names: Sequence[str]) -> np.ndarray:
    return np.array([SPLITS.index(name) for name in names], np.int8)


def splits_of_files(files: Sequence[str], root: str, url: str) -> list[str] | None:
    """Each file's split, from its path below ``root``; None when no file's path names a split, or only ``train``
    (there is nothing held out to keep).

    Raises:
        InvalidDataset: some files name a split and others none (which rows are which cannot be known).
    """
    base = root.rstrip("/")
    named = [split_of_path(posixpath.relpath(f, base) if f != base else posixpath.basename(f)) for f in files]
    if {split for split in named if split} in (set(), {"train"}):
        return None
    unnamed = [f for f, split in zip(files, named) if split is None]
    if unnamed:
        raise InvalidDataset(
            f"{unnamed[0]} is in none of the splits the other files of {url} name ({KNOWN_NAMES}, by folder or file "
            "name): move or rename it, or pass --splits resplit to ignore the given splits"
        )
    return [split for split in named if split]


def codes_of_column(column: pa.Array | pa.ChunkedArray, where: str) -> np.ndarray:
    """A ``split`` column's values as split codes.

    Raises:
        InvalidDataset: a value that names no split, a null, or a column that is not text.
    """
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        if pa.types.is_dictionary(column.type):
            column = column.cast(pa.string())
        else:
            raise InvalidDataset(
                f"the {SPLIT_COLUMN!r} column of {where} has type {column.type}: give it the split names "
                f"({KNOWN_NAMES}) as text, or pass --splits resplit to ignore it"
            )
    if column.null_count:
        raise InvalidDataset(
            f"the {SPLIT_COLUMN!r} column of {where} has {column.null_count} empty rows: give every row one of "
            f"{KNOWN_NAMES}, or pass --splits resplit to ignore it"
        )
    values = pc.unique(column).to_pylist()
    codes = {}
    for value in values:
        split = SPLIT_NAMES.get(str(value).strip().lower())
        if split is None:
            raise InvalidDataset(
                f"the {SPLIT_COLUMN!r} column of {where} holds {value!r}, which is none of {KNOWN_NAMES}: rename "
                "those rows' split, or pass --splits resplit to ignore the column"
            )
        codes[value] = SPLITS.index(split)
    positions = pc.index_in(column, value_set=pa.array(list(codes), column.type)).to_numpy(zero_copy_only=False)
    return np.array(list(codes.values()), np.int8)[positions]


def origin_of_files(files: Sequence[str], root: str, names: Sequence[str]) -> dict[str, str]:
    """Where each given split came from (its files below ``root``), for ``dataset.json`` and the run manifest."""
    origin = {}
    for split in SPLITS:
        mine = [posixpath.relpath(f, root.rstrip("/")) for f, name in zip(files, names) if name == split]
        if mine:
            shown = ", ".join(mine[:3]) + (f" and {len(mine) - 3} more" if len(mine) > 3 else "")
            origin[split] = f"{len(mine)} file{'s' if len(mine) > 1 else ''}: {shown}"
    return origin


def origin_of_column(codes: np.ndarray) -> dict[str, str]:
    return {
        split: f"rows whose {SPLIT_COLUMN!r} column names it" for i, split in enumerate(SPLITS) if (codes == i).any()
    }
