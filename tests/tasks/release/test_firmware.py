"""model_data.cc / model_data.h as firmware includes them: compiled with the system's C++ compiler, the array is
the shipped file byte for byte, 16-byte aligned, and the constants are TFLM's measured arena and the model's own
quantization."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from ptqflow.tasks.core.artifacts import TflmFigures
from ptqflow.tasks.core.parameters import ConversionParameters
from ptqflow.tasks.evaluation.interpreter import make_interpreter
from ptqflow.tasks.quantization.converter import quantize
from ptqflow.tasks.release.firmware import model_data_files, resolver_call

PROGRAM = r"""
#include <cstdio>
#include <cstdint>
#include "model_data.h"
static_assert(kModelDataLen > 0, "length");
int main() {
  if (reinterpret_cast<uintptr_t>(g_model_data) % 16 != 0) return 3;
  if (g_model_data_len != kModelDataLen) return 4;
  std::fwrite(g_model_data, 1, g_model_data_len, stdout);
  std::fprintf(stderr, "%zu %.9g %d %.9g %d %d", kTensorArenaSize, kInput0Scale, kInput0ZeroPoint, kOutput0Scale,
               kOutput0ZeroPoint, kOperatorCount);
  return 0;
}
"""


@pytest.fixture(scope="module")
def int8_digits(trained_digits_model, digits_splits) -> bytes:
    _, splits = digits_splits
    return quantize(trained_digits_model, lambda: [splits["train"].features[:100]], ConversionParameters())


@pytest.mark.smoke
def test_the_c_array_compiles_to_the_shipped_file_with_its_constants(int8_digits, tmp_path):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler on this machine")
    tflm = TflmFigures(
        runtime="tflite-micro test",
        ran=True,
        samples=1,
        arena_bytes=7504,
        arena_head_bytes=2560,
        arena_tail_bytes=4944,
        ops=("CONV_2D", "FULLY_CONNECTED", "MAX_POOL_2D"),
    )
    for name, data in model_data_files(int8_digits, "0" * 64, tflm).items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "main.cc").write_text(PROGRAM)
    binary = tmp_path / "dump"
    subprocess.run(
        [compiler, "-std=c++17", "-Wall", "-Werror", "-o", str(binary), "main.cc", "model_data.cc"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    done = subprocess.run([str(binary)], capture_output=True, check=True)
    assert done.stdout == int8_digits
    arena, in_scale, in_zero, out_scale, out_zero, ops = done.stderr.decode().split()
    interpreter = make_interpreter(int8_digits, 1)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert int(arena) == 7504 and int(ops) == 3
    assert float(in_scale) == pytest.approx(inp["quantization"][0], rel=1e-6) and int(in_zero) == inp["quantization"][1]
    assert float(out_scale) == pytest.approx(out["quantization"][0], rel=1e-6)
    assert int(out_zero) == out["quantization"][1]
    header = (tmp_path / "model_data.h").read_text()
    assert "resolver.AddConv2D();" in header and "resolver.AddMaxPool2D();" in header


def test_no_arena_no_header():
    with pytest.raises(ValueError, match="TFLM did not run"):
        model_data_files(b"", "0" * 64, TflmFigures(runtime="x", ran=False, not_run_reason="SIGN", samples=0))


@pytest.mark.parametrize(
    ("op", "call"),
    [
        ("CONV_2D", "AddConv2D"),
        ("DEPTHWISE_CONV_2D", "AddDepthwiseConv2D"),
        ("FULLY_CONNECTED", "AddFullyConnected"),
        ("RELU6", "AddRelu6"),
        ("L2_NORMALIZATION", "AddL2Normalization"),
        ("BATCH_TO_SPACE_ND", "AddBatchToSpaceNd"),
    ],
)
def test_each_operator_is_named_as_tflms_op_resolver_registers_it(op, call):
    assert resolver_call(op) == call
