"""TensorFlow Lite Micro, the runtime of microcontrollers, run from Python (the ``tflite-micro`` package: TFLM's own
interpreter, reference kernels and allocator, built for the host).

Two figures only TFLM can give: its outputs (its reference kernels are not LiteRT's optimized ones, so a row can
differ by a few quantization steps), and the tensor arena it needs. TFLM allocates everything a model needs from
one buffer the firmware declares (``kTensorArenaSize``): the activations, planned and reused (the arena's head),
and what it keeps for the model's lifetime (its tail: eval tensors, per-channel multipliers and shifts, node
structs). Its recording allocator reports both; the arena firmware declares is the smallest TFLM allocates the model
in, found by allocating it (usually the recorded figure; more when an operator takes temporary memory while it is
prepared, which the recorder does not count).

TFLM runs in a child process (``python -m ptqflow.tasks.evaluation.tflm FOLDER``): its kernels abort the process
when a check fails (a softmax whose input scale its fixed-point arithmetic cannot take, for one), and that must be
a failed gate with a reason, not a validation stage killed with no message.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptqflow.storage.tables import InputSlot
from ptqflow.tasks.core.artifacts import ModelOutput, TargetFidelity, TflmFigures
from ptqflow.tasks.core.native import native_output_captured
from ptqflow.tasks.core.parameters import ModelTask
from ptqflow.tasks.evaluation.device import device_footprint
from ptqflow.tasks.evaluation.interpreter import (
    dequantize_output,
    make_interpreter,
    predict_tflite,
    refused_rows,
)
from ptqflow.tasks.evaluation.metrics import task_figures
from ptqflow.tasks.models.feeds import input_details, input_parts, quantize_input, tflite_input_indices
from ptqflow.tasks.models.outputs import flatten_outputs, tflite_output_order

SUBSET_SEED = 0  # the draw of --tflm-samples rows: the same rows in every run of the same test split
ALLOCATION = re.compile(r"Arena allocation (total|head|tail) (\d+) bytes")


def tflm_version() -> str:
    return f"tflite-micro {importlib.metadata.version('tflite-micro')}"


class TflmCannotRun(Exception):
    """TFLM cannot allocate or run the model; the message is TFLM's own first line, with what would avoid it."""


@dataclass(frozen=True)
class TflmArena:
    total_bytes: int  # the smallest arena TFLM allocates the model in (16-byte steps): what firmware declares
    head_bytes: int  # as its recording allocator reports them, after allocating
    tail_bytes: int

    @property
    def recorded_bytes(self) -> int:
        return self.head_bytes + self.tail_bytes


def _interpreter(model_bytes: bytes, arena_size: int) -> Any:
    from tflite_micro.python.tflite_micro import runtime

    return runtime.Interpreter.from_bytes(model_bytes, arena_size=arena_size)


def _first_line(error: Exception, printed: list[str]) -> str:
    """TFLM's reason: the first line it printed that says what failed (its exception only says that it did)."""
    reasons = [line.strip() for line in printed if line.strip() and "RecordingMicroAllocator" not in line]
    return (reasons[0] if reasons else str(error).splitlines()[0] if str(error) else type(error).__name__)[:300]


def generous_arena(model_bytes: bytes) -> int:
    """An arena far larger than the model needs: twice its planned activations (``tasks.evaluation.device``) and
    twice the file (what TFLM keeps per weight is less than the weight), and a mebibyte. Too small an arena can
    abort TFLM rather than fail, so this errs large."""
    return 2 * (device_footprint(model_bytes).arena_bytes + len(model_bytes)) + (1 << 20)


def recorded_arena(model_bytes: bytes) -> TflmArena:
    """The arena TFLM's recording allocator reports after allocating the model in a generous one: its head and
    tail (``total_bytes`` is their sum here; ``smallest_arena`` finds what allocation itself needs).

    Raises:
        TflmCannotRun: TFLM cannot allocate the model (an operator it lacks, a tensor type it does not take).
    """
    with native_output_captured() as printed:
        try:
            interpreter = _interpreter(model_bytes, generous_arena(model_bytes))
            interpreter.print_allocations()
        except (RuntimeError, ValueError) as error:
            failure: Exception | None = error
        else:
            failure = None
    if failure is not None:
        raise TflmCannotRun(_first_line(failure, printed))
    figures = {kind: int(size) for line in printed for kind, size in ALLOCATION.findall(line)}
    if "head" not in figures or "tail" not in figures:
        raise TflmCannotRun(f"TFLM reported no arena allocation ({' / '.join(printed[:3])[:200]})")
    return TflmArena(figures["head"] + figures["tail"], figures["head"], figures["tail"])


