"""Figures of a model's outputs against labels and against the float model's outputs: pure numpy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ptqflow.tasks.validation_report import ModelMetrics, Speed


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose top-1 class is the label: for softmax, logits and sigmoid scores alike."""
    return float((probabilities.argmax(axis=1) == labels).mean())


def mean_absolute_error(outputs: np.ndarray, targets: np.ndarray) -> float:
    return round(float(np.mean(np.abs(outputs.astype(np.float64) - targets))), 9)


def root_mean_squared_error(outputs: np.ndarray, targets: np.ndarray) -> float:
    return round(float(np.sqrt(np.mean((outputs.astype(np.float64) - targets) ** 2))), 9)


def increase_pct(reference: float, value: float) -> float:
    """How much larger ``value`` is than ``reference``, in percent of it (an error that was 0 and grew: inf)."""
    if reference == 0:
        return 0.0 if value == 0 else float("inf")
    return round((value - reference) / reference * 100, 6)


def class_scores(outputs: np.ndarray, labels: np.ndarray) -> bool:
    """Whether the outputs are class scores whose top-1 can agree or not: class labels, or (unlabeled) more than
    one value per sample."""
    return labels.ndim == 1 or (labels.shape[1] == 0 and outputs.ndim == 2 and outputs.shape[1] > 1)


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
    """Against the labels: accuracy, per-class accuracy and confusion matrix for class labels, MAE and RMSE for
    regression targets, nothing for unlabeled rows. Against the float model: agreement (class scores), output
    error and SQNR."""
    against_float = {
        "agreement_with_float": float((outputs.argmax(axis=1) == reference.argmax(axis=1)).mean())
        if class_scores(outputs, labels)
        else None,
        "output_mae": mean_absolute_error(outputs, reference),
        "output_max_abs_error": round(float(np.max(np.abs(outputs.astype(np.float64) - reference))), 9)
        if outputs.size
        else 0.0,
        "output_sqnr_db": sqnr_db(reference, outputs),
        "bytes": model_bytes,
        "speed": speed,
    }
    if labels.ndim == 2:
        if not labels.shape[1]:
            return ModelMetrics(accuracy=None, **against_float)
        return ModelMetrics(
            accuracy=None,
            mae=mean_absolute_error(outputs, labels),
            rmse=root_mean_squared_error(outputs, labels),
            **against_float,
        )
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
        **against_float,
    )
