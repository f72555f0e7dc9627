"""The accuracy gate: a validation's figures against the run's thresholds, as a ``GateResult`` whose message
says what failed and what would help."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, computed_field

from ptqflow.tasks.core.artifacts import NpuFigures, RepairResult, TflmFigures, ValidationFigures, WorstLayer
from ptqflow.tasks.core.parameters import DeviceTarget, GateParameters, ModelTask, TargetOps
from ptqflow.tasks.evaluation.device import Footprint, litert_footprint, over_budget
from ptqflow.tasks.evaluation.fidelity import judge_fidelity, refusals, unrunnable_share


class GateStatus(str, Enum):
    passed = "passed"
    failed = "failed"
    not_validated = "not_validated"  # the model could not be run here: never a pass

    def __str__(self) -> str:
        return self.value


class GateResult(BaseModel):
    """The accuracy gate: a named check with its threshold and observation, reported whether it passes or not."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(
        description="The check that decided: accuracy_drop (classification), error_increase (regression), "
        "float_fidelity (unlabeled), repeatable, device_runtime (a target's runtime or compiler refused the model), "
        "device_fidelity (TFLite Micro's outputs fail the gate), npu_coverage (--min-npu-ops), device_budget "
        "(--ram-budget, --flash-budget) or sweep."
    )
    status: GateStatus
    observed_drop_pp: float | None
    max_drop_pp: float
    message: str

    @computed_field  # type: ignore[prop-decorator]
    @property
    def passed(self) -> bool:
        return self.status is GateStatus.passed


def describe_layers(layers: Sequence[WorstLayer], count: int = 3) -> str:
    """``layer (op, badness b)`` for the worst ``count`` layers."""
    return ", ".join(f"{w.layer} ({w.op}, badness {w.badness:.1f})" for w in layers[:count])


def not_validated(name: str, result: ValidationFigures, max_accuracy_drop: float) -> GateResult:
    """The verdict on a model that could not run here: never a pass."""
    return GateResult(
        name=name,
        status=GateStatus.not_validated,
        observed_drop_pp=None,
        max_drop_pp=max_accuracy_drop,
        message=f"not validated: {result.not_validated_reason}",
    )


def not_repeatable(result: ValidationFigures, max_accuracy_drop: float) -> GateResult:
    return GateResult(
        name="repeatable",
        status=GateStatus.failed,
        observed_drop_pp=result.accuracy_drop_pp,
        max_drop_pp=max_accuracy_drop,
        message=f"gate failed: the quantized model's outputs differ by up to {result.rerun_max_difference:.3g} "
        "between two runs on the same input (a LiteRT kernel is not deterministic for this model): quantize it "
        "another way, e.g. with per-channel weights or full integer (`ptqflow sweep` compares them)",
    )


def check_accuracy_gate(
    result: ValidationFigures,
    max_accuracy_drop: float,
    ops: TargetOps | None = None,
    repair: RepairResult | None = None,
) -> GateResult:
    """Judge a validation: pass within ``max_accuracy_drop``; on failure name the worst layers and what would help
    (with ``--ops int8`` no layer can stay float, so repair is impossible and the message says which options allow
    it); after a repair, say what stayed float."""
    if not result.validated or result.accuracy_drop_pp is None:
        return not_validated("accuracy_drop", result, max_accuracy_drop)
    if result.rerun_max_difference:
        return not_repeatable(result, max_accuracy_drop)
    passed = result.accuracy_drop_pp <= max_accuracy_drop
    observed = (
        f"quantized accuracy {result.quantized_accuracy:.2%} is {result.accuracy_drop_pp:.2f} pp below float "
        f"({result.float_accuracy:.2%})"
    )
    repaired = repair is not None and repair.succeeded
    if passed:
        message = (
            f"accuracy gate passed{' after repair' if repaired else ''}: {observed}, within {max_accuracy_drop} pp"
        )
        if repair is not None and repair.succeeded:
            message += f"; {repair.changed()}"
    else:
        message = f"accuracy gate failed: {observed}, more than the {max_accuracy_drop} pp allowed"
        if result.worst_layers:
            message += f"; worst layers: {describe_layers(result.worst_layers)}"
        if repair is not None and (repair.mixed is not None or ops is TargetOps.int8):  # an int16 repair
            message += (
                f"; {repair.message}: allow more int16 layers (--max-int16-fraction), calibrate on more samples "
                "(--calibration-size), or raise --max-accuracy-drop"
            )
        elif ops is TargetOps.int8:
            message += (
                "; --ops int8 cannot keep a layer in float, so it cannot be repaired in float: raise the worst layers "
                "to int16 instead (--repair, with int8 I/O: the model stays integer-only), rerun with --ops builtins "
                "(repair then keeps the worst layers in float), calibrate on more samples (--calibration-size), "
                "or raise --max-accuracy-drop"
            )
        elif repair is not None:
            message += (
                f"; {repair.message}: allow more float layers (--max-float-layers), calibrate on more samples "
                "(--calibration-size), or raise --max-accuracy-drop"
            )
        else:
            message += (
                ": calibrate on more samples (--calibration-size), keep the worst layers in float (--ops builtins "
                "--repair), or raise --max-accuracy-drop"
            )
    return GateResult(
        name="accuracy_drop",
        status=GateStatus.passed if passed else GateStatus.failed,
        observed_drop_pp=result.accuracy_drop_pp,
        max_drop_pp=max_accuracy_drop,
        message=message,
    )


