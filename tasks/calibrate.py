"""Stage 3, materialize_calibration_set: the representative data set, drawn from the training split."""

from __future__ import annotations

import numpy as np
from prefect import get_run_logger, task

from storage.store import ArtifactStore
from storage.tables import TensorTable, read_parquet, write_parquet_bytes
from tasks.artifacts import CalibrationSet, SampledDataset
from tasks.caching import StageCachePolicy
from tasks.errors import InvalidDataset
from tasks.parameters import CalibrationParameters
from tasks.sample import stratified_choice


def draw_calibration_set(train: TensorTable, size: int, seed: int) -> TensorTable:
    """Pure stage function: ``size`` training samples, stratified by label and seeded.

    Raises:
        InvalidDataset: the training split has fewer than ``size`` samples.
    """
    if size > len(train):
        raise InvalidDataset(
            f"calibration set of {size} samples asked for, but the training split has only {len(train)}: "
            f"pass --calibration-size {len(train)} or less"
        )
    # A generator of its own (seed offset) so the draw does not depend on how many numbers the split consumed.
    rng = np.random.default_rng([seed, 3])
    return train.take(stratified_choice(train.labels, size, rng))


@task(
    name="materialize_calibration_set",
    cache_policy=StageCachePolicy(module=__name__),
    persist_result=True,
    result_serializer="json",
)
def materialize_calibration_set(
    store_url: str, dataset: SampledDataset, params: CalibrationParameters, seed: int
) -> CalibrationSet:
    store = ArtifactStore(store_url)
    with store.open(dataset.train) as f:
        train = read_parquet(f)
    calibration = draw_calibration_set(train, params.calibration_size, seed)
    ref = store.put_bytes(write_parquet_bytes(calibration), ".parquet")
    get_run_logger().info("calibration set: %d samples", len(calibration))
    return CalibrationSet(table=ref, samples=len(calibration))
