"""How faithful a quantized model is, for the run's task (``ModelTask``): the figure its gate judges, the
threshold it is judged against, and both in words for messages, logs and reports.

- classification: the accuracy drop from the float model, in percentage points (``--max-accuracy-drop``);
- regression: the rise of the mean absolute error over the float model's, in percent (``--max-error-increase``);
- unlabeled: the quantized outputs' SQNR against the float model's (``--min-sqnr``) and, for class scores, their
  top-1 agreement (``--min-agreement``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ptqflow.tasks.core.artifacts import OutputFigures, UnrunnableSamples
from ptqflow.tasks.core.parameters import GateParameters, ModelTask


class Figures(Protocol):
    """What both a run's ``ValidationFigures`` and the report's ``ValidationMetrics`` hold (read-only)."""

    @property
    def task(self) -> ModelTask: ...

    @property
    def float_accuracy(self) -> float | None: ...

    @property
    def quantized_accuracy(self) -> float | None: ...

    @property
    def accuracy_drop_pp(self) -> float | None: ...

    @property
    def agreement(self) -> float | None: ...

    @property
    def float_mae(self) -> float | None: ...

    @property
    def quantized_mae(self) -> float | None: ...

    @property
    def mae_increase_pct(self) -> float | None: ...

    @property
    def sqnr_db(self) -> float | None: ...

    @property
    def outputs(self) -> Mapping[str, OutputFigures]: ...


class Refused(Protocol):
    """Figures that may leave out test samples a model refused to run (a run's, and a sweep row's)."""

    @property
    def unrunnable_rows(self) -> int: ...

    @property
    def unrunnable(self) -> tuple[UnrunnableSamples, ...]: ...


@dataclass(frozen=True)
class Verdict:
    """One validation against its task's thresholds."""

    passed: bool
    observed: str  # the figures, in words
    limit: str  # what the gate asks, in words
    option: str  # the option that sets it
    figure: str  # the judged figure in a few words ("drop 0.42 pp")
    short: str  # for a table's verdict column: what failed, in a few words


IDENTICAL = float("inf")  # the SQNR of outputs equal to the float model's (reported as None)


def judge_fidelity(figures: Figures, gate: GateParameters) -> Verdict | None:
    """A validated model against the task's thresholds; None when the figures it needs are missing."""
    if figures.task is ModelTask.regression:
        if figures.mae_increase_pct is None or figures.quantized_mae is None:
            return None
        return Verdict(
            passed=figures.mae_increase_pct <= gate.max_error_increase,
            observed=f"quantized MAE {figures.quantized_mae:.4g} is {figures.mae_increase_pct:.2f}% above float "
            f"({figures.float_mae:.4g})",
            limit=f"at most {gate.max_error_increase}% above float",
            option="--max-error-increase",
            figure=f"MAE +{figures.mae_increase_pct:.2f}%",
            short=f"MAE +{figures.mae_increase_pct:.2f}% > {gate.max_error_increase}%",
        )
    if figures.task is ModelTask.unlabeled:
        sqnr = IDENTICAL if figures.sqnr_db is None else figures.sqnr_db
        agreement_ok = figures.agreement is None or figures.agreement >= gate.min_agreement
        observed = "quantized outputs " + ("equal the float model's" if sqnr == IDENTICAL else f"at {sqnr:.2f} dB SQNR")
        if len(figures.outputs) > 1 and sqnr != IDENTICAL:
            worst = min(
                (name for name, o in figures.outputs.items() if o.sqnr_db is not None),
                key=lambda name: figures.outputs[name].sqnr_db or IDENTICAL,
            )
            observed += f" (worst of {len(figures.outputs)} outputs: {worst})"
        limit = f"at least {gate.min_sqnr} dB"
        if figures.agreement is not None:
            observed += f", top-1 agreement {figures.agreement:.2%}"
            limit += f" and {gate.min_agreement:.2%} top-1 agreement"
        return Verdict(
            passed=sqnr >= gate.min_sqnr and agreement_ok,
            observed=observed + " against the float model",
            limit=limit,
            option="--min-sqnr" if sqnr < gate.min_sqnr else "--min-agreement",
            figure=("outputs equal to float" if sqnr == IDENTICAL else f"SQNR {sqnr:.1f} dB")
            + (f", agreement {figures.agreement:.2%}" if figures.agreement is not None else ""),
            short=f"SQNR {sqnr:.1f} dB < {gate.min_sqnr} dB"
            if sqnr < gate.min_sqnr
            else f"agreement {figures.agreement or 0:.2%} < {gate.min_agreement:.2%}",
        )
    if figures.accuracy_drop_pp is None or figures.quantized_accuracy is None or figures.float_accuracy is None:
        return None
    return Verdict(
        passed=figures.accuracy_drop_pp <= gate.max_accuracy_drop,
        observed=f"quantized accuracy {figures.quantized_accuracy:.2%} is {figures.accuracy_drop_pp:.2f} pp below "
        f"float ({figures.float_accuracy:.2%})",
        limit=f"at most {gate.max_accuracy_drop} pp below float",
        option="--max-accuracy-drop",
        figure=f"drop {figures.accuracy_drop_pp:.2f} pp",
        short=f"drop {figures.accuracy_drop_pp:.2f} pp > {gate.max_accuracy_drop} pp",
    )