FIDELITY_GATES = ("accuracy_drop", "error_increase", "float_fidelity")  # the gates repair can help pass


def check_gate(
    result: ValidationFigures,
    gate: GateParameters,
    ops: TargetOps | None = None,
    repair: RepairResult | None = None,
) -> GateResult:
    """Judge a validation by its task's figure (``tasks.evaluation.fidelity``), then, if it passes, on each device
    target the run names (``--target``): TFLite Micro must run the model and meet the same gate, Vela must compile
    it (and place ``--min-npu-ops`` of it on the NPU), and each target's measured RAM and flash must fit
    ``--ram-budget`` and ``--flash-budget``. A model that fails there fails as ``device_runtime``,
    ``device_fidelity``, ``npu_coverage`` or ``device_budget``, the message naming every problem."""
    verdict = check_fidelity_gate(result, gate, ops, repair)
    if not result.validated:
        return verdict
    problems = integer_problems(result, ops) + unrunnable_problems(result, gate)
    problems += target_problems(result.targets, result.tflm, result.npu, gate)
    over = over_budget(
        target_footprints(result.targets, result.tflm, result.npu, result.quantized_bytes, result.arena_bytes), gate
    )
    if over is not None:
        problems.append(("device_budget", over))
    if not problems:
        return verdict
    if not verdict.passed:
        also = "; ".join(f"it does not fit the device: {m}" if n == "device_budget" else m for n, m in problems)
        return verdict.model_copy(update={"message": f"{verdict.message}; and {also}"})
    described = "; ".join(message for _, message in problems)
    name = problems[0][0]
    titles = {
        "device_budget": "device budget failed",
        "unrunnable_samples": "gate failed",
        "full_integer": "gate failed",
    }
    title = titles.get(name, "device gate failed")
    return verdict.model_copy(
        update={"name": name, "status": GateStatus.failed, "message": f"{title}: {described}; {verdict.message}"}
    )


def integer_problems(result: ValidationFigures, ops: TargetOps | None) -> list[tuple[str, str]]:
    """Under ``--ops int8``, operators left in float: the conversion refuses such a model, and so does the gate, for
    one that reached it another way."""
    if ops is not TargetOps.int8 or not result.floats_not_asked_for:
        return []
    return [
        (
            "full_integer",
            f"--ops int8 asks for a full-integer model, and {', '.join(result.floats_not_asked_for)} run in float: "
            "replace those ops in the model, or allow float operators with --ops builtins",
        )
    ]


def unrunnable_problems(result: ValidationFigures, gate: GateParameters) -> list[tuple[str, str]]:
    """The samples a model refused to run, when they are more than ``--max-unrunnable-fraction`` of the test split."""
    share = unrunnable_share(result)
    if not result.unrunnable_rows or share <= gate.max_unrunnable_fraction:
        return []
    return [
        (
            "unrunnable_samples",
            f"{refusals(result)}: {share:.1%} of the test split cannot run, over --max-unrunnable-fraction "
            f"{gate.max_unrunnable_fraction:g}; keep the failing operator's input away from what int8 cannot take "
            "(e.g. add to a divisor an epsilon its int8 scale can represent), or allow them with "
            "--max-unrunnable-fraction",
        )
    ]


def target_footprints(
    targets: Sequence[DeviceTarget],
    tflm: TflmFigures | None,
    npu: Sequence[NpuFigures],
    file_bytes: int,
    litert_arena_bytes: int | None,
) -> list[Footprint]:
    """Each target's RAM and flash, as its own runtime or compiler measured them."""
    footprints = []
    if DeviceTarget.litert in targets:
        footprints.append(litert_footprint(file_bytes, litert_arena_bytes))
    if DeviceTarget.tflm in targets and tflm is not None and tflm.ran:
        footprints.append(
            Footprint("TFLite Micro", file_bytes, tflm.arena_bytes, "its tensor arena (measured by TFLM's allocator)")
        )
    for compiled in npu:
        if compiled.compiled:
            footprints.append(
                Footprint(
                    compiled.target.value,
                    compiled.flash_bytes,
                    compiled.sram_bytes,
                    "its SRAM (Vela's figure)",
                    "its flash (Vela's figure)",
                )
            )
    return footprints


