"""The parts of a validation report two runs of the same models must agree on."""

from __future__ import annotations

from ptqflow.tasks.core.validation_report import without_timings


def test_timed_figures_are_left_out_at_any_depth_and_nothing_else():
    report = {
        "samples": 360,
        "models": {
            "quantized_tflite": {"accuracy": 0.98, "speed": {"latency_ms": {"p50": 0.1}, "throughput_per_s": 9.0}},
        },
        "mixed": {"int8_latency_ms_p50": 0.2, "mixed_latency_ms_p50": 0.3, "int8_sqnr_db": 31.0},
        "outputs": [{"name": "probabilities", "sqnr_db": 30.0, "speed": 1}],
    }
    assert without_timings(report) == {
        "samples": 360,
        "models": {"quantized_tflite": {"accuracy": 0.98}},
        "mixed": {"int8_sqnr_db": 31.0},
        "outputs": [{"name": "probabilities", "sqnr_db": 30.0}],
    }
