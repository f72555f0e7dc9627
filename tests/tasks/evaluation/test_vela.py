"""Arm's Vela compiler, run for real on models the tests convert: NPU coverage, each CPU operator with Vela's
reason, SRAM, flash and speed, and a refusal in one line."""

from __future__ import annotations

import pytest

from ptqflow.tasks.core.parameters import ConversionParameters, DeviceTarget, ValidationParameters
from ptqflow.tasks.evaluation.vela import compile_for_npu, cpu_operators
from ptqflow.tasks.quantization.converter import convert_float, quantize


@pytest.fixture(scope="module")
def int8_digits(trained_digits_model, digits_splits) -> bytes:
    _, splits = digits_splits
    calibration = splits["train"].features[:100]
    return quantize(trained_digits_model, lambda: [calibration], ConversionParameters())


def test_targets_are_the_accelerators_vela_knows():
    from ethosu.vela.architecture_features import Accelerator

    assert {t.value for t in DeviceTarget if t.npu} == {a.value for a in Accelerator}


@pytest.mark.smoke
def test_a_full_integer_model_compiles_onto_the_npu_with_its_figures(int8_digits):
    compilation = compile_for_npu(int8_digits, DeviceTarget.ethos_u55_128)
    figures = compilation.figures
    assert figures.compiled and figures.error is None and figures.compiler.startswith("ethos-u-vela ")
    assert figures.npu_ops > 0 and figures.cpu_ops == 0 and figures.npu_share == 1.0
    assert figures.system_config and figures.memory_mode and (figures.clock_hz or 0) > 0
    assert 0 < (figures.sram_bytes or 0) and 0 < (figures.flash_bytes or 0) < len(int8_digits) * 2
    assert (figures.inferences_per_second or 0) > 0 and (figures.cycles or 0) > 0
    assert compilation.compiled is not None and b"ethos-u" in compilation.compiled  # the NPU's custom operator
    # A bigger NPU is estimated faster on the same model.
    larger = compile_for_npu(int8_digits, DeviceTarget.ethos_u55_256).figures
    assert (larger.inferences_per_second or 0) >= (figures.inferences_per_second or 0)


def test_float_operators_stay_on_the_cpu_each_with_velas_reason(trained_digits_model):
    figures = compile_for_npu(convert_float(trained_digits_model), DeviceTarget.ethos_u55_128).figures
    assert figures.compiled and figures.npu_ops == 0 and figures.cpu_ops == len(figures.cpu_operators) > 0
    assert any(o.op == "FULLY_CONNECTED" and "Float32" in o.reason for o in figures.cpu_operators)


def test_a_configuration_vela_does_not_know_is_its_one_line_refusal(int8_digits):
    figures = compile_for_npu(int8_digits, DeviceTarget.ethos_u55_128, "No_Such_System", "Shared_Sram").figures
    assert not figures.compiled and "No_Such_System" in (figures.error or "") and "\n" not in (figures.error or "")


def test_vela_settings_are_checked_before_anything_runs():
    with pytest.raises(ValueError, match="together"):
        ValidationParameters(vela_system_config="Ethos_U55_High_End_Embedded")
    with pytest.raises(ValueError, match="section name"):
        ValidationParameters(vela_system_config="x; rm -rf /", vela_memory_mode="Shared_Sram")


def test_only_operators_vela_lists_for_the_cpu_are_cpu_operators():
    printed = "\n".join(
        [
            "Warning (supported operators) operator: SHAPE, ofm: 'flatten/Shape'",
            "Reason: Unsupported opType",
            "",
            "Warning (supported operators) operator: SIGN, ofm: 'sign'",
            "Reason: Operation has tensor with unsupported DataType Float32 (x)",
            'Feature-map dataTypes must be one of {"INT8"}',
            "CPU operators = 1 (33.3%)",
            "   CPU: Passthrough = sign (outputs [1, 1, 1, 4])",
            "NPU operators = 2 (66.7%)",
        ]
    )
    operators, counts = cpu_operators(printed)
    assert counts == {"CPU": 1, "NPU": 2}
    assert [(o.op, o.tensor) for o in operators] == [("SIGN", "sign")]  # SHAPE was folded onto the NPU
    assert operators[0].reason.startswith("Operation has tensor with unsupported DataType Float32")


def test_vela_ignores_the_working_directory(int8_digits, tmp_path, monkeypatch):
    (tmp_path / "ethosu").mkdir()
    (tmp_path / "ethosu" / "__init__.py").write_text("raise ImportError('the working directory, not Vela')\n")
    monkeypatch.chdir(tmp_path)
    assert compile_for_npu(int8_digits, DeviceTarget.ethos_u55_128).figures.compiled
