"""Which TensorFlow, Keras and LiteRT are installed, checked before TensorFlow is imported.

pip treats ``tensorflow``, ``tensorflow-cpu`` and the other builds as different projects, although each writes the
same ``tensorflow`` package: with two installed, the later one has overwritten part of the earlier, and TensorFlow
fails far from the cause (an undefined symbol in a converter extension, a missing op). So ptqflow names the
conflict and the fix before anything imports TensorFlow, and refuses versions outside the range it is tested on.
"""

from __future__ import annotations

import importlib.util
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata

from packaging.version import InvalidVersion, Version

from ptqflow.storage.errors import PtqflowError
from ptqflow.tasks.core.parameters import DeviceTarget

# Tested in .ci/run at both ends: the whole suite on the newest, a smoke subset on the oldest (with the oldest
# Keras and LiteRT pyproject.toml allows). pyproject.toml's extras carry the same range.
OLDEST_TENSORFLOW = Version("2.18")
NEWEST_TENSORFLOW = Version("2.21")  # the newest minor release tested: 2.21.x
INSTALL_FIX = "pip install 'ptqflow[tensorflow]' (or 'ptqflow[tensorflow-cpu]' for the CPU-only build)"


class UnsupportedInstall(ImportError):
    """The environment's TensorFlow cannot run ptqflow; the message says how to fix it."""


@dataclass(frozen=True)
class Distribution:
    name: str
    version: str


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _provides_tensorflow(dist: metadata.Distribution) -> bool:
    top_level = dist.read_text("top_level.txt")
    if top_level is not None:
        return "tensorflow" in top_level.split()
    # Wheels without top_level.txt: their file list says where they install.
    return any(str(path).startswith("tensorflow/") for path in dist.files or ())


@lru_cache(maxsize=1)
def tensorflow_distributions() -> tuple[Distribution, ...]:
    """Every installed distribution that writes the top-level ``tensorflow`` package (a metapackage that only
    depends on another build writes none, so it is not counted)."""
    found: dict[str, Distribution] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and _canonical(name).startswith(("tensorflow", "tf-nightly", "intel-tensorflow")):
            if _provides_tensorflow(dist):
                found[_canonical(name)] = Distribution(_canonical(name), dist.version)
    return tuple(sorted(found.values(), key=lambda d: d.name))


def tensorflow_problem(installed: tuple[Distribution, ...]) -> str | None:
    """What is wrong with these TensorFlow distributions for ptqflow, with the fix; None when nothing is."""
    if not installed:
        return f"TensorFlow is not installed: {INSTALL_FIX}"
    if len(installed) > 1:
        names = " ".join(d.name for d in installed)
        listed = ", ".join(f"{d.name} {d.version}" for d in installed)
        return (
            f"{len(installed)} distributions install the same tensorflow package ({listed}), so it is a mix of "
            f"both: pip uninstall -y {names}, then install one (pip install 'tensorflow>={OLDEST_TENSORFLOW},"
            f"<{_next_minor(NEWEST_TENSORFLOW)}', or the build you use)"
        )
    (dist,) = installed
    try:
        version = Version(dist.version)
    except InvalidVersion:
        return None  # a local build with its own version scheme: let it try
    release = Version(f"{version.major}.{version.minor}")
    if not OLDEST_TENSORFLOW <= release <= NEWEST_TENSORFLOW:
        return (
            f"{dist.name} {dist.version} is outside the versions ptqflow is tested on ({OLDEST_TENSORFLOW} to "
            f"{NEWEST_TENSORFLOW}.x): pip install '{dist.name}>={OLDEST_TENSORFLOW},<{_next_minor(NEWEST_TENSORFLOW)}'"
        )
    return None


def _next_minor(version: Version) -> str:
    return f"{version.major}.{version.minor + 1}"


def check_tensorflow_install() -> None:
    """Raise UnsupportedInstall unless exactly one supported TensorFlow distribution is installed.

    Raises:
        UnsupportedInstall: no TensorFlow, two builds over each other, or a version outside the tested range.
    """
    problem = tensorflow_problem(tensorflow_distributions())
    if problem:
        raise UnsupportedInstall(problem)


def missing_private_api(what: str, works_with: str) -> str:
    """The message for a TensorFlow or Keras internal ptqflow relies on that this installation lacks."""
    installed = ", ".join(f"{d.name} {d.version}" for d in tensorflow_distributions()) or "no TensorFlow"
    return f"{what} is missing from this installation ({installed}); it works with {works_with}: {INSTALL_FIX}"


class TargetRuntimeMissing(PtqflowError):
    """A device target's runtime or compiler is not installed here; the message says where it can run."""


def target_runtime_problem(targets: Sequence[DeviceTarget]) -> str | None:
    """Why a device target the run names cannot be measured here, with the fix; None when each can."""
    if DeviceTarget.tflm in targets and importlib.util.find_spec("tflite_micro") is None:
        return (
            "--target tflm needs TensorFlow Lite Micro's interpreter (the tflite-micro package), which is published "
            f"for Linux x86-64 only (this machine: {platform.system()} {platform.machine()}): run it on a Linux "
            "x86-64 machine or work pool, or pip install 'tflite-micro>=0.dev20261001' where it is available"
        )
    npu = [t.value for t in targets if t.npu]
    if npu and importlib.util.find_spec("ethosu") is None:
        return f"--target {npu[0]} needs Arm's Vela compiler: pip install 'ethos-u-vela>=5.2,<6'"
    return None


def require_target_runtimes(targets: Sequence[DeviceTarget]) -> None:
    """Check that every target the run names can be measured here, before anything runs.

    Raises:
        TargetRuntimeMissing: a target's runtime or compiler is not installed.
    """
    problem = target_runtime_problem(targets)
    if problem is not None:
        raise TargetRuntimeMissing(problem)
