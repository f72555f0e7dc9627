"""Seeded, stratified draws of sample indices, shared by the splits, ``--sample-size`` and the calibration set."""

from __future__ import annotations

import math

import numpy as np

from ptqflow.storage.limits import check_label_range
from ptqflow.tasks.core.errors import InvalidDataset

MIN_PER_CLASS = 5  # a class with fewer cannot be spread over train, validation and test


def strata(labels: np.ndarray) -> np.ndarray:
    """What draws and splits are stratified by: each row's class; one stratum for regression targets and for
    unlabeled rows, whose draws are uniform."""
    return labels if labels.ndim == 1 else np.zeros(len(labels), np.int64)


def check_class_labels(labels: np.ndarray) -> None:
    """Refuse labels a stratified split cannot use: one class, negative or non-consecutive indices, rare classes.
    Regression targets and unlabeled rows have no classes to check."""
    if labels.ndim != 1:
        return
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise InvalidDataset("every sample has the same label: a classifier needs at least two classes")
    if classes.min() < 0:
        raise InvalidDataset("labels must be class indices 0..n-1: negative labels found; remap them")
    check_label_range("the data set", int(classes.max()))  # before anything is sized by the largest label
    absent = np.setdiff1d(np.arange(classes.max() + 1), classes)
    if len(absent):
        shown = ", ".join(str(int(c)) for c in absent[:5]) + (", ..." if len(absent) > 5 else "")
        raise InvalidDataset(
            f"labels must be class indices 0..n-1, but {len(absent)} of 0..{int(classes.max())} have no samples "
            f"({shown}): remap the labels to consecutive indices"
        )
    if counts.min() < MIN_PER_CLASS:
        raise InvalidDataset(
            f"class {int(classes[counts.argmin()])} has only {int(counts.min())} samples: stratified splits "
            f"need at least {MIN_PER_CLASS} per class; add samples or drop the class"
        )


def stratified_choice(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``size`` samples with each class represented in proportion (largest-remainder rounding).

    The result is sorted by a random permutation, so classes are interleaved."""
    labels = strata(labels)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (size / len(labels))
    take = np.floor(exact).astype(int)
    shortfall = size - take.sum()
    if shortfall:
        # Ties broken by the seeded generator, not by class order, so no class is always favoured.
        order = np.lexsort((rng.random(len(classes)), -(exact - take)))
        take[order[:shortfall]] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return rng.permutation(np.concatenate(chosen))


def draw_stratified(
    labels: np.ndarray,
    size: int,
    rng: np.random.Generator,
    *,
    what: str,
    where: str,
    option: str,
    min_per_class: int = 0,
) -> np.ndarray:
    """``stratified_choice``, refusing a draw larger than the pool or one that leaves a class fewer than
    ``min_per_class`` samples; each error names the ``option`` that fixes it.

    Raises:
        InvalidDataset: the pool is too small, or ``size`` too small to keep every class.
    """
    if size > len(labels):
        raise InvalidDataset(
            f"{what} of {size} samples asked for, but {where} has only {len(labels)}: pass {option} {len(labels)} "
            "or less"
        )
    chosen = stratified_choice(labels, size, rng)
    labels = strata(labels)
    if min_per_class:
        classes, counts = np.unique(labels, return_counts=True)
        drawn = np.bincount(np.searchsorted(classes, labels[chosen]), minlength=len(classes))
        if drawn.min() < min_per_class:
            rarest = int(counts.argmin())
            needed = math.ceil(min_per_class * len(labels) / counts[rarest])
            raise InvalidDataset(
                f"a {what} of {size} gives class {int(classes[drawn.argmin()])} {int(drawn.min())} samples, but the "
                f"splits need {min_per_class} per class: pass {option} {min(needed, len(labels))} or more"
            )
    return chosen
