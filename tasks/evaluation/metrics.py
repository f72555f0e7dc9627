"""Figures of a model's outputs against labels and against the float model's outputs: pure numpy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ptqflow.tasks.core.artifacts import ModelOutput, OutputFigures
from ptqflow.tasks.core.parameters import ModelTask
from ptqflow.tasks.core.validation_report import Confusion, ModelMetrics, Speed
from ptqflow.tasks.evaluation.fidelity import TaskFigures
from ptqflow.tasks.models.outputs import split_outputs


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


def output_metrics(
    outputs: np.ndarray, reference: np.ndarray, layout: tuple[ModelOutput, ...] = ()
) -> dict[str, OutputFigures]:
    """Each output (``tasks.models.outputs``) against the float model's: SQNR, MAE, largest error, and top-1 agreement
    for class scores. Without a layout (records from before outputs were recorded): one output, class scores when
    it has more than one value per sample."""
    if not layout:
        width = int(np.prod(outputs.shape[1:])) if outputs.ndim > 1 else 1
        layout = (ModelOutput(name="output", shape=tuple(outputs.shape[1:]), class_scores=width > 1),)
    ours, theirs = split_outputs(outputs, layout), split_outputs(reference, layout)
    figures = {}
    for output in layout:
        mine, float_ = ours[output.name], theirs[output.name]
        figures[output.name] = OutputFigures(
            sqnr_db=sqnr_db(float_, mine),
            mae=mean_absolute_error(mine, float_),
            max_abs_error=round(float(np.max(np.abs(mine.astype(np.float64) - float_))), 9) if mine.size else 0.0,
            agreement=float((mine.argmax(axis=1) == float_.argmax(axis=1)).mean())
            if output.class_scores and mine.shape[1] > 1
            else None,
        )
    return figures


def task_figures(
    task: ModelTask,
    reference: np.ndarray,
    outputs: np.ndarray,
    labels: np.ndarray,
    layout: tuple[ModelOutput, ...] = (),
) -> TaskFigures:
    """What the task's gate judges of ``outputs`` against the float model's ``reference`` (and the labels):
    accuracy and its drop, MAE and its rise, or SQNR and agreement of the worst output."""
    if task is ModelTask.classification:
        float_accuracy, quantized = accuracy(reference, labels), accuracy(outputs, labels)
        return TaskFigures(
            task=task,
            float_accuracy=float_accuracy,
            quantized_accuracy=quantized,
            accuracy_drop_pp=round((float_accuracy - quantized) * 100, 6),
            agreement=float((outputs.argmax(axis=1) == reference.argmax(axis=1)).mean()),
        )
    if task is ModelTask.regression:
        float_mae, quantized_mae = mean_absolute_error(reference, labels), mean_absolute_error(outputs, labels)
        return TaskFigures(
            task=task,
            float_mae=float_mae,
            quantized_mae=quantized_mae,
            mae_increase_pct=increase_pct(float_mae, quantized_mae),
            sqnr_db=sqnr_db(reference, outputs),
        )
    per_output = output_metrics(outputs, reference, layout)
    return TaskFigures(
        task=task, sqnr_db=worst_sqnr(per_output), agreement=worst_agreement(per_output), outputs=per_output
    )


def worst_sqnr(outputs: dict[str, OutputFigures]) -> float | None:
    """The lowest SQNR of the outputs (None, meaning identical, only when every output is identical)."""
    measured = [o.sqnr_db for o in outputs.values() if o.sqnr_db is not None]
    return min(measured) if measured else None


def worst_agreement(outputs: dict[str, OutputFigures]) -> float | None:
    measured = [o.agreement for o in outputs.values() if o.agreement is not None]
    return min(measured) if measured else None


# Up to this many classes a report holds the whole confusion matrix (n x n counts); above, its size would grow
# with the square of the classes (100,000 classes: 75 GiB), so it holds the most confused pairs instead.
DENSE_CONFUSION_CLASSES = 100
MOST_CONFUSED_PAIRS = 50


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    return np.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def most_confused(
    predicted: np.ndarray, labels: np.ndarray, class_names: Sequence[str], limit: int = MOST_CONFUSED_PAIRS
) -> list[Confusion]:
    """The most frequent mistakes, most frequent first (ties by true, then predicted class): memory in the number of
    rows, whatever the number of classes."""
    wrong = predicted != labels
    pairs, counts = np.unique(np.stack([labels[wrong], predicted[wrong]], axis=1), axis=0, return_counts=True)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -counts))[:limit]
    return [
        Confusion(true=class_names[int(pairs[i, 0])], predicted=class_names[int(pairs[i, 1])], count=int(counts[i]))
        for i in order
    ]


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
    layout: tuple[ModelOutput, ...] = (),
) -> ModelMetrics:
    """Against the labels: accuracy, per-class accuracy and confusion matrix for class labels, MAE and RMSE for
    regression targets, nothing for unlabeled rows. Against the float model: agreement (class scores), output
    error and SQNR, of all outputs together and of each (``layout``)."""
    if not layout and labels.ndim == 2 and labels.shape[1]:  # regression targets are not class scores
        layout = (ModelOutput(name="output", shape=tuple(outputs.shape[1:]), class_scores=False),)
    per_output = output_metrics(outputs, reference, layout)
    against_float = {
        "agreement_with_float": float((outputs.argmax(axis=1) == reference.argmax(axis=1)).mean())
        if labels.ndim == 1
        else worst_agreement(per_output),
        "outputs": per_output,
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
    n_classes = len(class_names)
    rows = np.bincount(labels, minlength=n_classes)
    right = np.bincount(labels[predicted == labels], minlength=n_classes)
    per_class = {name: (round(float(right[i] / rows[i]), 6) if rows[i] else None) for i, name in enumerate(class_names)}
    dense = n_classes <= DENSE_CONFUSION_CLASSES
    return ModelMetrics(
        accuracy=accuracy(outputs, labels),
        per_class_accuracy=per_class,
        confusion_matrix=confusion_matrix(predicted, labels, n_classes).tolist() if dense else [],
        most_confused=[] if dense else most_confused(predicted, labels, class_names),
        **against_float,
    )
