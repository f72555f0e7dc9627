"""What a ``.tflite`` model needs on a device: flash (the file, and the weights in it) and RAM (the tensor arena),
from the model's execution plan, checked against what the LiteRT Interpreter itself allocates.

The arena is planned the way LiteRT's planner lays it out (TFLite Micro's greedy planner works alike): every
tensor an operator produces, and every model input and output, is live from the operator that writes it to the
last one that reads it; tensors are placed largest first, each in the smallest gap that fits it between the
tensors live at the same time, or after them. The plan is for one sample (batch 1), as a device runs it.

The check reads the interpreter's own placement: after ``allocate_tensors`` with the built-in kernels (no
delegate: XNNPACK keeps its own buffers, as a microcontroller does not), every tensor's data pointer is either in
the model's bytes (a weight, in flash) or in the arena; the arena's span is what LiteRT allocated. It also holds
the kernels' scratch tensors, which no model file lists, and leaves out tensors whose shapes are known only at
run time (LiteRT allocates those apart, while they run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ptqflow.tasks.core.native import native_output_silenced
from ptqflow.tasks.core.validation_report import ArenaCheck, DeviceFootprint

if TYPE_CHECKING:
    from ai_edge_litert.interpreter import Interpreter

    from ptqflow.tasks.core.parameters import GateParameters

TENSOR_ALIGNMENT = 64  # LiteRT's arena aligns every tensor to 64 bytes (kDefaultTensorAlignment)
CONTROL_FLOW_OPS = frozenset({"WHILE", "IF", "CALL_ONCE", "STABLEHLO_WHILE", "STABLEHLO_CASE"})


@dataclass(frozen=True)
class ExecutionPlan:
    """The main subgraph's operators in execution order, and when each activation tensor is live."""

    ops: tuple[str, ...]
    sizes: dict[int, int]  # tensor index -> bytes at batch 1
    first_use: dict[int, int]  # activation tensors: the operator that writes it (0 for model inputs)
    last_use: dict[int, int]  # the last operator that reads it (len(ops) - 1 for inputs and outputs)
    weights: frozenset[int]  # constant tensors: read by operators, written by none, not model inputs


def execution_plan(interpreter: Interpreter) -> ExecutionPlan:
    """The plan of an interpreter whose inputs are sized for one sample."""
    ops = [op for op in interpreter._get_ops_details() if op["op_name"] != "DELEGATE"]
    details = interpreter.get_tensor_details()
    sizes = {int(d["index"]): int(np.prod(d["shape"])) * np.dtype(d["dtype"]).itemsize for d in details}
    inputs = [int(d["index"]) for d in interpreter.get_input_details()]
    outputs = [int(d["index"]) for d in interpreter.get_output_details()]
    end = max(len(ops) - 1, 0)
    first_use = dict.fromkeys(inputs, 0)
    last_use = dict.fromkeys(inputs, end)  # LiteRT keeps inputs for the next invoke
    read: set[int] = set()
    for position, op in enumerate(ops):
        for index in (int(i) for i in op["outputs"] if i >= 0):
            first_use.setdefault(index, position)
            last_use[index] = max(last_use.get(index, position), position)
        for index in (int(i) for i in op["inputs"] if i >= 0):
            read.add(index)
            if index in first_use:
                last_use[index] = max(last_use[index], position)
    for index in outputs:
        last_use[index] = end
    return ExecutionPlan(
        ops=tuple(op["op_name"] for op in ops),
        sizes=sizes,
        first_use=first_use,
        last_use=last_use,
        weights=frozenset(read - set(first_use)),
    )


