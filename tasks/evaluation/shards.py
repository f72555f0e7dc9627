"""Validation's predictions, range of test rows by range: what the validate stage needs from every model on every
test sample (the float Keras model's outputs, and each ``.tflite``'s, with the rows it refused), computed where
the rows are read (a Dask worker, a thread) and joined in row order.

Ranges start at multiples of the prediction batch, so each of the Keras model's batches is the same rows as in a
one-range prediction, and the ``.tflite`` files (batch 1) run each sample alone: the joined predictions, and so
the report made from them, are the one-process run's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from ptqflow.storage.tables import InputSlot
from ptqflow.tasks.evaluation.interpreter import RowFailure, predict_tflite
from ptqflow.tasks.evaluation.tflm import TflmRows
from ptqflow.tasks.models.feeds import predict_keras

if TYPE_CHECKING:
    import keras


def shard_bounds(rows: int, batch_size: int, shard_rows: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``rows``, each starting at a multiple of ``batch_size``."""
    step = max(batch_size, shard_rows // batch_size * batch_size)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


@dataclass(frozen=True)
class Predictions:
    """Each model's outputs on the same rows (several outputs side by side, flattened), and the calls each
    ``.tflite`` refused (their rows' outputs are NaN); with a TFLite Micro target, its outputs on the rows it
    runs."""

    keras: np.ndarray
    float_tflite: np.ndarray
    quantized_tflite: np.ndarray
    float_refused: tuple[RowFailure, ...] = ()
    quantized_refused: tuple[RowFailure, ...] = ()
    tflm: TflmRows | None = None  # the quantized model on TFLite Micro, on the rows it runs (test split positions)

    def __len__(self) -> int:
        return len(self.keras)

    def rows(self, start: int, stop: int, first_row: int = 0) -> Predictions:
        """Rows ``start`` to ``stop`` of these (``first_row``: the test split's position of their first row, where
        TFLM's rows are counted from), refused calls counted from ``start``."""

        def within(failures: tuple[RowFailure, ...]) -> tuple[RowFailure, ...]:
            return tuple(
                replace(f, start=max(f.start, start) - start, stop=min(f.stop, stop) - start)
                for f in failures
                if f.start < stop and f.stop > start
            )

        tflm = self.tflm
        if tflm is not None:
            mine = (tflm.rows >= first_row + start) & (tflm.rows < first_row + stop)
            tflm = replace(
                tflm,
                rows=tflm.rows[mine],
                litert=tflm.litert[mine],
                outputs=tflm.outputs[mine] if tflm.outputs is not None else None,
                arena=None,
            )
        return Predictions(
            keras=self.keras[start:stop],
            float_tflite=self.float_tflite[start:stop],
            quantized_tflite=self.quantized_tflite[start:stop],
            float_refused=within(self.float_refused),
            quantized_refused=within(self.quantized_refused),
            tflm=tflm,
        )

    @classmethod
    def joined(cls, parts: Sequence[Predictions]) -> Predictions:
        """``parts`` (consecutive ranges, in order) as one: refused rows renumbered from the first part's start."""
        starts = np.cumsum([0] + [len(part) for part in parts[:-1]])

        def moved(failures: tuple[RowFailure, ...], by: int) -> list[RowFailure]:
            return [replace(f, start=f.start + by, stop=f.stop + by) for f in failures]

        return cls(
            keras=np.concatenate([part.keras for part in parts]),
            float_tflite=np.concatenate([part.float_tflite for part in parts]),
            quantized_tflite=np.concatenate([part.quantized_tflite for part in parts]),
            float_refused=tuple(f for part, by in zip(parts, starts) for f in moved(part.float_refused, int(by))),
            quantized_refused=tuple(
                f for part, by in zip(parts, starts) for f in moved(part.quantized_refused, int(by))
            ),
            tflm=TflmRows.joined([part.tflm for part in parts if part.tflm is not None])
            if any(part.tflm is not None for part in parts)
            else None,
        )


def predict_rows(
    keras_model: keras.Model,
    float_tflite: bytes,
    quantized_tflite: bytes,
    features: np.ndarray,
    batch_size: int,
    num_threads: int | None,
    inputs: tuple[InputSlot, ...] = (),
    keras_outputs: np.ndarray | None = None,
) -> Predictions:
    """Pure stage function: the three models' outputs on ``features`` (``keras_outputs`` when known already)."""
    float_refused: list[RowFailure] = []
    quantized_refused: list[RowFailure] = []
    return Predictions(
        keras=predict_keras(keras_model, features, batch_size, inputs) if keras_outputs is None else keras_outputs,
        float_tflite=predict_tflite(float_tflite, features, batch_size, num_threads, None, inputs, float_refused),
        quantized_tflite=predict_tflite(
            quantized_tflite, features, batch_size, num_threads, None, inputs, quantized_refused
        ),
        float_refused=tuple(float_refused),
        quantized_refused=tuple(quantized_refused),
    )
