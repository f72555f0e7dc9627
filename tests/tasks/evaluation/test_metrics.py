"""Figures summed batch by batch: counts exactly those of the whole split, float sums to its last bits."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.tasks.core.artifacts import ModelOutput
from ptqflow.tasks.core.parameters import ModelTask
from ptqflow.tasks.evaluation.metrics import (
    DENSE_CONFUSION_CLASSES,
    ModelSums,
    TaskSums,
    model_metrics,
    task_figures,
)

PARTS = [0, 1, 37, 38, 250, 611, 1000]  # uneven batches, an empty one among them


def _batches(*arrays: np.ndarray):
    for start, stop in zip(PARTS[:-1], PARTS[1:]):
        yield tuple(a[start:stop] for a in arrays)


def _close(summed: dict, whole: dict) -> None:
    """Equal but for float sums, which may differ in their last bits (rounded figures by one step at most)."""
    assert summed.keys() == whole.keys()
    for key, value in whole.items():
        if isinstance(value, dict):
            _close(summed[key], value)
        elif isinstance(value, float):
            assert summed[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
        else:
            assert summed[key] == value, key


@pytest.mark.parametrize("n_classes", [4, DENSE_CONFUSION_CLASSES + 20])
def test_class_figures_summed_in_batches_are_the_whole_splits(n_classes):
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(1000, n_classes)).astype(np.float32)
    outputs = (reference + rng.normal(scale=0.5, size=reference.shape)).astype(np.float32)
    labels = rng.integers(0, n_classes - 1, 1000)  # the last class has no row
    names = [f"c{i}" for i in range(n_classes)]
    whole = model_metrics(outputs, reference, labels, names).model_dump()
    sums = ModelSums()
    for part in _batches(outputs, reference, labels):
        sums.add(*part)
    summed = sums.metrics(names).model_dump()
    for exact in ("accuracy", "per_class_accuracy", "confusion_matrix", "most_confused", "agreement_with_float"):
        assert summed[exact] == whole[exact], exact
    assert summed["per_class_accuracy"][names[-1]] is None
    assert (len(whole["most_confused"]) > 0) == (n_classes > DENSE_CONFUSION_CLASSES)
    _close(summed, whole)


def test_regression_and_several_outputs_summed_in_batches_are_the_whole_splits():
    rng = np.random.default_rng(1)
    layout = (
        ModelOutput(name="scores", shape=(3,), class_scores=True),
        ModelOutput(name="box", shape=(2,), class_scores=False),
    )
    reference = rng.normal(size=(1000, 5)).astype(np.float32)
    outputs = (reference + rng.normal(scale=0.1, size=reference.shape)).astype(np.float32)
    targets = rng.normal(size=(1000, 5)).astype(np.float32)
    whole = model_metrics(outputs, reference, targets, [], layout=layout).model_dump()
    sums = ModelSums(layout)
    for part in _batches(outputs, reference, targets):
        sums.add(*part)
    _close(sums.metrics([]).model_dump(), whole)
    assert whole["outputs"]["scores"]["agreement"] is not None and whole["outputs"]["box"]["agreement"] is None

    for task, labels in (
        (ModelTask.classification, rng.integers(0, 5, 1000)),
        (ModelTask.regression, targets),
        (ModelTask.unlabeled, np.zeros((1000, 0), np.float32)),
    ):
        expected = task_figures(task, reference, outputs, labels, layout)
        task_sums = TaskSums(task, layout)
        for ref, out, lab in _batches(reference, outputs, labels):
            task_sums.add(ref, out, lab)
        figures = task_sums.figures()
        assert task_sums.rows == 1000
        for name in ("float_accuracy", "quantized_accuracy", "agreement"):
            assert getattr(figures, name) == getattr(expected, name), (task, name)
        for name in ("float_mae", "quantized_mae", "sqnr_db"):
            value = getattr(expected, name)
            assert getattr(figures, name) == (value if value is None else pytest.approx(value, rel=1e-9)), (task, name)
        assert figures.outputs.keys() == expected.outputs.keys()


def test_identical_outputs_have_no_sqnr_in_batches_or_whole():
    reference = np.arange(12, dtype=np.float32).reshape(6, 2)
    sums = ModelSums()
    sums.add(reference[:4], reference[:4], np.zeros(4, np.int64))
    sums.add(reference[4:], reference[4:], np.ones(2, np.int64))
    metrics = sums.metrics(["a", "b"])
    assert metrics.output_sqnr_db is None and metrics.output_mae == 0.0 and metrics.agreement_with_float == 1.0
    assert metrics.confusion_matrix == [[0, 4], [0, 2]]
