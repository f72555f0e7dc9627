"""``import ptqflow``: the command line's runs from Python, with its options as keyword arguments."""

from __future__ import annotations

import pytest

import ptqflow
from ptqflow.tasks.core.errors import PtqflowError
from ptqflow.tasks.core.parameters import TensorType

pytestmark = pytest.mark.slow


def test_run_returns_the_typed_summary_of_a_passing_run(prefect_server, tmp_path):
    from ptqflow.tasks.release.outcome import RunSummary

    store = tmp_path / "store"
    summary = ptqflow.run(epochs=3, store=str(store), calibration_size=100, output_type=TensorType.int8)
    assert isinstance(summary, RunSummary)
    assert summary.status == "passed" and summary.gate.passed
    assert summary.artifacts["tflite"].uri.startswith(store.as_uri())
    assert set(summary.tasks) >= {"sample_dataset", "train_float_model", "convert_to_tflite"}


def test_a_refused_option_is_named_as_the_command_line_spells_it_and_nothing_is_written(tmp_path):
    store = tmp_path / "store"
    with pytest.raises(ptqflow.InvalidOption, match=r"^invalid --calibration-size: "):
        ptqflow.run(store=str(store), calibration_size=0)
    with pytest.raises(PtqflowError, match="unknown sweep configuration 'no-such-configuration': choose from "):
        ptqflow.sweep(store=str(store), configurations=("no-such-configuration",))
    assert not store.exists()


def test_an_unknown_option_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="calibration_sise"):
        ptqflow.run(calibration_sise=100)
