"""Activation ranges from the calibration data (tasks.quantization.ranges, --calibration-method) and the conversion
through the converter's calibrate-only step and its own quantizer
(tasks.quantization.converter.quantize_with_ranges)."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.tasks.core.parameters import CalibrationMethod, ConversionParameters, QuantizationScheme
from ptqflow.tasks.quantization.ranges import BINS, RANGE_METHODS, Histogram, RangeMethod, choose_range
from ptqflow.tasks.sweep.grid import sweep_grid
from ptqflow.tasks.views.render import conversion_line


def histogram_of(values: np.ndarray) -> Histogram:
    low, high = float(values.min()), float(values.max())
    return Histogram(low, high, np.histogram(values, bins=BINS, range=(low, high))[0])


@pytest.fixture(scope="module")
def with_outliers() -> Histogram:
    """A million values around 0 and one far out at 50: min/max gives the others a few int8 steps. (With ten,
    clipping them would cost more squared error than the rounding it saves, and mse rightly keeps them.)"""
    values = np.random.default_rng(0).normal(0, 1, 1_000_000)
    values[0] = 50.0
    return histogram_of(values)


def test_every_calibration_method_has_its_row_in_the_table_and_its_words_in_the_help():
    assert set(RANGE_METHODS) == set(CalibrationMethod)
    help_text = ConversionParameters.model_fields["calibration_method"].description or ""
    assert all(f"{m.value} (" in help_text for m in CalibrationMethod)


def test_a_method_added_to_the_table_is_chosen_swept_and_reported(monkeypatch):
    """The table is the one slot: the range chosen, the sweep's rows and the report's line all come from it."""
    new = next(m for m in CalibrationMethod if RANGE_METHODS[m].choose is not None)
    monkeypatch.setitem(RANGE_METHODS, new, RangeMethod("middle half", lambda hist, percentile: (-0.5, 0.5)))
    assert choose_range(histogram_of(np.linspace(-2, 2, 1000)), new) == (-0.5, 0.5)
    rows = {c.name: c for c in sweep_grid(100, [])}
    assert rows[f"int8-{new.value}"].description == "full int8, middle half activation ranges"
    assert "middle half activation ranges" in conversion_line(ConversionParameters(calibration_method=new).model_dump())
    monkeypatch.setitem(RANGE_METHODS, new, RangeMethod("middle half", RANGE_METHODS[new].choose, in_sweep=False))
    assert f"int8-{new.value}" not in {c.name for c in sweep_grid(100, [])}


@pytest.mark.parametrize("method", [m for m, row in RANGE_METHODS.items() if row.choose is not None])
def test_every_method_but_minmax_clips_rare_outliers_and_keeps_zero_inside(with_outliers, method):
    low, high = choose_range(with_outliers, method, percentile=99.99)
    assert low < 0 < high
    assert 3.0 < high < 25.0, (method, high)  # far below the outliers at 50, above the bulk (99.99% within 4)
    assert choose_range(with_outliers, CalibrationMethod.minmax) == (with_outliers.low, with_outliers.high)


def test_percentile_keeps_the_share_asked_for():
    values = np.random.default_rng(1).uniform(0, 10, 1_000_000)  # one-signed, as after a ReLU
    low, high = choose_range(histogram_of(values), CalibrationMethod.percentile, percentile=90.0)
    assert low == 0.0 and high == pytest.approx(9.0, abs=0.02)  # the whole tail at the top


def test_a_tensor_of_one_value_keeps_its_range():
    hist = Histogram(0.0, 0.0, np.zeros(BINS, np.int64))
    assert choose_range(hist, CalibrationMethod.mse) == (0.0, 0.0)


def test_minmax_through_the_converters_own_steps_gives_the_normal_model(trained_digits_model, digits_splits):
    from ptqflow.tasks.evaluation.interpreter import predict_tflite
    from ptqflow.tasks.quantization.converter import quantize, quantize_with_ranges

    _, splits = digits_splits
    calibration, test = splits["train"].features[:200], splits["test"].features

    def batches():
        return [calibration[:64], calibration[64:128], calibration[128:]]

    normal = quantize(trained_digits_model, batches, ConversionParameters())
    stepwise = quantize_with_ranges(trained_digits_model, batches, ConversionParameters())
    np.testing.assert_array_equal(predict_tflite(stepwise, test), predict_tflite(normal, test))


@pytest.mark.parametrize("method", [CalibrationMethod.percentile, CalibrationMethod.mse, CalibrationMethod.kl])
def test_each_method_gives_a_full_integer_model_within_the_gate(trained_digits_model, digits_splits, method):
    from ptqflow.tasks.evaluation.interpreter import audit_tensor_types, predict_tflite
    from ptqflow.tasks.evaluation.metrics import accuracy
    from ptqflow.tasks.models.feeds import predict_keras
    from ptqflow.tasks.quantization.converter import quantize

    _, splits = digits_splits
    calibration, test = splits["train"].features[:200], splits["test"]
    options = ConversionParameters(calibration_method=method)
    model = quantize(trained_digits_model, lambda: [calibration], options)
    audit = audit_tensor_types(model)
    assert audit.full_integer and audit.input.dtype == "int8" and audit.output.dtype == "int8"
    drop = accuracy(predict_keras(trained_digits_model, test.features), test.labels) - accuracy(
        predict_tflite(model, test.features), test.labels
    )
    assert drop * 100 <= 1.0
    assert quantize(trained_digits_model, lambda: [calibration], options) == model  # deterministic


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            {
                "calibration_method": "mse",
                "scheme": QuantizationScheme.int16x8,
                "input_type": "float32",
                "output_type": "float32",
            },
            "--calibration-method mse chooses int8 activation ranges",
        ),
        ({"percentile": 99.9}, "--percentile applies to --calibration-method percentile"),
    ],
)
def test_options_that_cannot_apply_are_refused(given, message):
    with pytest.raises(ValueError, match=message):
        ConversionParameters(**given)
