"""How the sampling stage (``tasks.stages.sample``) splits a source into train / validation / test. A source that
gives its own splits (``tasks.data.splits``) is split as given (``given_split``); otherwise a row's split is a seeded
hash of its content, so it stays in its split however the data grows (``hash_split``)."""

from __future__ import annotations

import hashlib
import unicodedata
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ptqflow.storage.tables import Columns, TensorTable
from ptqflow.tasks.core.artifacts import FeatureSpec, SplitRule
from ptqflow.tasks.core.errors import InvalidDataset
from ptqflow.tasks.core.parameters import ModelTask, SamplingParameters, SplitMode
from ptqflow.tasks.data.datasets import SPLIT_ORIGIN
from ptqflow.tasks.data.splits import SPLIT_COLUMN, SPLITS
from ptqflow.tasks.data.stratify import check_class_labels, strata

# How rows are assigned to splits; recorded in dataset.json so that a later run can tell which of its rows an
# exported model trained on. Changing the rule means a new name here.
SPLIT_SCHEME = "sha256-row-v1"
# The source's own splits, with a split it lacks carved from its train rows by SPLIT_SCHEME's positions. No rule can
# replay an owner's split, so such a run stores its train and validation rows' digests (``row_digests``).
GIVEN_SCHEME = "given+sha256-row-v1"
SEEN_ROWS_COLUMN = "row_digest"


def _row_hashes(features: np.ndarray, salt: str, rows: np.ndarray | None = None) -> np.ndarray:
    """The first 8 bytes of sha256(salt, dtype, row bytes) of each row (of ``rows`` only, read in place), as
    uint64."""
    flat = np.ascontiguousarray(features).reshape(len(features), -1)
    chosen = range(len(flat)) if rows is None else rows
    prefix = f"{salt}:{flat.dtype.str}:".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.sha256(prefix + flat[i].tobytes()).digest()[:8], "big") for i in chosen),
        dtype=np.uint64,
        count=len(chosen),
    )


def split_positions(features: np.ndarray, seed: int) -> np.ndarray:
    """Each row's place in [0, 1): the first 8 bytes of sha256(scheme, seed, dtype, row bytes). It depends on the
    row's own content only, so it never changes when rows are added, removed or reordered, and identical rows
    share it."""
    # uint64 to float64 rounds to nearest, as Python's int to float does: the places are those of SPLIT_SCHEME.
    return _row_hashes(features, f"ptqflow:{SPLIT_SCHEME}:{seed}") / 2.0**64