def target_problems(
    targets: Sequence[DeviceTarget], tflm: TflmFigures | None, npu: Sequence[NpuFigures], gate: GateParameters
) -> list[tuple[str, str]]:
    """Why the model fails on a target the run names, besides the budgets: (gate name, message with the fix)."""
    problems = []
    if DeviceTarget.tflm in targets and tflm is not None:
        if not tflm.ran:
            problems.append(
                (
                    "device_runtime",
                    f"TFLite Micro cannot run it ({tflm.not_run_reason}): convert with --ops int8 (every operator "
                    "then has an integer TFLM kernel), or replace the operator it names",
                )
            )
        elif tflm.figures is not None and (verdict := judge_fidelity(tflm.figures, gate)) and not verdict.passed:
            problems.append(
                (
                    "device_fidelity",
                    f"on TFLite Micro ({tflm.samples} rows) {verdict.observed}; the gate asks {verdict.limit}",
                )
            )
    for compiled in npu:
        if not compiled.compiled:
            problems.append(
                ("device_runtime", f"Vela cannot compile it for {compiled.target.value} ({compiled.error})")
            )
        elif gate.min_npu_ops is not None and (compiled.npu_share or 0.0) < gate.min_npu_ops:
            on_cpu = ", ".join(f"{o.op} ({o.reason})" for o in compiled.cpu_operators[:3])
            problems.append(
                (
                    "npu_coverage",
                    f"Vela places {compiled.npu_share or 0.0:.1%} of its operators on the {compiled.target.value} NPU, "
                    f"under --min-npu-ops {gate.min_npu_ops:.1%}; on the CPU: {on_cpu or 'none named'}: convert with "
                    "--ops int8 and integer I/O, or replace those operators",
                )
            )
    return problems


def check_fidelity_gate(
    result: ValidationFigures,
    gate: GateParameters,
    ops: TargetOps | None = None,
    repair: RepairResult | None = None,
) -> GateResult:
    """Judge a validation by its task's figure (``tasks.evaluation.fidelity``): the accuracy drop for classification,
    "the
    MAE rise for regression, SQNR and agreement against the float model for unlabeled data."""
    if result.task is ModelTask.classification:
        return check_accuracy_gate(result, gate.max_accuracy_drop, ops, repair)
    name = "error_increase" if result.task is ModelTask.regression else "float_fidelity"
    verdict = judge_fidelity(result, gate) if result.validated else None
    if verdict is None:
        return not_validated(name, result, gate.max_accuracy_drop)
    if result.rerun_max_difference:
        return not_repeatable(result, gate.max_accuracy_drop)
    repaired = repair is not None and repair.succeeded
    if verdict.passed:
        message = f"gate passed{' after repair' if repaired else ''}: {verdict.observed}; the gate asks {verdict.limit}"
        if repair is not None and repair.succeeded:
            message += f"; {repair.changed()}"
    else:
        message = f"gate failed: {verdict.observed}; the gate asks {verdict.limit}"
        if result.worst_layers:
            message += f"; worst layers: {describe_layers(result.worst_layers)}"
        if repair is not None and (repair.mixed is not None or ops is TargetOps.int8):  # an int16 repair
            message += f"; {repair.message}: allow more int16 layers (--max-int16-fraction),"
        elif repair is not None:
            message += f"; {repair.message}: allow more float layers (--max-float-layers),"
        elif ops is TargetOps.int8:
            message += (
                "; --ops int8 cannot keep a layer in float (--ops builtins can, with repair): raise the worst layers "
                "to int16 instead (--repair, with int8 I/O),"
            )
        else:
            message += ": keep the worst layers in float (--ops builtins --repair),"
        message += (
            " calibrate on more samples (--calibration-size), try int16 activations (--scheme int16x8 --input-type "
            f"float32 --output-type float32), or relax {verdict.option}"
        )
    return GateResult(
        name=name,
        status=GateStatus.passed if verdict.passed else GateStatus.failed,
        observed_drop_pp=None,
        max_drop_pp=gate.max_accuracy_drop,
        message=message,
    )


GATE_OPTION = {
    ModelTask.classification: "raise --max-accuracy-drop",
    ModelTask.regression: "raise --max-error-increase",
    ModelTask.unlabeled: "lower --min-sqnr (or --min-agreement)",
}
