"""Validation's predictions range by range: the joined ranges are the one-range prediction, refused rows
included."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.tasks.core.parameters import ConversionParameters
from ptqflow.tasks.evaluation.interpreter import RowFailure
from ptqflow.tasks.evaluation.shards import Predictions, predict_rows, shard_bounds
from ptqflow.tasks.quantization.converter import convert_float, quantize


@pytest.mark.parametrize(
    "rows, batch, shard_rows, expected",
    [
        (1000, 256, 512, [(0, 512), (512, 1000)]),
        (1000, 256, 600, [(0, 512), (512, 1000)]),  # rounded down to whole batches
        (1000, 256, 100, [(0, 256), (256, 512), (512, 768), (768, 1000)]),  # at least one batch
        (300, 256, 4096, [(0, 300)]),
        (0, 256, 4096, []),
    ],
)
def test_ranges_start_at_whole_batches_and_cover_every_row(rows, batch, shard_rows, expected):
    assert shard_bounds(rows, batch, shard_rows) == expected


def test_joined_parts_renumber_refused_rows_from_the_first_parts_start():
    def part(rows: int, refused: tuple[RowFailure, ...]) -> Predictions:
        outputs = np.zeros((rows, 2), np.float32)
        return Predictions(outputs, outputs, outputs, quantized_refused=refused)

    joined = Predictions.joined([part(4, (RowFailure(1, 2, "a"),)), part(3, ()), part(5, (RowFailure(0, 1, "b"),))])
    assert len(joined) == 12
    assert joined.quantized_refused == (RowFailure(1, 2, "a"), RowFailure(7, 8, "b"))
    assert joined.float_refused == ()


def test_a_range_of_predictions_keeps_its_refusals_and_tflm_rows_and_counts_from_its_start():
    from ptqflow.tasks.evaluation.tflm import TflmRows

    outputs = np.arange(20, dtype=np.float32).reshape(10, 2)
    tflm = TflmRows(rows=np.array([102, 105, 108]), litert=outputs[[2, 5, 8]], outputs=outputs[[2, 5, 8]] + 1)
    predictions = Predictions(
        outputs, outputs, outputs, quantized_refused=(RowFailure(3, 6, "a"), RowFailure(8, 9, "b")), tflm=tflm
    )
    part = predictions.rows(4, 8, first_row=100)
    np.testing.assert_array_equal(part.quantized_tflite, outputs[4:8])
    assert part.quantized_refused == (RowFailure(0, 2, "a"),)  # the call's rows within the range
    assert part.tflm is not None
    np.testing.assert_array_equal(part.tflm.rows, [105])
    np.testing.assert_array_equal(part.tflm.outputs, outputs[[5]] + 1)
    assert predictions.rows(9, 10, first_row=100).quantized_refused == ()


def test_ranges_predicted_apart_are_the_whole_prediction(front_end_model, audio_clips):
    """The audio front end's int8 DIV refuses silent clips: the refusals, too, land on the same rows."""
    clips, _ = audio_clips
    features = clips[:200]
    float_tflite = convert_float(front_end_model)
    quantized = quantize(front_end_model, lambda: [clips[:128]], ConversionParameters())
    whole = predict_rows(front_end_model, float_tflite, quantized, features, 32, 1)
    assert whole.quantized_refused, "no row refused: this test no longer covers refusals"
    parts = [
        predict_rows(front_end_model, float_tflite, quantized, features[start:stop], 32, 1)
        for start, stop in shard_bounds(len(features), 32, 64)
    ]
    joined = Predictions.joined(parts)
    np.testing.assert_array_equal(joined.keras, whole.keras)
    np.testing.assert_array_equal(joined.float_tflite, whole.float_tflite)
    np.testing.assert_array_equal(joined.quantized_tflite, whole.quantized_tflite)  # NaN on the same rows
    assert joined.quantized_refused == whole.quantized_refused
    assert joined.float_refused == whole.float_refused
