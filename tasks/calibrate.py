"""Stage 3, materialize_calibration_set: the representative data set, drawn from the training split (or from
another Parquet source with the data set's schema)."""

from __future__ import annotations

import numpy as np
from prefect import get_run_logger, task

from storage.store import ArtifactStore
from storage.tables import Columns, TensorTable, read_parquet, write_parquet_bytes
from tasks.artifacts import CalibrationSet, FeatureSpec, SampledDataset
from tasks.caching import StageCachePolicy
from tasks.datasets import load_dataset
from tasks.errors import InvalidDataset
from tasks.parameters import CalibrationParameters
from tasks.sample import stratified_choice


def draw_calibration_set(train: TensorTable, size: int, seed: int, where: str = "the training split") -> TensorTable:
    """Pure stage function: ``size`` samples of ``train``, stratified by label and seeded.

    Raises:
        InvalidDataset: ``train`` has fewer than ``size`` samples.
    """
    if size > len(train):
        raise InvalidDataset(
            f"calibration set of {size} samples asked for, but {where} has only {len(train)}: "
            f"pass --calibration-size {len(train)} or less"
        )
    # A generator of its own (seed offset) so the draw does not depend on how many numbers the split consumed.
    rng = np.random.default_rng([seed, 3])
    return train.take(stratified_choice(train.labels, size, rng))


def check_matches_spec(table: TensorTable, spec: FeatureSpec, where: str) -> TensorTable:
    """Refuse calibration samples that the model could not take: another shape or another raw type."""
    if table.sample_shape != tuple(spec.shape) or table.features.dtype.name != spec.dtype:
        raise InvalidDataset(
            f"{where} has {table.features.dtype.name} samples of shape {list(table.sample_shape)}, but the data set's "
            f"are {spec.dtype} of shape {list(spec.shape)}: calibrate on samples of the data set's schema"
        )
    return table


@task(
    name="materialize_calibration_set",
    cache_policy=StageCachePolicy(module=__name__),
    persist_result=True,
    result_serializer="json",
)
def materialize_calibration_set(
    store_url: str,
    dataset: SampledDataset,
    params: CalibrationParameters,
    seed: int,
    columns: Columns = Columns(),
    source_fingerprint: str = "",
) -> CalibrationSet:
    """Draw the calibration set from the training split, or from ``params.calibration_source`` (read with the
    data set's ``columns``; ``source_fingerprint`` keys the cache to that source's current content)."""
    store = ArtifactStore(store_url)
    if params.calibration_source:
        where = f"the calibration source {params.calibration_source}"
        pool = check_matches_spec(load_dataset(params.calibration_source, columns), dataset.spec, where)
    else:
        where = "the training split"
        with store.open(dataset.train) as f:
            pool = read_parquet(f)
    calibration = draw_calibration_set(pool, params.calibration_size, seed, where)
    ref = store.put_bytes(write_parquet_bytes(calibration), ".parquet")
    get_run_logger().info("calibration set: %d samples", len(calibration))
    return CalibrationSet(table=ref, samples=len(calibration))
