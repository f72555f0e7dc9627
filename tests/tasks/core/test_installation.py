"""ptqflow names a broken or unsupported TensorFlow installation, with the fix, before TensorFlow is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import ptqflow_executable
from ptqflow.tasks.core.installation import (
    NEWEST_TENSORFLOW,
    OLDEST_TENSORFLOW,
    Distribution,
    tensorflow_distributions,
    tensorflow_problem,
)

pytestmark = pytest.mark.smoke  # also run on the oldest supported TensorFlow (.ci/run)


def test_this_environment_has_exactly_one_supported_tensorflow():
    (installed,) = tensorflow_distributions()
    assert installed.name in ("tensorflow", "tensorflow-cpu")
    assert tensorflow_problem((installed,)) is None


@pytest.mark.parametrize("version", [str(OLDEST_TENSORFLOW) + ".0", str(NEWEST_TENSORFLOW) + ".9", "2.20.1"])
def test_every_release_in_the_tested_range_is_accepted(version):
    assert tensorflow_problem((Distribution("tensorflow", version),)) is None


@pytest.mark.parametrize("version", ["2.17.1", "2.22.0rc1", "3.0.0"])
def test_a_release_outside_the_tested_range_is_refused_with_the_install_line(version):
    problem = tensorflow_problem((Distribution("tensorflow-cpu", version),))
    assert problem is not None and "tested on (2.18 to 2.21.x)" in problem
    assert problem.endswith("pip install 'tensorflow-cpu>=2.18,<2.22'")


def test_no_tensorflow_names_the_extras():
    assert tensorflow_problem(()) == (
        "TensorFlow is not installed: pip install 'ptqflow[tensorflow]' "
        "(or 'ptqflow[tensorflow-cpu]' for the CPU-only build)"
    )


def _second_build_beside(real: Distribution, root) -> Distribution:
    """A dist-info for the other TensorFlow build, as pip leaves it after installing it over the real one."""
    other = Distribution("tensorflow-cpu" if real.name == "tensorflow" else "tensorflow", "2.20.0")
    info = root / f"{other.name.replace('-', '_')}-{other.version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {other.name}\nVersion: {other.version}\n")
    (info / "top_level.txt").write_text("tensorflow\n")
    return other


def test_two_builds_over_each_other_stop_the_cli_with_one_line_and_write_nothing(tmp_path):
    (real,) = tensorflow_distributions()
    other = _second_build_beside(real, tmp_path)
    store = tmp_path / "store"
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [ptqflow_executable(), "run", "--epochs", "1", "--store", str(store)],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    first, second = sorted([real, other], key=lambda d: d.name)
    assert done.stderr.splitlines() == [
        f"ptqflow: 2 distributions install the same tensorflow package ({first.name} {first.version}, "
        f"{second.name} {second.version}), so it is a mix of both: pip uninstall -y {first.name} {second.name}, "
        "then install one (pip install 'tensorflow>=2.18,<2.22', or the build you use)"
    ]
    assert not store.exists()
    # The Python API refuses too, with the same message, before TensorFlow is imported.
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\ntry:\n import flows.pipeline\nexcept ImportError as e:\n"
            " print(type(e).__name__, 'tensorflow' in sys.modules)",
        ],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert imported.stdout.split() == ["UnsupportedInstall", "False"]


def test_a_converter_without_the_private_per_tensor_switch_is_refused_not_silently_per_channel(monkeypatch):
    from ptqflow.tasks.core.errors import ConversionFailed
    from ptqflow.tasks.core.parameters import ConversionParameters
    from ptqflow.tasks.quantization import converter as convert

    class ConverterWithoutTheSwitch:
        def __init__(self):
            self.target_spec = SimpleNamespace()

    monkeypatch.setattr(convert, "_converter", lambda model: ConverterWithoutTheSwitch())
    with pytest.raises(
        ConversionFailed,
        match=r"per-tensor weight scales .* is missing from this installation "
        r"\(tensorflow.*\); it works with TensorFlow 2.18 to 2.21.*per-channel",
    ):
        convert.quantization_converter(None, lambda: iter(()), ConversionParameters(per_channel=False))


def test_without_the_quantization_debugger_the_report_says_why_it_has_no_per_layer_error(monkeypatch):
    import keras
    import numpy as np
    import tensorflow as tf

    from ptqflow.tasks.core.parameters import ConversionParameters
    from ptqflow.tasks.evaluation.validation import per_layer_errors

    monkeypatch.delattr(tf.lite.experimental, "QuantizationDebugger")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    calibration = np.random.default_rng(0).random((16, 4), np.float32)
    errors, why_none = per_layer_errors(model, calibration, ConversionParameters(), batch_size=8)
    assert errors == []
    assert why_none is not None and why_none.startswith(
        "ConversionFailed: tf.lite.experimental.QuantizationDebugger (per-layer error and repair) is missing from "
        "this installation"
    )


def test_a_target_whose_runtime_is_missing_says_where_it_runs(monkeypatch):
    import importlib.util

    from ptqflow.tasks.core.installation import TargetRuntimeMissing, require_target_runtimes, target_runtime_problem
    from ptqflow.tasks.core.parameters import DeviceTarget

    assert target_runtime_problem((DeviceTarget.tflm, DeviceTarget.ethos_u55_128)) is None  # both installed here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "tflite_micro" else real(name))
    with pytest.raises(TargetRuntimeMissing, match="--target tflm needs .*Linux x86-64 only"):
        require_target_runtimes((DeviceTarget.litert, DeviceTarget.tflm))
    assert target_runtime_problem((DeviceTarget.litert, DeviceTarget.ethos_u55_128)) is None
