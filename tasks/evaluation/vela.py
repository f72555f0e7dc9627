"""Arm Ethos-U NPUs, through Arm's own compiler, Vela (the ``ethos-u-vela`` package).

Vela compiles a fully-integer ``.tflite`` for one NPU configuration: the operators it supports become one NPU
command stream, the others stay for the CPU (TFLite Micro runs them), each with Vela's reason. Its summary gives
the SRAM and flash the compiled model takes and its performance estimate (cycles, inferences per second at the
system configuration's clock). Vela runs in a child process: it prints freely, may exit the interpreter, and its
work is pure (bytes in, bytes and a summary out).
"""

from __future__ import annotations

import csv
import importlib.metadata
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ptqflow.tasks.core.artifacts import CpuOperator, NpuFigures
from ptqflow.tasks.core.parameters import DeviceTarget

KIB = 1024
VELA_SECONDS = 600  # a large model compiles in tens of seconds; a hung compiler must not hold the run
# Vela's operator warnings: "Warning (supported operators) operator: OP, ofm: 'TENSOR'" then "Reason: WHY".
WARNING = re.compile(r"^Warning \(supported operators\) operator: (\S+), ofm: '(.*)'\s*$")
CPU_OPERATOR = re.compile(r"^\s*CPU: \S+ = (.*) \(outputs \[[^\]]*\]\)\s*$")
OPERATOR_COUNT = re.compile(r"^(CPU|NPU) operators = (\d+)")
EXCEPTION_PATH = re.compile(r"^[\w.]+(Error|Exception): ")  # "ethosu.vela.errors.CliOptionError: " before the reason


def vela_version() -> str:
    return f"ethos-u-vela {importlib.metadata.version('ethos-u-vela')}"


@dataclass(frozen=True)
class VelaCompilation:
    figures: NpuFigures
    compiled: bytes | None  # the _vela.tflite, None when Vela failed


def vela_arguments(
    target: DeviceTarget, system_config: str | None, memory_mode: str | None, output_dir: Path
) -> list[str]:
    arguments = ["--accelerator-config", target.value, "--output-dir", str(output_dir), "--show-cpu-operations"]
    if system_config is not None or memory_mode is not None:
        arguments += ["--config", "Arm/vela.ini"]  # the file Vela reads its defaults from
    if system_config is not None:
        arguments += ["--system-config", system_config]
    if memory_mode is not None:
        arguments += ["--memory-mode", memory_mode]
    return arguments


def cpu_operators(printed: str) -> tuple[tuple[CpuOperator, ...], dict[str, int]]:
    """The operators Vela left to the CPU, each with its reason, and its operator counts, from what it printed.

    Vela warns about every operator it could not take as it found it, then may still place some of them on the
    NPU (a SHAPE of a constant shape, folded away): only those its CPU list names are CPU operators."""
    reasons: dict[str, tuple[str, str]] = {}
    lines = printed.splitlines()
    for position, line in enumerate(lines):
        warning = WARNING.match(line)
        if warning:
            following = lines[position + 1 : position + 3]
            reason = " ".join(part.strip() for part in following if part.strip()).removeprefix("Reason: ")
            reasons.setdefault(warning.group(2), (warning.group(1), reason))
    counts = {kind: int(n) for line in lines for kind, n in OPERATOR_COUNT.findall(line)}
    operators = []
    for line in lines:
        listed = CPU_OPERATOR.match(line)
        if listed:
            tensor = listed.group(1)
            op, reason = reasons.get(tensor, ("", "not in Vela's list of supported operators"))
            operators.append(CpuOperator(op=op or "?", tensor=tensor, reason=reason or "unsupported"))
    return tuple(operators), counts


def summary_figures(row: dict[str, str]) -> dict[str, object]:
    """The figures of Vela's summary CSV (memory in KiB there, to bytes here)."""

    def kib(column: str) -> int:
        return round(float(row.get(column) or 0) * KIB)

    return {
        "system_config": row.get("system_config"),
        "memory_mode": row.get("memory_mode"),
        "clock_hz": float(row["core_clock"]) if row.get("core_clock") else None,
        "sram_bytes": kib("sram_memory_used"),
        "flash_bytes": kib("off_chip_flash_memory_used") + kib("on_chip_flash_memory_used"),
        "dram_bytes": kib("dram_memory_used"),
        "inferences_per_second": float(row["inferences_per_second"]) if row.get("inferences_per_second") else None,
        "cycles": int(float(row["cycles_total"])) if row.get("cycles_total") else None,
    }


def compile_for_npu(
    model_bytes: bytes,
    target: DeviceTarget,
    system_config: str | None = None,
    memory_mode: str | None = None,
) -> VelaCompilation:
    """Vela's compilation of the model for ``target``: its figures, and the compiled model; a model Vela refuses
    (or a configuration it does not know) gives figures with ``compiled`` False and Vela's reason."""
    compiler = vela_version()
    with tempfile.TemporaryDirectory(prefix="ptqflow-vela-") as folder:
        work = Path(folder)
        network = work / "model.tflite"
        network.write_bytes(model_bytes)
        output = work / "out"
        command = [sys.executable, "-m", "ethosu.vela", *vela_arguments(target, system_config, memory_mode, output)]
        try:
            done = subprocess.run(
                [*command, str(network)],
                capture_output=True,
                text=True,
                timeout=VELA_SECONDS,
                check=False,
                cwd=work,  # -m puts the working directory first on the path: not the user's
            )
        except subprocess.TimeoutExpired:
            return VelaCompilation(
                NpuFigures(target=target, compiler=compiler, compiled=False, error=f"Vela ran over {VELA_SECONDS} s"),
                None,
            )
        printed = done.stdout + "\n" + done.stderr
        compiled = output / "model_vela.tflite"
        summaries = sorted(output.glob("model_summary_*.csv"))
        if done.returncode != 0 or not compiled.exists() or not summaries:
            reason = next(
                (line.strip() for line in reversed(printed.splitlines()) if line.strip() and "Warning" not in line),
                f"exit status {done.returncode}",
            )
            reason = EXCEPTION_PATH.sub("", reason).removeprefix("Error: ")
            return VelaCompilation(
                NpuFigures(target=target, compiler=compiler, compiled=False, error=reason[:300]), None
            )
        with summaries[0].open(newline="") as f:
            row = next(csv.DictReader(f))
        operators, counts = cpu_operators(printed)
        figures = NpuFigures(
            target=target,
            compiler=compiler,
            compiled=True,
            npu_ops=counts.get("NPU", 0),
            cpu_ops=counts.get("CPU", len(operators)),
            cpu_operators=operators,
            **summary_figures(row),
        )
        return VelaCompilation(figures, compiled.read_bytes())
