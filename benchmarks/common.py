"""What every benchmark shares: timing by medians, the machine's description, and the result record."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclass
class Result:
    """One benchmark: our figure and the baseline's, measured in the same run, and their ratio.

    ``ratio`` is always "how many times better ours is" (baseline / ours for times and memory, ours / baseline
    for throughput), so a target reads the same way everywhere."""

    name: str
    metric: str
    unit: str
    ours: float
    baseline: float
    ratio: float
    target: str
    met: bool | None
    ours_label: str = "ptqflow"
    baseline_label: str = "seed tutorial"
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma"})
    except OSError:
        pass
    return []


def machine() -> dict[str, Any]:
    memory_gib = None
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    versions = {}
    for dist in ("tensorflow-cpu", "tensorflow", "keras", "ai-edge-litert", "numpy", "pyarrow", "prefect", "fsspec"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libraries": versions,
    }


def digits_model_and_splits(epochs: int = 8):
    """The default CNN trained briefly on the built-in digits (quick, deterministic)."""
    from ptqflow.tasks.core.parameters import SamplingParameters, TrainingParameters
    from ptqflow.tasks.data.datasets import load_dataset
    from ptqflow.tasks.data.sampling import feature_spec, split_dataset
    from ptqflow.tasks.models.training import fit_default_model

    table = load_dataset("digits")
    splits = split_dataset(table, SamplingParameters(), seed=0)
    model, _ = fit_default_model(
        feature_spec(table), splits["train"], splits["validation"], TrainingParameters(epochs=epochs), seed=0
    )
    return model, splits


def rss_bytes() -> int:
    """This process's resident set size now (Linux)."""
    with open("/proc/self/statm", encoding="utf-8") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def json_from_fresh_process(module: str, *args: str) -> dict[str, Any]:
    """Run ``python -m module args`` in a fresh process (its memory is its own) and read the JSON object it prints
    last."""
    import json
    import subprocess
    import sys

    completed = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def quantize_in_batches(model, calibration, options=None) -> bytes:
    """``model`` quantized as ptqflow ships it (batch 1), its calibration set streamed in batches of 8."""
    from ptqflow.tasks.core.parameters import ConversionParameters
    from ptqflow.tasks.quantization.converter import quantize

    return quantize(
        model,
        lambda: (calibration[i : i + 8] for i in range(0, len(calibration), 8)),
        options or ConversionParameters(),
    )
