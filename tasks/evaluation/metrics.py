"""Figures of a model's outputs against labels and against the float model's outputs: pure numpy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    sums = OutputSums(layout)
    sums.add(outputs, reference)
    return sums.figures()


def task_figures(
    task: ModelTask,
    reference: np.ndarray,
    outputs: np.ndarray,
    labels: np.ndarray,
    layout: tuple[ModelOutput, ...] = (),
) -> TaskFigures:
    """What the task's gate judges of ``outputs`` against the float model's ``reference`` (and the labels):
    accuracy and its drop, MAE and its rise, or SQNR and agreement of the worst output."""
    sums = TaskSums(task, layout)
    sums.add(reference, outputs, labels)
    return sums.figures()


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


def sqnr_db(reference: np.ndarray, output: np.ndarray) -> float | None:
    """Signal-to-quantization-noise ratio of ``output`` against ``reference``; None when they are identical."""
    sums = ErrorSums()
    sums.add(output, reference)
    return sums.sqnr_db()


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
    sums = ModelSums(layout)
    sums.add(outputs, reference, labels)
    return sums.metrics(class_names, model_bytes, speed)


# Figures accumulated batch by batch: a split's outputs need not be held at once. Counts are exact; float sums are
# float64 sums of each batch's sum, in row order, so one batch gives what numpy gives on the whole array, and a
# split read in the same batches (``tasks.evaluation.validation.window_rows``) gives the same figures however its
# predictions were sharded.


def _mean(total: float, count: int) -> float:
    return float(np.float64(total) / count) if count else float("nan")


@dataclass
class ErrorSums:
    """Differences of outputs from a reference (the float model's outputs, or regression targets)."""

    values: int = 0
    absolute: float = 0.0
    squared: float = 0.0
    signal: float = 0.0
    largest: float = 0.0

    def add(self, outputs: np.ndarray, reference: np.ndarray) -> None:
        difference = outputs.astype(np.float64) - reference
        self.values += difference.size
        self.absolute += float(np.sum(np.abs(difference)))
        self.squared += float(np.sum(difference**2))
        self.signal += float(np.sum(reference.astype(np.float64) ** 2))
        if difference.size:
            self.largest = max(self.largest, float(np.max(np.abs(difference))))

    def mae(self) -> float:
        return round(_mean(self.absolute, self.values), 9)

    def rmse(self) -> float:
        return round(float(np.sqrt(_mean(self.squared, self.values))), 9)

    def max_abs_error(self) -> float:
        return round(self.largest, 9)

    def sqnr_db(self) -> float | None:
        """None when the outputs equal the reference."""
        return None if self.squared == 0 else round(10 * np.log10(self.signal / self.squared), 4)


@dataclass
class Agreement:
    """Rows whose top-1 class is the reference's."""

    rows: int = 0
    agreeing: int = 0

    def add(self, outputs: np.ndarray, reference: np.ndarray) -> None:
        self.rows += len(outputs)
        self.agreeing += int(np.count_nonzero(outputs.argmax(axis=1) == reference.argmax(axis=1)))

    def share(self) -> float:
        return _mean(self.agreeing, self.rows)


class OutputSums:
    """Each output of a prediction against the float model's (``output_metrics``)."""

    def __init__(self, layout: tuple[ModelOutput, ...] = ()) -> None:
        self.layout = layout
        self._errors: dict[str, ErrorSums] = {}
        self._agreement: dict[str, Agreement] = {}

    def add(self, outputs: np.ndarray, reference: np.ndarray) -> None:
        if not self.layout:
            width = int(np.prod(outputs.shape[1:])) if outputs.ndim > 1 else 1
            self.layout = (ModelOutput(name="output", shape=tuple(outputs.shape[1:]), class_scores=width > 1),)
        ours, theirs = split_outputs(outputs, self.layout), split_outputs(reference, self.layout)
        for output in self.layout:
            mine, float_ = ours[output.name], theirs[output.name]
            self._errors.setdefault(output.name, ErrorSums()).add(mine, float_)
            if output.class_scores and mine.shape[1] > 1:
                self._agreement.setdefault(output.name, Agreement()).add(mine, float_)

    def figures(self) -> dict[str, OutputFigures]:
        return {
            name: OutputFigures(
                sqnr_db=errors.sqnr_db(),
                mae=errors.mae(),
                max_abs_error=errors.max_abs_error(),
                agreement=self._agreement[name].share() if name in self._agreement else None,
            )
            for name, errors in self._errors.items()
        }


class ClassCounts:
    """(true, predicted) class pairs and how often each occurred: accuracy, per-class accuracy and the confusion
    matrix, in memory of the distinct pairs, whatever the rows."""

    def __init__(self) -> None:
        self._pairs = np.zeros((0, 2), np.int64)
        self._counts = np.zeros(0, np.int64)
        self.rows = 0
        self.largest_label = -1

    def add(self, predicted: np.ndarray, labels: np.ndarray) -> None:
        self.rows += len(labels)
        if not len(labels):
            return
        self.largest_label = max(self.largest_label, int(labels.max()))
        pairs = np.concatenate([self._pairs, np.stack([labels, predicted], axis=1).astype(np.int64)])
        weights = np.concatenate([self._counts, np.ones(len(labels), np.int64)])
        self._pairs, inverse = np.unique(pairs, axis=0, return_inverse=True)
        self._counts = np.bincount(inverse.reshape(-1), weights=weights, minlength=len(self._pairs)).astype(np.int64)

    def accuracy(self) -> float:
        right = self._counts[self._pairs[:, 0] == self._pairs[:, 1]].sum() if len(self._pairs) else 0
        return _mean(int(right), self.rows)

    def per_class(self, class_names: Sequence[str]) -> dict[str, float | None]:
        n_classes = len(class_names)
        true = self._pairs[:, 0]
        rows = np.bincount(true, weights=self._counts, minlength=n_classes)
        diagonal = true == self._pairs[:, 1]
        right = np.bincount(true[diagonal], weights=self._counts[diagonal], minlength=n_classes)
        return {name: (round(float(right[i] / rows[i]), 6) if rows[i] else None) for i, name in enumerate(class_names)}

    def matrix(self, n_classes: int) -> list[list[int]]:
        """Rows: true class; columns: predicted class."""
        dense = np.zeros((n_classes, n_classes), np.int64)
        dense[self._pairs[:, 0], self._pairs[:, 1]] = self._counts
        return dense.tolist()

    def most_confused(self, class_names: Sequence[str], limit: int = MOST_CONFUSED_PAIRS) -> list[Confusion]:
        """The most frequent mistakes, most frequent first (ties by true, then predicted class)."""
        wrong = self._pairs[:, 0] != self._pairs[:, 1]
        pairs, counts = self._pairs[wrong], self._counts[wrong]
        order = np.lexsort((pairs[:, 1], pairs[:, 0], -counts))[:limit]
        return [
            Confusion(true=class_names[int(pairs[i, 0])], predicted=class_names[int(pairs[i, 1])], count=int(counts[i]))
            for i in order
        ]


class ModelSums:
    """``model_metrics``, batch by batch: one model's outputs against the float model's and the labels."""

    def __init__(self, layout: tuple[ModelOutput, ...] = ()) -> None:
        self._layout = layout
        self._outputs: OutputSums | None = None
        self.against_float = ErrorSums()
        self.agreement = Agreement()
        self.classes = ClassCounts()
        self.against_targets = ErrorSums()
        self.rows = 0
        self._label_width: int | None = None  # None: class labels

    def add(self, outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> None:
        if self._outputs is None:
            layout = self._layout
            if not layout and labels.ndim == 2 and labels.shape[1]:  # regression targets are not class scores
                layout = (ModelOutput(name="output", shape=tuple(outputs.shape[1:]), class_scores=False),)
            self._outputs = OutputSums(layout)
            self._label_width = labels.shape[1] if labels.ndim == 2 else None
        self.rows += len(outputs)
        self._outputs.add(outputs, reference)
        self.against_float.add(outputs, reference)
        if self._label_width is None:
            self.agreement.add(outputs, reference)
            self.classes.add(outputs.argmax(axis=1), labels)
        elif self._label_width:
            self.against_targets.add(outputs, labels)

    def accuracy(self) -> float | None:
        return self.classes.accuracy() if self._label_width is None else None

    def mae(self) -> float | None:
        return self.against_targets.mae() if self._label_width else None

    def metrics(
        self, class_names: Sequence[str], model_bytes: int | None = None, speed: Speed | None = None
    ) -> ModelMetrics:
        outputs = self._outputs.figures() if self._outputs is not None else {}
        against_float = {
            "agreement_with_float": self.agreement.share() if self._label_width is None else worst_agreement(outputs),
            "outputs": outputs,
            "output_mae": self.against_float.mae(),
            "output_max_abs_error": self.against_float.max_abs_error(),
            "output_sqnr_db": self.against_float.sqnr_db(),
            "bytes": model_bytes,
            "speed": speed,
        }
        if self._label_width is not None:
            if not self._label_width:
                return ModelMetrics(accuracy=None, **against_float)
            return ModelMetrics(
                accuracy=None, mae=self.against_targets.mae(), rmse=self.against_targets.rmse(), **against_float
            )
        dense = len(class_names) <= DENSE_CONFUSION_CLASSES
        return ModelMetrics(
            accuracy=self.classes.accuracy(),
            per_class_accuracy=self.classes.per_class(class_names),
            confusion_matrix=self.classes.matrix(len(class_names)) if dense else [],
            most_confused=[] if dense else self.classes.most_confused(class_names),
            **against_float,
        )


class TaskSums:
    """``task_figures``, batch by batch: what the task's gate judges of a model against the float model."""

    def __init__(self, task: ModelTask, layout: tuple[ModelOutput, ...] = ()) -> None:
        self.task = task
        self.rows = 0
        self._float_classes, self._classes, self._agreement = ClassCounts(), ClassCounts(), Agreement()
        self._float_targets, self._targets, self._against_float = ErrorSums(), ErrorSums(), ErrorSums()
        self._outputs = OutputSums(layout)

    def add(self, reference: np.ndarray, outputs: np.ndarray, labels: np.ndarray) -> None:
        self.rows += len(outputs)
        if self.task is ModelTask.classification:
            self._float_classes.add(reference.argmax(axis=1), labels)
            self._classes.add(outputs.argmax(axis=1), labels)
            self._agreement.add(outputs, reference)
        elif self.task is ModelTask.regression:
            self._float_targets.add(reference, labels)
            self._targets.add(outputs, labels)
            self._against_float.add(outputs, reference)
        else:
            self._outputs.add(outputs, reference)

    def figures(self) -> TaskFigures:
        if self.task is ModelTask.classification:
            float_accuracy, quantized = self._float_classes.accuracy(), self._classes.accuracy()
            return TaskFigures(
                task=self.task,
                float_accuracy=float_accuracy,
                quantized_accuracy=quantized,
                accuracy_drop_pp=round((float_accuracy - quantized) * 100, 6),
                agreement=self._agreement.share(),
            )
        if self.task is ModelTask.regression:
            float_mae, quantized_mae = self._float_targets.mae(), self._targets.mae()
            return TaskFigures(
                task=self.task,
                float_mae=float_mae,
                quantized_mae=quantized_mae,
                mae_increase_pct=increase_pct(float_mae, quantized_mae),
                sqnr_db=self._against_float.sqnr_db(),
            )
        per_output = self._outputs.figures()
        return TaskFigures(
            task=self.task, sqnr_db=worst_sqnr(per_output), agreement=worst_agreement(per_output), outputs=per_output
        )
