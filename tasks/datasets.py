"""Built-in data sets, loaded as tensor tables of raw values (no scaling: the model scales its own input)."""

from __future__ import annotations

import numpy as np

from storage.tables import TensorTable
from tasks.errors import InvalidDataset


def _load_digits() -> TensorTable:
    # scikit-learn ships this set inside the wheel: no download, so it is the offline default.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    features = bunch.images.astype(np.uint8)[..., np.newaxis]  # raw 0..16 intensities, 8x8x1
    labels = bunch.target.astype(np.int64)
    return TensorTable(
        features,
        labels,
        {
            "source": "digits",
            "value_range": [0.0, 16.0],
            "class_names": [str(name) for name in bunch.target_names],
        },
    )


BUILTIN_DATASETS = {"digits": _load_digits}


def load_dataset(name: str) -> TensorTable:
    """Load a built-in data set by name.

    Raises:
        InvalidDataset: the name is not a built-in data set.
    """
    try:
        loader = BUILTIN_DATASETS[name]
    except KeyError:
        raise InvalidDataset(
            f"unknown data set {name!r}: choose one of {', '.join(sorted(BUILTIN_DATASETS))}"
        ) from None
    return loader()