def row_digests(features: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Each row's identity (of ``rows`` only, when given; read in place, not copied), whatever split rule or seed
    placed it: the first 8 bytes of sha256(dtype, row bytes), as uint64 (two distinct rows share one with
    probability about n^2 / 2^65)."""
    return _row_hashes(features, "ptqflow:row-v1", rows)


def seen_rows_bytes(features: np.ndarray, rows: np.ndarray | None = None) -> bytes:
    """The sorted, distinct digests of the rows a model trained or validated on (``rows`` of ``features``), as a
    one-column Parquet file."""
    digests = np.unique(row_digests(features, rows))
    table = pa.table({SEEN_ROWS_COLUMN: pa.array(digests, pa.uint64())})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def read_seen_rows(data: bytes) -> np.ndarray:
    """The digests ``seen_rows_bytes`` wrote."""
    table = pq.read_table(pa.BufferReader(data), columns=[SEEN_ROWS_COLUMN])
    return table.column(0).to_numpy().astype(np.uint64, copy=False)


def given_split(
    features: np.ndarray,
    labels: np.ndarray,
    given: np.ndarray,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """Index sets for the three splits as the source gives them (``given``: each row's split code); a validation
    or test split it lacks is carved from its train rows by the same content positions as ``hash_split``. Each
    split's rows come in the seeded order of their positions, so classes are interleaved.

    Raises:
        InvalidDataset: no train split, a class with no train rows, or a carved split left empty.
    """
    places = split_positions(features, seed)
    rows = {name: np.flatnonzero(given == code) for code, name in enumerate(SPLITS)}
    if not len(rows["train"]):
        held = " and ".join(name for name in SPLITS if len(rows[name]))
        raise InvalidDataset(
            f"the source gives its {held} split but no train split: add the training rows (a train/ folder, "
            "train-*.parquet files or split = 'train'), or pass --splits resplit"
        )
    train = rows["train"]
    position = places[train]
    carve_test = 0.0 if len(rows["test"]) else test_fraction
    carve_validation = 0.0 if len(rows["validation"]) else validation_fraction
    splits = {
        "train": train[position >= carve_test + carve_validation],
        "validation": rows["validation"]
        if len(rows["validation"])
        else train[(position >= carve_test) & (position < carve_test + carve_validation)],
        "test": rows["test"] if len(rows["test"]) else train[position < carve_test],
    }
    for name in ("validation", "test"):
        if not len(splits[name]):
            raise InvalidDataset(
                f"the {name} split carved from the given train split ({len(train)} rows) is empty: add rows, give "
                f"a {name} split, or pass --splits resplit"
            )
    labels = strata(labels)
    missing = np.setdiff1d(np.unique(labels), labels[splits["train"]])
    if len(missing):
        cls = int(missing[0])
        raise InvalidDataset(
            f"class {cls} has {int((labels == cls).sum())} samples but none in the train split (the source's own "
            "splits are used): add training samples of that class, or pass --splits resplit"
        )
    return {name: indices[np.argsort(places[indices], kind="stable")] for name, indices in splits.items()}


def hash_split(
    features: np.ndarray, labels: np.ndarray, validation_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Disjoint index sets for the three splits: a row is in test when its place (``split_positions``) is below
    ``test_fraction``, in validation when below ``test_fraction + validation_fraction``, else in train. Each class
    gets the same thresholds, so every split holds each class in proportion, up to sampling noise (about
    sqrt(n p (1 - p)) rows for a class of n rows and a split's share p): exact proportions would move old rows
    between splits whenever rows are added.

    Raises:
        InvalidDataset: a class has no row in one of the splits.
    """
    places = split_positions(features, seed)
    order = np.argsort(places, kind="stable")  # a seeded order that interleaves the classes
    bounds = {
        "test": (0.0, test_fraction),
        "validation": (test_fraction, test_fraction + validation_fraction),
        "train": (test_fraction + validation_fraction, 1.0),
    }
    splits = {name: order[(places[order] >= low) & (places[order] < high)] for name, (low, high) in bounds.items()}
    labels = strata(labels)
    for name, indices in splits.items():
        missing = np.setdiff1d(np.unique(labels), labels[indices])
        if len(missing):
            cls = int(missing[0])
            raise InvalidDataset(
                f"class {cls} has {int((labels == cls).sum())} samples and none fell in the {name} split (each "
                "sample's split comes from a hash of its content): add samples of that class, or pass another --seed"
            )
    return {"train": splits["train"], "validation": splits["validation"], "test": splits["test"]}


def check_dataset(table: TensorTable) -> None:
    """Refuse a data set that cannot be split and trained on, before any heavy work."""
    if len(table) == 0:
        raise InvalidDataset("the data set is empty: point --dataset at a table with samples")
    refuse_non_finite(table, "the data set")
    check_class_labels(table.labels)
    value_range(table)


def value_range(table: TensorTable) -> tuple[float, float]:
    """The raw values' range, from the table's metadata or its data; refused when it is a single value (the model
    scales inputs by it, and there is nothing to learn)."""
    lo, hi = table.metadata.get("value_range") or (float(table.features.min()), float(table.features.max()))
    if not hi > lo:
        raise InvalidDataset(
            f"every value of every sample is {lo:g} (value range [{lo:g}, {hi:g}]): there is nothing to learn; "
            "check --feature-column and the source"
        )
    return float(lo), float(hi)


def refuse_non_finite(table: TensorTable, where: str) -> None:
    """Raise InvalidDataset naming the first rows when any sample holds NaN or Inf."""
    if table.labels.dtype.kind == "f" and table.labels.size:
        bad = ~np.isfinite(table.labels).all(axis=1)
        if bad.any():
            rows = ", ".join(str(i) for i in np.flatnonzero(bad)[:5])
            raise InvalidDataset(
                f"{int(bad.sum())} targets of {where} are NaN or Inf (rows {rows}): drop those rows from the source"
            )
    if table.features.dtype.kind == "f":
        bad = ~np.isfinite(table.features.reshape(len(table), -1)).all(axis=1)
        if bad.any():
            rows = ", ".join(str(i) for i in np.flatnonzero(bad)[:5])
            raise InvalidDataset(
                f"{int(bad.sum())} samples of {where} have NaN or Inf values (rows {rows}): clean the source"
            )


MAX_CLASS_NAME_CHARS = 200


def check_class_names(names: list[Any]) -> None:
    """Refuse class names a report cannot show as they are, here rather than after training: each a string of
    printable characters (no control character, none a line break), at most MAX_CLASS_NAME_CHARS long, no two
    alike. (Other text is shown as it is: plots render names as plain text, never as math.)"""
    for position, name in enumerate(names):
        problem = (
            "is not a string"
            if not isinstance(name, str)
            else "is empty"
            if not name.strip()
            else f"is longer than {MAX_CLASS_NAME_CHARS} characters"
            if len(name) > MAX_CLASS_NAME_CHARS
            else "holds a control character"
            if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name)
            else None
        )
        if problem:
            raise InvalidDataset(
                f"class {position}'s name {str(name)[:60]!r} {problem}: rename it in the source (folder names, the "
                "table's class_names or ClassLabel names)"
            )
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise InvalidDataset(
            f"class name {repeated[0]!r} names several classes (the report keys figures by name): give each class "
            "its own name"
        )


def feature_spec(table: TensorTable, task: ModelTask = ModelTask.classification) -> FeatureSpec:
    lo, hi = value_range(table)
    if task is not ModelTask.classification:
        return FeatureSpec(
            shape=table.sample_shape,
            dtype=table.features.dtype.name,
            value_range=(float(lo), float(hi)),
            n_classes=0,
            class_names=(),
            task=task,
            n_targets=int(table.labels.shape[1]) if task is ModelTask.regression else 0,
            inputs=table.inputs,
        )
    n_classes = int(table.labels.max()) + 1
    # Declared names (a Hugging Face ClassLabel may name classes this sample lacks) are kept for the labels seen.
    declared = list(table.metadata.get("class_names") or [])[:n_classes]
    names = declared + [str(i) for i in range(len(declared), n_classes)]
    check_class_names(names)
    return FeatureSpec(
        shape=table.sample_shape,
        dtype=table.features.dtype.name,
        value_range=(float(lo), float(hi)),
        n_classes=n_classes,
        class_names=tuple(names),
        inputs=table.inputs,
    )


def split_rows(table: TensorTable, params: SamplingParameters, seed: int) -> tuple[dict[str, np.ndarray], SplitRule]:
    """Pure stage function: the row indices of the three splits of ``table``, and the rule that chose them (the
    source's own splits with ``--splits auto`` when it gives them, else stratified by content hash)."""
    check_dataset(table)
    fractions = {"validation_fraction": params.validation_fraction, "test_fraction": params.test_fraction}
    if table.splits is not None and params.splits is SplitMode.auto:
        indices = given_split(table.features, table.labels, table.splits, seed=seed, **fractions)
        origin = dict(table.metadata.get(SPLIT_ORIGIN) or {})
        for name in SPLITS:
            origin.setdefault(name, f"carved from the given train split by {SPLIT_SCHEME}")
        return indices, SplitRule(scheme=GIVEN_SCHEME, seed=seed, given=origin, **fractions)
    indices = hash_split(table.features, table.labels, seed=seed, **fractions)
    return indices, SplitRule(scheme=SPLIT_SCHEME, seed=seed, **fractions)


def split_dataset(table: TensorTable, params: SamplingParameters, seed: int) -> dict[str, TensorTable]:
    """The three splits of ``table`` (``split_rows``), as tables."""
    indices, _ = split_rows(table, params, seed)
    return {name: table.take(indices[name]) for name in SPLITS}


def columns_of(params: SamplingParameters) -> Columns:
    inputs = tuple(c.strip() for c in params.feature_column.split(",") if c.strip())
    return Columns(
        features=inputs[0] if len(inputs) == 1 else params.feature_column,
        inputs=inputs if len(inputs) > 1 else None,
        label=params.label_column,
        shape=params.input_shape,
        wide=tuple(c.strip() for c in params.feature_columns.split(",") if c.strip())
        if params.feature_columns
        else None,
        image_size=params.image_size,
        color_mode=params.color_mode.value if params.color_mode else None,
        split=SPLIT_COLUMN if params.splits is SplitMode.auto else None,
        targets=params.task.targets,
    )
