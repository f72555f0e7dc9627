"""Stage 1, sample: the source's train / validation / test splits, written to the store as Parquet (the
splitting itself is ``tasks.data.sampling``)."""

from __future__ import annotations

from datetime import datetime

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ptqflow.storage.store import ArtifactStore
from ptqflow.storage.tables import write_parquet_rows
from ptqflow.tasks.core.artifacts import SampledDataset
from ptqflow.tasks.core.caching import StageCachePolicy
from ptqflow.tasks.core.errors import secrets_kept_out
from ptqflow.tasks.core.parameters import SamplingParameters
from ptqflow.tasks.core.progress import report
from ptqflow.tasks.data.datasets import Draw, load_dataset, source_fingerprint
from ptqflow.tasks.data.sampling import GIVEN_SCHEME, columns_of, feature_spec, seen_rows_bytes, split_rows
from ptqflow.tasks.data.splits import SPLITS
from ptqflow.tasks.data.stratify import MIN_PER_CLASS


@task(name="fingerprint_source", cache_policy=NO_CACHE, persist_result=False)
@secrets_kept_out()
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
@secrets_kept_out()
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
    indices, rule = split_rows(table, params, seed)
    spec = feature_spec(table, params.task)
    refs, counts = {}, {}
    for name in SPLITS:
        # One split at a time, its rows gathered a row group at a time: holding all three splits beside the source
        # made this stage the peak of a large run.
        counts[name] = len(indices[name])
        report("sample_dataset", f"writing {name} split ({counts[name]} samples)")
        refs[name] = store.put_bytes(write_parquet_rows(table, indices[name]), ".parquet")
    seen_rows = None
    if rule.scheme == GIVEN_SCHEME:
        seen = np.concatenate([indices["train"], indices["validation"]])
        seen_rows = store.put_bytes(seen_rows_bytes(table.features, seen), ".parquet")
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
            "seen_rows": seen_rows.model_dump() if seen_rows else None,
        }
    )
    get_run_logger().info("sampled %s (%s): %s", source, rule.scheme, counts)
    return SampledDataset(manifest=manifest, spec=spec, counts=counts, split=rule, seen_rows=seen_rows, **refs)
