"""Stage 1, sample_dataset: train / validation / test splits of the source, as Parquet. A row's split is a seeded
hash of its content, so it stays in its split however the data grows (see ``hash_split``)."""

from __future__ import annotations

import hashlib
from datetime import datetime

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ptqflow.storage.store import ArtifactStore
from ptqflow.storage.tables import Columns, TensorTable, write_parquet_bytes
from ptqflow.tasks.artifacts import FeatureSpec, SampledDataset, SplitRule
from ptqflow.tasks.caching import StageCachePolicy
from ptqflow.tasks.datasets import Draw, load_dataset, source_fingerprint
from ptqflow.tasks.errors import InvalidDataset
from ptqflow.tasks.parameters import SamplingParameters
from ptqflow.tasks.progress import report
from ptqflow.tasks.stratify import MIN_PER_CLASS, check_class_labels

SPLITS = ("train", "validation", "test")


# How rows are assigned to splits; recorded in dataset.json so that a later run can tell which of its rows an
# exported model trained on. Changing the rule means a new name here.
SPLIT_SCHEME = "sha256-row-v1"


def split_positions(features: np.ndarray, seed: int) -> np.ndarray:
    """Each row's place in [0, 1): the first 8 bytes of sha256(scheme, seed, dtype, row bytes). It depends on the
    row's own content only, so it never changes when rows are added, removed or reordered, and identical rows
    share it."""
    rows = np.ascontiguousarray(features).reshape(len(features), -1)
    salt = f"ptqflow:{SPLIT_SCHEME}:{seed}:{rows.dtype.str}:".encode()
    places = np.fromiter(
        (int.from_bytes(hashlib.sha256(salt + row.tobytes()).digest()[:8], "big") for row in rows),
        dtype=np.float64,
        count=len(rows),
    )
    return places / 2.0**64


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
    if table.features.dtype.kind == "f":
        bad = ~np.isfinite(table.features.reshape(len(table), -1)).all(axis=1)
        if bad.any():
            rows = ", ".join(str(i) for i in np.flatnonzero(bad)[:5])
            raise InvalidDataset(
                f"{int(bad.sum())} samples of {where} have NaN or Inf values (rows {rows}): clean the source"
            )


def feature_spec(table: TensorTable) -> FeatureSpec:
    n_classes = int(table.labels.max()) + 1
    lo, hi = value_range(table)
    # Declared names (a Hugging Face ClassLabel may name classes this sample lacks) are kept for the labels seen.
    declared = list(table.metadata.get("class_names") or [])[:n_classes]
    names = declared + [str(i) for i in range(len(declared), n_classes)]
    return FeatureSpec(
        shape=table.sample_shape,
        dtype=table.features.dtype.name,
        value_range=(float(lo), float(hi)),
        n_classes=n_classes,
        class_names=tuple(names),
    )


def split_dataset(table: TensorTable, params: SamplingParameters, seed: int) -> dict[str, TensorTable]:
    """Pure stage function: the three stratified splits of ``table``."""
    check_dataset(table)
    indices = hash_split(table.features, table.labels, params.validation_fraction, params.test_fraction, seed)
    return {name: table.take(indices[name]) for name in SPLITS}


def columns_of(params: SamplingParameters) -> Columns:
    return Columns(
        features=params.feature_column,
        label=params.label_column,
        shape=params.input_shape,
        wide=tuple(c.strip() for c in params.feature_columns.split(",") if c.strip())
        if params.feature_columns
        else None,
        image_size=params.image_size,
        color_mode=params.color_mode.value if params.color_mode else None,
    )


@task(name="fingerprint_source", cache_policy=NO_CACHE, persist_result=False)
def fingerprint_source(source: str | None, since: datetime | None = None) -> str:
    """What a data source holds now (file listing with sizes and versions; with ``since``, only the files modified
    since): new data means a new sample."""
    return source_fingerprint(source, since) if source else ""


# The resolved URL and file window are left out of the key: the fingerprint of the files they select is in it, so a
# run on another day that selects the same files is a cache hit.
@task(
    name="sample_dataset",
    cache_policy=StageCachePolicy(module=__name__, exclude=("source_url", "since")),
    persist_result=True,
    result_serializer="json",
)
def sample_dataset(
    store_url: str,
    params: SamplingParameters,
    seed: int,
    source_fingerprint: str,
    source_url: str | None = None,
    since: datetime | None = None,
) -> SampledDataset:
    """Load the source (``source_url``: ``params.dataset`` with its date template filled in; ``since``: only files
    modified since), split it, and write each split as a Parquet tensor table.

    ``source_fingerprint`` is not read here: it is in the signature so that the cache key changes with the
    source's content, not only with its URL."""
    store = ArtifactStore(store_url)
    source = source_url or params.dataset
    report("sample_dataset", f"loading {source}")
    draw = None
    if params.sample_size is not None:
        report("sample_dataset", f"drawing {params.sample_size} samples from {source}")
        draw = Draw(params.sample_size, (seed, 1), min_per_class=MIN_PER_CLASS)
    table = load_dataset(source, columns_of(params), draw, since)
    splits = split_dataset(table, params, seed)
    spec = feature_spec(table)
    refs = {}
    for name, split in splits.items():
        report("sample_dataset", f"writing {name} split ({len(split)} samples)")
        refs[name] = store.put_bytes(write_parquet_bytes(split), ".parquet")
    counts = {name: len(split) for name, split in splits.items()}
    rule = SplitRule(
        scheme=SPLIT_SCHEME,
        seed=seed,
        validation_fraction=params.validation_fraction,
        test_fraction=params.test_fraction,
    )
    manifest = store.put_json(
        {
            "kind": "ptqflow.dataset",
            "source": source,
            "files_modified_since": since.isoformat() if since else None,
            "sample_size": params.sample_size,
            "seed": seed,
            "split": rule.model_dump(),
            "spec": spec.model_dump(mode="json"),
            "splits": {name: {**refs[name].model_dump(), "samples": counts[name]} for name in SPLITS},
        }
    )
    get_run_logger().info("sampled %s: %s", source, counts)
    return SampledDataset(manifest=manifest, spec=spec, counts=counts, split=rule, **refs)
