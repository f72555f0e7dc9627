from __future__ import annotations

import numpy as np
import pytest

from storage.tables import TensorTable
from tasks.calibrate import draw_calibration_set
from tasks.errors import InvalidDataset


@pytest.fixture
def train() -> TensorTable:
    labels = np.repeat(np.arange(4), [400, 200, 200, 200])
    return TensorTable(np.arange(len(labels), dtype=np.float32)[:, None], labels)


def test_draws_the_asked_size_stratified(train):
    calibration = draw_calibration_set(train, 200, seed=0)
    assert len(calibration) == 200
    np.testing.assert_array_equal(np.bincount(calibration.labels), [80, 40, 40, 40])
    assert len(np.unique(calibration.features)) == 200  # no sample twice


def test_is_seeded(train):
    a, b, c = (draw_calibration_set(train, 50, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.features, b.features)
    assert not np.array_equal(a.features, c.features)


def test_larger_than_the_training_split_says_how_to_fix(train):
    with pytest.raises(InvalidDataset, match="has only 1000: pass --calibration-size 1000 or less"):
        draw_calibration_set(train, 1001, seed=0)
