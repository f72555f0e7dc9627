"""Stage 3, materialize_calibration_set: the representative data set, drawn from the training split (or from
another Parquet source with the data set's schema)."""

from __future__ import annotations

import numpy as np
from prefect import get_run_logger, task

from ptqflow.storage.store import ArtifactStore
from ptqflow.storage.tables import Columns, TensorTable, read_parquet, write_parquet_bytes
from ptqflow.tasks.artifacts import CalibrationSet, FeatureSpec, SampledDataset
from ptqflow.tasks.caching import StageCachePolicy
from ptqflow.tasks.datasets import Draw, load_dataset, peek_dataset
from ptqflow.tasks.errors import InvalidDataset, secrets_kept_out
from ptqflow.tasks.parameters import CalibrationParameters
from ptqflow.tasks.sample import refuse_non_finite
from ptqflow.tasks.stratify import draw_stratified


def calibration_seed(seed: int) -> tuple[int, int]:
    # A generator of its own (seed offset) so the draw does not depend on how many numbers the split consumed.
    return (seed, 3)


def draw_calibration_set(train: TensorTable, size: int, seed: int, where: str = "the training split") -> TensorTable:
    """Pure stage function: ``size`` samples of ``train``, stratified by label and seeded.

    Raises:
        InvalidDataset: ``train`` has fewer than ``size`` samples.
    """
    rng = np.random.default_rng(list(calibration_seed(seed)))
    chosen = draw_stratified(train.labels, size, rng, what="calibration set", where=where, option="--calibration-size")
    return train.take(chosen)


def check_matches_spec(table: TensorTable, spec: FeatureSpec, where: str) -> TensorTable:
    """Refuse calibration samples that the model could not take: another shape or another raw type."""
    if table.sample_shape != tuple(spec.shape) or table.features.dtype.name != spec.dtype:
        raise InvalidDataset(
            f"{where} has {table.features.dtype.name} samples of shape {list(table.sample_shape)}, but the data set's "
            f"are {spec.dtype} of shape {list(spec.shape)}: calibrate on samples of the data set's schema"
        )
    layout, expected = [(i.name, i.shape) for i in table.inputs], [(i.name, i.shape) for i in spec.inputs]
    if layout != expected:
        raise InvalidDataset(
            f"{where} feeds the inputs {layout or 'of a one-input model'}, but the data set's are "
            f"{expected or 'one'}: calibrate on samples of the data set's schema"
        )
    return table


@task(
    name="materialize_calibration_set",
    cache_policy=StageCachePolicy(module=__name__),
    persist_result=True,
    result_serializer="json",
)
@secrets_kept_out()
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
        check_matches_spec(peek_dataset(params.calibration_source, columns), dataset.spec, where)
        # Drawn while reading: a production sample of any size is never held whole.
        draw = Draw(
            params.calibration_size,
            calibration_seed(seed),
            role="the calibration source",
            what="calibration set",
            option="--calibration-size",
            outside_test_split=True,
        )
        calibration = check_matches_spec(load_dataset(params.calibration_source, columns, draw), dataset.spec, where)
        refuse_non_finite(calibration, where)
    else:
        with store.open(dataset.train) as f:
            calibration = draw_calibration_set(read_parquet(f), params.calibration_size, seed)
    ref = store.put_bytes(write_parquet_bytes(calibration), ".parquet")
    get_run_logger().info("calibration set: %d samples", len(calibration))
    return CalibrationSet(table=ref, samples=len(calibration))