def gate_in_words(task: ModelTask, gate: GateParameters) -> str:
    """What the task's gate asks."""
    if task is ModelTask.regression:
        return f"a quantized MAE at most {gate.max_error_increase}% above float"
    if task is ModelTask.unlabeled:
        return (
            f"at least {gate.min_sqnr} dB SQNR against float, and {gate.min_agreement:.2%} top-1 agreement for class "
            "scores"
        )
    return f"at most {gate.max_accuracy_drop} pp below float"


def fidelity_in_words(figures: Figures) -> str:
    """The figures the task judges, as one phrase (for logs), of a validated model."""
    verdict = judge_fidelity(figures, GateParameters())
    return verdict.observed if verdict else "not validated"


def refusals(figures: Refused) -> str:
    """Which model refused how many test samples, where and how, in one clause."""
    parts = []
    for refused in figures.unrunnable:
        model = "the quantized .tflite" if refused.model == "quantized_tflite" else "the float .tflite"
        where = f" in {', '.join(refused.operators)}" if refused.operators else ""
        example = refused.examples[0][:160] if refused.examples else ""
        parts.append(f"{model} refused {refused.count:,} of {refused.of_rows:,} test samples{where} ({example})")
    return "; ".join(parts)


def unrunnable_share(figures: Refused) -> float:
    """The share of the test split the figures leave out because a model refused to run it."""
    given = max((refused.of_rows for refused in figures.unrunnable), default=0)
    return figures.unrunnable_rows / given if given else 0.0


def fidelity_loss(figures: Figures) -> float | None:
    """What quantizing cost a validated model, by the task's figure, as a number to sort by (smaller is better):
    the accuracy drop (pp), the MAE rise (%), or minus the SQNR (dB)."""
    if figures.task is ModelTask.regression:
        return figures.mae_increase_pct
    if figures.task is ModelTask.unlabeled:
        return -(IDENTICAL if figures.sqnr_db is None else figures.sqnr_db)
    return figures.accuracy_drop_pp


LOSS_LABEL = {
    ModelTask.classification: "accuracy drop from float (pp)",
    ModelTask.regression: "MAE rise over float (%)",
    ModelTask.unlabeled: "minus SQNR against float (dB)",
}


@dataclass(frozen=True)
class TaskFigures:
    """The figures ``judge_fidelity`` reads, for results that hold them under other names (the sweep's rows)."""

    task: ModelTask
    float_accuracy: float | None = None
    quantized_accuracy: float | None = None
    accuracy_drop_pp: float | None = None
    agreement: float | None = None
    float_mae: float | None = None
    quantized_mae: float | None = None
    mae_increase_pct: float | None = None
    sqnr_db: float | None = None
    outputs: Mapping[str, OutputFigures] = field(default_factory=dict)
