"""Stage 3, calibrate: the representative dataset, drawn from the training split
(``tasks.data.calibration``) and written to the store as Parquet."""

from __future__ import annotations

from prefect import get_run_logger, task

from ptqflow.storage.store import ArtifactStore
from ptqflow.storage.tables import Columns, read_parquet, write_parquet_bytes
from ptqflow.tasks.core.artifacts import CalibrationSet, SampledDataset
from ptqflow.tasks.core.caching import StageCachePolicy
from ptqflow.tasks.core.errors import secrets_kept_out
from ptqflow.tasks.core.parameters import CalibrationParameters
from ptqflow.tasks.data.calibration import calibration_seed, check_matches_spec, draw_calibration_set
from ptqflow.tasks.data.datasets import Draw, load_dataset, peek_dataset
from ptqflow.tasks.data.sampling import refuse_non_finite


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
