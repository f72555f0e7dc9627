"""The representative data set the calibration stage (``tasks.stages.calibrate``) stores: drawn from the training
split (or from another Parquet source with the data set's schema)."""

from __future__ import annotations

import numpy as np

from ptqflow.storage.tables import TensorTable
from ptqflow.tasks.core.artifacts import FeatureSpec
from ptqflow.tasks.core.errors import InvalidDataset
from ptqflow.tasks.data.stratify import draw_stratified


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