# Allocating in an arena a few bytes too small can abort TFLM rather than fail: each try is a process of its own.
ALLOCATE = (
    "import sys\n"
    "from tflite_micro.python.tflite_micro import runtime\n"
    "runtime.Interpreter.from_bytes(open(sys.argv[1], 'rb').read(), arena_size=int(sys.argv[2]))\n"
)
ARENA_STEP = 16  # TFLM aligns its allocations to 16 bytes, as firmware aligns the arena


def allocates_in(model_path: Path, arena_bytes: int) -> bool:
    done = subprocess.run(
        [sys.executable, "-c", ALLOCATE, str(model_path), str(arena_bytes)],
        capture_output=True,
        timeout=TFLM_SECONDS_FIXED,
        check=False,
        cwd=model_path.parent,  # -c puts the working directory first on the path: not the user's
    )
    return done.returncode == 0


def smallest_arena(model_path: Path, recorded: int) -> int:
    """The smallest arena, in ``ARENA_STEP`` steps from the recorded figure, that TFLM allocates the model in.
    Usually the recorded figure itself; more when operators take temporary memory while they are prepared, which
    the recording allocator does not count.

    Raises:
        TflmCannotRun: not even a generous arena allocates the model.
    """
    low = -(-recorded // ARENA_STEP) * ARENA_STEP
    if allocates_in(model_path, low):
        return low
    high, extra = low, ARENA_STEP
    while not allocates_in(model_path, high := low + extra):
        if extra > max(recorded, 1 << 20):
            raise TflmCannotRun(f"TFLM reported a {recorded:,} B arena but cannot allocate in {high:,} B")
        extra *= 4
    while high - low > ARENA_STEP:  # low fails, high allocates
        middle = low + (high - low) // 2 // ARENA_STEP * ARENA_STEP
        if allocates_in(model_path, middle):
            high = middle
        else:
            low = middle
    return high


def predict_tflm(
    model_bytes: bytes, features: np.ndarray, arena_bytes: int, inputs: tuple[InputSlot, ...] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """TFLM's outputs for ``features``, one sample at a time as a device runs them: dequantized (several outputs
    side by side, flattened, in the Keras model's order, as ``predict_tflite`` gives them), and each column's
    quantization step (0 for a float output), to count differences in steps.

    Inputs are quantized with each input tensor's own scale and zero point, read from the model, the same way as
    for LiteRT, so that the two runtimes see the same integers.

    Raises:
        TflmCannotRun: an operator fails while running.
    """
    litert = make_interpreter(model_bytes, 1)  # the model's tensors, names and order, read by LiteRT
    input_positions = {int(d["index"]): i for i, d in enumerate(litert.get_input_details())}
    indices = tflite_input_indices(litert, inputs)
    details = input_details(litert, indices)
    output_positions = {int(d["index"]): i for i, d in enumerate(litert.get_output_details())}
    by_index = {int(d["index"]): d for d in litert.get_output_details()}
    order = [int(i) for i in tflite_output_order(litert)]
    rows = []
    failure: Exception | None = None
    with native_output_captured() as printed:  # TFLM reports a failing kernel there; its exception says only that
        interpreter = _interpreter(model_bytes, arena_bytes)
        for sample in features.astype(np.float32):
            for part, detail, index in zip(input_parts(sample[None], inputs), details, indices):
                shaped = part.reshape((1, *detail["shape"][1:]))
                interpreter.set_input(quantize_input(shaped, detail), input_positions[index])
            try:
                interpreter.invoke()
            except (RuntimeError, ValueError) as error:
                failure = error
                break
            results = [dequantize_output(interpreter.get_output(output_positions[i]), by_index[i]) for i in order]
            rows.append(results[0] if len(results) == 1 else flatten_outputs(results))
    if failure is not None:
        raise TflmCannotRun(_first_line(failure, printed)) from failure
    steps = output_steps(litert)
    return (np.concatenate(rows) if rows else np.zeros((0, len(steps)), np.float32)), steps


def output_steps(litert: Any) -> np.ndarray:
    """The quantization step of each output column of the model ``litert`` (a LiteRT interpreter) holds (several
    outputs side by side, flattened, in the Keras model's order), 0 for a float output: differences between
    runtimes are counted in steps."""
    by_index = {int(d["index"]): d for d in litert.get_output_details()}
    steps = []
    for i in (int(i) for i in tflite_output_order(litert)):
        scale = by_index[i]["quantization"][0] if np.dtype(by_index[i]["dtype"]).kind != "f" else 0.0
        steps.append(np.full(int(np.prod(by_index[i]["shape"][1:])), scale, np.float64))
    return np.concatenate(steps)


# A hung child must not hold the run; reference kernels take up to seconds per sample on a large model (0.65 s for a
# MobileNetV2 here), so the limit grows with the rows.
TFLM_SECONDS_FIXED, TFLM_SECONDS_PER_SAMPLE = 120, 30


@dataclass(frozen=True)
class TflmRun:
    arena: TflmArena
    outputs: np.ndarray
    steps: np.ndarray


def run_isolated(
    model_bytes: bytes, features: np.ndarray, inputs: tuple[InputSlot, ...] = (), smallest: bool = True
) -> TflmRun:
    """``recorded_arena`` and ``predict_tflm`` in a child process, then ``smallest_arena`` (unless not
    ``smallest``: the arena is then the recorded one, as for a shard of the test split, whose arena is measured
    once elsewhere).

    Raises:
        TflmCannotRun: TFLM refused the model, or stopped the process (the phase it was in is named).
    """
    with tempfile.TemporaryDirectory(prefix="ptqflow-tflm-") as folder:
        work = Path(folder)
        (work / "model.tflite").write_bytes(model_bytes)
        np.save(work / "features.npy", features, allow_pickle=False)
        slots = [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in inputs]
        (work / "inputs.json").write_text(json.dumps(slots))
        limit = TFLM_SECONDS_FIXED + TFLM_SECONDS_PER_SAMPLE * len(features)
        try:
            done = subprocess.run(
                [sys.executable, "-m", __name__, str(work)],
                capture_output=True,
                text=True,
                timeout=limit,
                check=False,
                # -m puts the working directory first on the path: the user's (a checkout of ptqflow, say) would
                # shadow the installed package.
                cwd=work,
            )
        except subprocess.TimeoutExpired:
            raise TflmCannotRun(f"TFLM ran over {limit} s (--tflm-samples runs fewer rows)") from None
        phase = (work / "phase").read_text() if (work / "phase").exists() else "starting"
        if (work / "refused").exists():
            raise TflmCannotRun((work / "refused").read_text())
        if done.returncode != 0 or not (work / "outputs.npy").exists():
            how = (
                f"signal {signal.Signals(-done.returncode).name}"
                if done.returncode < 0
                else f"exit status {done.returncode}"
            )
            last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "")
            raise TflmCannotRun(
                f"TFLM stopped with {how} while {phase} (a kernel's check failed, e.g. a scale its fixed-point "
                f"arithmetic cannot take){': ' + last[:200] if last else ''}"
            )
        recorded = json.loads((work / "arena.json").read_text())
        head, tail = int(recorded["head"]), int(recorded["tail"])
        return TflmRun(
            TflmArena(smallest_arena(work / "model.tflite", head + tail) if smallest else head + tail, head, tail),
            np.load(work / "outputs.npy", allow_pickle=False),
            np.load(work / "steps.npy", allow_pickle=False),
        )


def _child(folder: Path) -> None:
    """The child process of ``run_isolated``: the results, or TFLM's refusal, as files in ``folder``."""
    phase = folder / "phase"
    model = (folder / "model.tflite").read_bytes()
    features = np.load(folder / "features.npy", allow_pickle=False)
    inputs = tuple(
        InputSlot(s["name"], tuple(s["shape"]), s["dtype"]) for s in json.loads((folder / "inputs.json").read_text())
    )
    try:
        phase.write_text("allocating the model (preparing its operators)")
        arena = recorded_arena(model)
        phase.write_text("running the test samples")
        outputs, steps = predict_tflm(model, features, generous_arena(model), inputs)
    except TflmCannotRun as refusal:
        (folder / "refused").write_text(str(refusal))
        return
    (folder / "arena.json").write_text(json.dumps({"head": arena.head_bytes, "tail": arena.tail_bytes}))
    np.save(folder / "outputs.npy", outputs, allow_pickle=False)
    np.save(folder / "steps.npy", steps, allow_pickle=False)


def tflm_rows(count: int, samples: int | None) -> tuple[np.ndarray, int | None]:
    """The test rows TFLM runs of a split of ``count`` rows: all, or a seeded draw of ``samples`` (the same rows
    in every run of the same split, whichever shard runs them); and the draw's seed."""
    if samples is None or samples >= count:
        return np.arange(count), None
    return np.sort(np.random.default_rng(SUBSET_SEED).choice(count, samples, replace=False)), SUBSET_SEED


@dataclass(frozen=True)
class TflmRows:
    """TFLM on some of the rows it runs (a shard's): their positions in the test split, LiteRT's outputs there,
    and TFLM's, or TFLM's reason for running none. Rows LiteRT refuses are left out, as in one process. ``arena``:
    the one TFLM needs, when it was measured with these rows (all the rows TFLM runs, in one child process)."""

    rows: np.ndarray
    litert: np.ndarray
    outputs: np.ndarray | None
    refusal: str | None = None
    arena: TflmArena | None = None

    @classmethod
    def joined(cls, parts: list[TflmRows]) -> TflmRows:
        """Consecutive parts, in row order, as one: the first refusal in row order, as one process meets it."""
        refusal = next((part.refusal for part in parts if part.refusal is not None), None)
        return cls(
            rows=np.concatenate([part.rows for part in parts]),
            litert=np.concatenate([part.litert for part in parts]),
            outputs=None if refusal else np.concatenate([part.outputs for part in parts if part.outputs is not None]),
            refusal=refusal,
            arena=parts[0].arena if len(parts) == 1 else None,
        )


def tflm_on_rows(
    model_bytes: bytes,
    features: np.ndarray,
    rows: np.ndarray,
    inputs: tuple[InputSlot, ...] = (),
    litert: np.ndarray | None = None,
    arena: bool = False,
) -> TflmRows:
    """TFLM's outputs on ``features`` (the test rows at positions ``rows``) that LiteRT runs (``litert``: its
    outputs there, when known; NaN where it refused), in a child process; with ``arena``, also the smallest arena
    TFLM runs the model in (``smallest_arena``: when these are all the rows TFLM runs)."""
    if litert is None:
        litert = predict_tflite(model_bytes, features, inputs=inputs, failures=[])
    runnable = ~refused_rows(litert)
    rows, features, litert = rows[runnable], features[runnable], litert[runnable].reshape(int(runnable.sum()), -1)
    try:
        done = run_isolated(model_bytes, features, inputs, smallest=arena)
    except TflmCannotRun as error:
        return TflmRows(rows, litert, None, str(error))
    return TflmRows(rows, litert, done.outputs.reshape(len(rows), -1), arena=done.arena if arena else None)


def tflm_figures(
    model_bytes: bytes,
    features: np.ndarray,
    labels: np.ndarray,
    reference: np.ndarray,
    task: ModelTask,
    layout: tuple[ModelOutput, ...] = (),
    inputs: tuple[InputSlot, ...] = (),
    samples: int | None = None,
    ran: TflmRows | None = None,
) -> TflmFigures:
    """The model on TFLM: its arena, and its task's figures on the test rows (all, or a seeded draw of ``samples``,
    ``tflm_rows``) against the float model's outputs there (``reference``), beside LiteRT's outputs on the same
    rows. ``ran``: TFLM's outputs on those rows, run shard by shard elsewhere; then only the arena is measured here.
    A model TFLM cannot allocate or run gives figures with ``ran`` False and TFLM's reason."""
    rows, seed = tflm_rows(len(features), samples)
    if ran is None:  # in one child process, the arena with the outputs
        ran = tflm_on_rows(model_bytes, features[rows], rows, inputs, arena=True)
    return figures_on_tflm(
        model_bytes, ran, labels[ran.rows], reference[ran.rows], task, layout, inputs, seed, features[:0]
    )


def figures_on_tflm(
    model_bytes: bytes,
    ran: TflmRows,
    labels: np.ndarray,
    reference: np.ndarray,
    task: ModelTask,
    layout: tuple[ModelOutput, ...],
    inputs: tuple[InputSlot, ...],
    seed: int | None,
    no_rows: np.ndarray,
) -> TflmFigures:
    """``tflm_figures`` from TFLM's outputs (``ran``) and the labels and float model's outputs of the rows it ran
    (``labels``, ``reference``); the arena is measured here unless ``ran`` holds it (``no_rows``: the features'
    shape, with no row)."""
    runtime = tflm_version()
    interpreter = make_interpreter(model_bytes, 1)
    ops = tuple(sorted({op["op_name"] for op in interpreter._get_ops_details()} - {"DELEGATE"}))
    arena = ran.arena
    refusal = ran.refusal
    if refusal is None and arena is None:
        try:
            arena = run_isolated(model_bytes, no_rows, inputs).arena
        except TflmCannotRun as error:
            refusal = str(error)
    if refusal is not None or arena is None or ran.outputs is None:
        return TflmFigures(runtime=runtime, ran=False, not_run_reason=refusal, samples=0, subset_seed=seed, ops=ops)
    steps = output_steps(interpreter)
    rows, litert, outputs = ran.rows, ran.litert, ran.outputs
    figures = task_figures(task, reference, outputs, labels, layout)
    mine = outputs.reshape(len(rows), -1)
    quantized = steps > 0
    differences = np.abs(mine[:, quantized].astype(np.float64) - litert[:, quantized]) / steps[quantized]
    return TflmFigures(
        runtime=runtime,
        ran=True,
        samples=len(rows),
        subset_seed=seed,
        arena_bytes=arena.total_bytes,
        arena_head_bytes=arena.head_bytes,
        arena_tail_bytes=arena.tail_bytes,
        ops=ops,
        figures=TargetFidelity(**{f.name: getattr(figures, f.name) for f in dataclasses.fields(figures)}),
        identical_to_litert=round(float((mine == litert).all(axis=1).mean()), 6) if len(rows) else None,
        max_difference_lsb=round(float(differences.max()), 3) if differences.size else 0.0,
    )


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
