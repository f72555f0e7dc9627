"""Stage 1, sample_dataset: seeded, stratified train / validation / test splits of the source, as Parquet."""

from __future__ import annotations

from datetime import datetime

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from storage.store import ArtifactStore
from storage.tables import Columns, TensorTable, write_parquet_bytes
from tasks.artifacts import FeatureSpec, SampledDataset
from tasks.caching import StageCachePolicy
from tasks.datasets import Draw, load_dataset, source_fingerprint
from tasks.errors import InvalidDataset
from tasks.parameters import SamplingParameters
from tasks.progress import report
from tasks.stratify import MIN_PER_CLASS, check_class_labels, stratified_choice

SPLITS = ("train", "validation", "test")


def stratified_split(
    labels: np.ndarray, validation_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Disjoint index sets for the three splits, each stratified by label and seeded."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    n_test = int(round(n * test_fraction))
    n_validation = int(round(n * validation_fraction))
    test = stratified_choice(labels, n_test, rng)
    rest = np.setdiff1d(np.arange(n), test)
    validation = rest[stratified_choice(labels[rest], n_validation, rng)]
    train = rng.permutation(np.setdiff1d(rest, validation))
    return {"train": train, "validation": validation, "test": test}


def check_dataset(table: TensorTable) -> None:
    """Refuse a data set that cannot be split and trained on, before any heavy work."""
    if len(table) == 0:
        raise InvalidDataset("the data set is empty: point --dataset at a table with samples")
    if table.features.dtype.kind == "f":
        bad = ~np.isfinite(table.features.reshape(len(table), -1)).all(axis=1)
        if bad.any():
            rows = ", ".join(str(i) for i in np.flatnonzero(bad)[:5])
            raise InvalidDataset(
                f"{int(bad.sum())} samples have NaN or Inf values (rows {rows}): clean the source"
            )
    check_class_labels(table.labels)


def feature_spec(table: TensorTable) -> FeatureSpec:
    n_classes = int(table.labels.max()) + 1
    lo, hi = table.metadata.get("value_range") or (float(table.features.min()), float(table.features.max()))
    names = table.metadata.get("class_names") or [str(i) for i in range(n_classes)]
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
    indices = stratified_split(table.labels, params.validation_fraction, params.test_fraction, seed)
    return {name: table.take(indices[name]) for name in SPLITS}


def columns_of(params: SamplingParameters) -> Columns:
    return Columns(features=params.feature_column, label=params.label_column, shape=params.input_shape)


@task(name="fingerprint_source", cache_policy=NO_CACHE, persist_result=False)
def fingerprint_source(source: str | None, since: datetime | None = None) -> str:
    """What a data source holds now (file listing with sizes and versions; with ``since``, only the files modified
    since): new data means a new sample."""
    return source_fingerprint(source, since) if source else ""


# The resolved URL and file window are left out of the key: the fingerprint of the files they select is in it, so a
# run on another day that selects the same files is a cache hit.
@task(name="sample_dataset", cache_policy=StageCachePolicy(module=__name__, exclude=("source_url", "since")),
      persist_result=True, result_serializer="json")
def sample_dataset(
    store_url: str, params: SamplingParameters, seed: int, source_fingerprint: str, source_url: str | None = None,
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
    manifest = store.put_json(
        {
            "kind": "ptqflow.dataset",
            "source": source,
            "files_modified_since": since.isoformat() if since else None,
            "sample_size": params.sample_size,
            "seed": seed,
            "spec": spec.model_dump(mode="json"),
            "splits": {name: {**refs[name].model_dump(), "samples": counts[name]} for name in SPLITS},
        }
    )
    get_run_logger().info("sampled %s: %s", source, counts)
    return SampledDataset(manifest=manifest, spec=spec, counts=counts, **refs)
