"""The sweep's grid: named recipes, each a set of conversion options and a calibration size."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ptqflow.tasks.core.errors import PtqflowError
from ptqflow.tasks.core.parameters import (
    ConversionParameters,
    QuantizationScheme,
    TargetOps,
    TensorType,
)
from ptqflow.tasks.quantization.ranges import RANGE_METHODS

FLOAT_REFERENCE = "float32"


class SweepConfiguration(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    description: str
    conversion: ConversionParameters
    calibration_size: int | None = Field(description="Calibration samples; None for schemes without calibration.")


def sweep_grid(base_calibration_size: int, calibration_sizes: Iterable[int]) -> list[SweepConfiguration]:
    """The configurations a sweep compares: full int8 with each I/O type, per-tensor weights and each calibration
    size; int8 with float fallback; int8 with int16 activations where needed (mixed16); int16 activations with int8
    weights everywhere (int16x8); dynamic range; float16."""
    f32, u8, i16 = TensorType.float32, TensorType.uint8, TensorType.int16
    builtins = TargetOps.builtins
    int16x8, dynamic = QuantizationScheme.int16x8, QuantizationScheme.dynamic_range
    base = base_calibration_size
    rows: list[tuple[str, str, dict[str, Any], int | None]] = [
        ("int8", "full int8, int8 I/O", {}, base),
        *[(f"int8-cal{n}", "full int8, int8 I/O", {}, n) for n in sorted(set(calibration_sizes)) if n != base],
        ("int8-uint8-io", "full int8, uint8 I/O", {"input_type": u8, "output_type": u8}, base),
        ("int8-float-io", "full int8, float32 I/O", {"input_type": f32, "output_type": f32}, base),
        ("int8-per-tensor", "full int8, per-tensor weight scales", {"per_channel": False}, base),
        *[
            (f"int8-{m.value}", f"full int8, {method.label} activation ranges", {"calibration_method": m}, base)
            for m, method in RANGE_METHODS.items()
            if method.in_sweep
        ],
        ("int8-equalize", "full int8, equalized activation channels", {"equalize": True}, base),
        ("int8-bias-correction", "full int8, corrected biases", {"bias_correction": True}, base),
        (
            "int8-equalize-bias-correction",
            "full int8, equalized channels and corrected biases",
            {"equalize": True, "bias_correction": True},
            base,
        ),
        ("int8-fallback", "int8, float fallback (TFLITE_BUILTINS)", {"ops": builtins}, base),
        (
            "int8-fallback-float-io",
            "int8, float fallback, float32 I/O",
            {"ops": builtins, "input_type": f32, "output_type": f32},
            base,
        ),
        (
            "int8-mixed16",
            "int8, int16 activations in the layers that need them (at most a third; the mixed extra)",
            {"scheme": QuantizationScheme.mixed16},
            base,
        ),
        (
            "int16x8",
            "int16 activations, int8 weights, float32 I/O",
            {"scheme": int16x8, "input_type": f32, "output_type": f32},
            base,
        ),
        (
            "int16x8-int16-io",
            "int16 activations, int8 weights, int16 I/O",
            {"scheme": int16x8, "input_type": i16, "output_type": i16},
            base,
        ),
        (
            "int16x8-per-tensor",
            "int16x8, per-tensor weight scales",
            {"scheme": int16x8, "input_type": f32, "output_type": f32, "per_channel": False},
            base,
        ),
        (
            "dynamic-range",
            "int8 weights, float activations",
            {"scheme": dynamic, "ops": builtins, "input_type": f32, "output_type": f32},
            None,
        ),
        (
            "dynamic-range-per-tensor",
            "dynamic range, per-tensor weight scales",
            {"scheme": dynamic, "ops": builtins, "input_type": f32, "output_type": f32, "per_channel": False},
            None,
        ),
        (
            "float16",
            "float16 weights",
            {"scheme": QuantizationScheme.float16, "ops": builtins, "input_type": f32, "output_type": f32},
            None,
        ),
    ]
    return [
        SweepConfiguration(
            name=name, description=description, conversion=ConversionParameters(**options), calibration_size=size
        )
        for name, description, options, size in rows
    ]


def select_configurations(grid: Sequence[SweepConfiguration], names: Sequence[str] | None) -> list[SweepConfiguration]:
    """The configurations called ``names`` (all of them for None), in grid order."""
    if names is None:
        return list(grid)
    known = {c.name for c in grid}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise PtqflowError(
            f"unknown sweep configuration {', '.join(map(repr, unknown))}: choose from {', '.join(sorted(known))} "
            "(`ptqflow sweep --list`)"
        )
    return [c for c in grid if c.name in set(names)]
