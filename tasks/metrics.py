"""Figures of a model's outputs against labels and against the float model's outputs: pure numpy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ptqflow.tasks.validation_report import ModelMetrics, Speed


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float((probabilities.argmax(axis=1) == labels).mean())


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    return np.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def sqnr_db(reference: np.ndarray, output: np.ndarray) -> float | None:
    """Signal-to-quantization-noise ratio of ``output`` against ``reference``; None when they are identical."""
    noise = float(np.sum((output.astype(np.float64) - reference) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return None if noise == 0 else round(10 * np.log10(signal / noise), 4)


def model_metrics(
    outputs: np.ndarray,
    reference: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    model_bytes: int | None = None,
    speed: Speed | None = None,
) -> ModelMetrics:
    """Accuracy, per-class accuracy, confusion matrix, and agreement and output error against the float model."""
    predicted = outputs.argmax(axis=1)
    matrix = confusion_matrix(predicted, labels, len(class_names))
    per_class = {
        name: (round(float(matrix[i, i] / matrix[i].sum()), 6) if matrix[i].sum() else None)
        for i, name in enumerate(class_names)
    }
    return ModelMetrics(
        accuracy=accuracy(outputs, labels),
        per_class_accuracy=per_class,
        confusion_matrix=matrix.tolist(),
        agreement_with_float=float((predicted == reference.argmax(axis=1)).mean()),
        output_mae=round(float(np.mean(np.abs(outputs - reference))), 9),
        output_sqnr_db=sqnr_db(reference, outputs),
        bytes=model_bytes,
        speed=speed,
    )