def aligned(size: int, alignment: int = TENSOR_ALIGNMENT) -> int:
    return -(-size // alignment) * alignment


def plan_arena(plan: ExecutionPlan, tensors: set[int] | None = None, alignment: int = TENSOR_ALIGNMENT) -> int:
    """The arena LiteRT's greedy planner lays out for ``tensors`` (default: every activation tensor), in bytes.

    As LiteRT orders them: tensors live for the whole run first (by index), then by size, largest first (ties:
    earliest first use); each goes into the smallest gap between the tensors already placed that are live at the
    same time, or after the last of them."""
    chosen = sorted(plan.first_use if tensors is None else tensors & plan.first_use.keys())
    end = max(len(plan.ops) - 1, 0)

    def whole_run(index: int) -> bool:
        return plan.first_use[index] == 0 and plan.last_use[index] == end

    order = sorted(
        chosen,
        key=lambda i: (0, i, 0, 0) if whole_run(i) else (1, 0, -plan.sizes[i], plan.first_use[i]),
    )
    placed: list[tuple[int, int, int, int]] = []  # offset, aligned size, first use, last use
    for index in order:
        size, first, last = aligned(plan.sizes[index], alignment), plan.first_use[index], plan.last_use[index]
        overlapping = sorted(p for p in placed if p[2] <= last and first <= p[3])
        best_offset, best_gap, cursor = None, None, 0
        for offset, other_size, _, _ in overlapping:
            gap = offset - cursor
            if gap >= size and (best_gap is None or gap < best_gap):
                best_offset, best_gap = cursor, gap
            cursor = max(cursor, offset + other_size)
        placed.append((cursor if best_offset is None else best_offset, size, first, last))
    return max((offset + size for offset, size, _, _ in placed), default=0)


def live_bytes(plan: ExecutionPlan) -> list[int]:
    """The bytes of activation tensors live while each operator runs (its inputs and outputs among them)."""
    live = [0] * len(plan.ops)
    for index, first in plan.first_use.items():
        for position in range(first, plan.last_use[index] + 1):
            live[position] += plan.sizes[index]
    return live


def _for_one_sample(interpreter: Interpreter) -> str | None:
    """Resize batch-dynamic inputs to one sample and allocate; why not, if the interpreter cannot."""
    try:
        for detail in interpreter.get_input_details():
            signature = detail["shape_signature"]
            if len(signature) and int(signature[0]) == -1:
                interpreter.resize_tensor_input(detail["index"], [1, *detail["shape"][1:]], strict=True)
        with native_output_silenced():
            interpreter.allocate_tensors()
    except (RuntimeError, ValueError) as error:
        reason = str(error).splitlines()[0].split(". ")[0] if str(error) else type(error).__name__
        return f"the LiteRT Interpreter cannot allocate this model ({reason[:200]})"
    return None


def interpreter_arena(interpreter: Interpreter, model: np.ndarray, plan: ExecutionPlan) -> ArenaCheck:
    """What an allocated interpreter placed in its read-write arena, against the plan of the same tensors.

    A tensor whose data lies in the model's bytes is a weight. Of the others, LiteRT keeps those that persist
    between runs (e.g. a SHAPE op's output) in a second arena allocated apart. The read-write arena is the block of
    tensors around the first input: its planner puts every tensor at offset 0 or at the end of another, so its
    tensors cover it with no gap wider than their alignment padding.
    """
    start, end = model.ctypes.data, model.ctypes.data + model.nbytes
    spans: dict[int, tuple[int, int]] = {}
    runtime_sized = 0
    for detail in interpreter.get_tensor_details():
        index = int(detail["index"])
        try:
            data = interpreter.tensor(index)()
        except ValueError:  # no data before it runs: a tensor whose shape is known only at run time
            runtime_sized += index in plan.first_use
            continue
        if not isinstance(data, np.ndarray) or data.nbytes == 0:  # a scalar comes back as a copy: no address
            continue
        address = data.ctypes.data
        if not start <= address < end:  # else a weight, read in place from the model's bytes
            spans[index] = (address, address + data.nbytes)
    anchor = spans.get(int(interpreter.get_input_details()[0]["index"]))
    if anchor is None:
        return ArenaCheck(arena_bytes=0, planned_bytes=0, runtime_sized_tensors=runtime_sized)
    arena = contiguous_block(spans, anchor)
    scratch = [e - s for i, (s, e) in arena.items() if i not in plan.first_use]
    return ArenaCheck(
        arena_bytes=max(e for _, e in arena.values()) - min(s for s, _ in arena.values()),
        planned_bytes=plan_arena(plan, set(arena)),
        scratch_tensors=len(scratch),
        largest_scratch_bytes=max(scratch, default=0),
        persistent_tensors=len(spans) - len(arena),
        runtime_sized_tensors=runtime_sized,
    )


def contiguous_block(spans: dict[int, tuple[int, int]], anchor: tuple[int, int]) -> dict[int, tuple[int, int]]:
    """The spans joined to ``anchor`` through spans no further apart than the tensor alignment."""
    ordered = sorted(spans.items(), key=lambda item: item[1])
    blocks: list[list[tuple[int, tuple[int, int]]]] = []
    block_end = None
    for index, (first, last) in ordered:
        if block_end is None or first > block_end + TENSOR_ALIGNMENT:
            blocks.append([])
            block_end = last
        blocks[-1].append((index, (first, last)))
        block_end = max(block_end, last)
    return next(dict(block) for block in blocks if anchor in (span for _, span in block))


def device_footprint(model_bytes: bytes) -> DeviceFootprint:
    """Flash and RAM of a ``.tflite`` model for one sample at a time, with the interpreter's check when it can
    allocate the model (not with TensorFlow (Flex) ops, for one)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # The interpreter reads its weights in place from these bytes (a view of them, not a copy): how the check
    # tells a weight from an arena tensor.
    model = np.frombuffer(model_bytes, dtype=np.uint8)
    interpreter = Interpreter(
        model_content=model_bytes,
        num_threads=1,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    unallocated = _for_one_sample(interpreter)
    plan = execution_plan(interpreter)
    live = live_bytes(plan)
    notes = []
    control_flow = sorted(set(plan.ops) & CONTROL_FLOW_OPS)
    if control_flow:
        notes.append(f"the model runs subgraphs ({', '.join(control_flow)}); their tensors are not in these figures")
    if unallocated:
        notes.append(unallocated)
    check = None if unallocated else interpreter_arena(interpreter, model, plan)
    return DeviceFootprint(
        flash_bytes=len(model_bytes),
        weight_bytes=sum(plan.sizes[i] for i in plan.weights),
        arena_bytes=plan_arena(plan),
        peak_live_bytes=max(live, default=0),
        ops=list(plan.ops),
        live_bytes=live,
        interpreter=check,
        note="; ".join(notes) or None,
    )


def in_kib(size: int) -> str:
    return f"{size / 1024:,.1f} KiB ({size:,} B)"


@dataclass(frozen=True)
class Footprint:
    """What one target needs of a device, as its own runtime or compiler measured it."""

    target: str  # in words: "LiteRT", "TFLite Micro", "ethos-u55-128"
    flash_bytes: int | None
    ram_bytes: int | None
    ram_figure: str  # what the RAM figure is: "its tensor arena (planned)", "the arena TFLM's allocator needs"
    flash_figure: str = "its .tflite"


def litert_footprint(flash_bytes: int, arena_bytes: int | None) -> Footprint:
    return Footprint("LiteRT", flash_bytes, arena_bytes, "its tensor arena")


def footprint_problems(footprints: Sequence[Footprint], gate: GateParameters) -> list[tuple[str, str]]:
    """What does not fit ``--ram-budget`` or ``--flash-budget`` on each target, each with what would help."""
    problems = []
    several = len(footprints) > 1
    for footprint in footprints:
        on = f"on {footprint.target}, " if several or footprint.target != "LiteRT" else ""
        if gate.ram_budget is not None:
            if footprint.ram_bytes is None:
                problems.append(
                    (
                        f"{on}{footprint.ram_figure} was not measured",
                        "validate it again (a record from before ptqflow measured it)",
                    )
                )
            elif footprint.ram_bytes > gate.ram_budget:
                problems.append(
                    (
                        f"{on}{footprint.ram_figure} needs {in_kib(footprint.ram_bytes)}, over --ram-budget "
                        f"{in_kib(gate.ram_budget)}",
                        "a smaller input (--image-size) or narrower layers need less, or raise --ram-budget",
                    )
                )
        if gate.flash_budget is not None and footprint.flash_bytes is not None:
            if footprint.flash_bytes > gate.flash_budget:
                problems.append(
                    (
                        f"{on}{footprint.flash_figure} is {in_kib(footprint.flash_bytes)}, over --flash-budget "
                        f"{in_kib(gate.flash_budget)}",
                        "fewer weights, or int8 weights in every layer (none kept in float by repair), store less; "
                        "or raise --flash-budget",
                    )
                )
    return problems


def budget_problems(flash_bytes: int, arena_bytes: int | None, gate: GateParameters) -> list[tuple[str, str]]:
    """What does not fit ``--ram-budget`` or ``--flash-budget`` on LiteRT, each with what would help."""
    return footprint_problems([litert_footprint(flash_bytes, arena_bytes)], gate)


def over_budget(footprints: Sequence[Footprint], gate: GateParameters) -> str | None:
    """Why a model does not fit the device budgets, with what would help; None if it fits."""
    problems = footprint_problems(footprints, gate)
    return "; ".join(f"{what}: {fix}" for what, fix in problems) or None
