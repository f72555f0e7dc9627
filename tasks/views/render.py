"""Every view of a run, drawn from its typed outcome: ``report.md`` and the self-contained ``report.html`` (plots
embedded as PNG) from a ``ValidationReport``; the Prefect markdown artifacts and the console tables from a
``RunSummary`` or ``SweepSummary``. Pure functions: nothing here reads a store or decides anything."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ptqflow.tasks.core.artifacts import ValidationFigures
from ptqflow.tasks.core.parameters import ConversionParameters, DeviceTarget, GateParameters, ModelTask, RankBy
from ptqflow.tasks.core.validation_report import (
    LayerError,
    MixedPrecisionCost,
    ModelKind,
    ModelMetrics,
    PromotionDecision,
    RepairCost,
    TensorQuantization,
    TypeAudit,
    ValidationMetrics,
    ValidationReport,
    ranking_margin,
)
from ptqflow.tasks.evaluation.fidelity import (
    Figures,
    Refused,
    fidelity_in_words,
    gate_in_words,
    judge_fidelity,
    refusals,
)
from ptqflow.tasks.evaluation.gate import describe_layers
from ptqflow.tasks.quantization.ranges import RANGE_METHODS
from ptqflow.tasks.release.documents import RunManifest
from ptqflow.tasks.release.outcome import RegistryRecord, RunOutcome, RunSummary, SweepSummary
from ptqflow.tasks.sweep.ranking import ConfigurationMetrics, SweepRow

if TYPE_CHECKING:
    from rich.console import Console

MISSING = "—"  # every view shows a figure that was not measured the same way


def percent(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2%}"


def number(value: float | None, unit: str = "", digits: int = 3) -> str:
    return MISSING if value is None else f"{value:,.{digits}f}{unit}"


def size(value: int | None) -> str:
    return MISSING if value is None else f"{value:,} B"


# --- report.md and report.html --------------------------------------------------------------------------------

MODEL_HEADER = [
    "model",
    "accuracy",  # the task's figure against the labels: model_header
    "top-1 agreement",
    "output MAE",
    "SQNR",
    "size",
    "latency p50 (batch 1)",
    "latency p95",
    "throughput",
]
LAYER_HEADER = ["layer", "op", "badness", "rmse / scale", "typical steps", "scale"]


LABEL_FIGURE = {ModelTask.classification: "accuracy", ModelTask.regression: "MAE (targets)", ModelTask.unlabeled: ""}


def model_header(task: ModelTask) -> list[str]:
    header = [*MODEL_HEADER]
    header[1] = LABEL_FIGURE[task] or "max abs error"
    return header


def label_figure(m: ModelMetrics, task: ModelTask) -> str:
    """A model's figure against the labels (accuracy, MAE), or for unlabeled data its largest error against the
    float model."""
    if task is ModelTask.regression:
        return number(m.mae, digits=5)
    if task is ModelTask.unlabeled:
        return number(m.output_max_abs_error, digits=5)
    return percent(m.accuracy)


def model_rows(metrics: ValidationMetrics) -> list[list[str]]:
    rows = []
    for kind in ModelKind:
        m = metrics.models.get(kind)
        if m is None:
            rows.append([kind.label, "not run", "", "", "", "", "", "", ""])
            continue
        speed = m.speed
        rows.append(
            [
                kind.label,
                label_figure(m, metrics.task),
                percent(m.agreement_with_float),
                number(m.output_mae, digits=5),
                MISSING if m.output_sqnr_db is None else f"{m.output_sqnr_db:.1f} dB",
                size(m.bytes),
                number(speed.latency_ms.p50 if speed else None, " ms"),
                number(speed.latency_ms.p95 if speed else None, " ms"),
                number(speed.throughput_per_s if speed else None, "/s", 0),
            ]
        )
    return rows


OUTPUT_HEADER = ["output", "SQNR", "MAE", "max abs error", "top-1 agreement"]


def output_rows(metrics: ValidationMetrics) -> list[list[str]]:
    """The quantized model's outputs, each against the float model's (shown for models with several)."""
    return [
        [
            name,
            MISSING if o.sqnr_db is None else f"{o.sqnr_db:.1f} dB",
            number(o.mae, digits=5),
            number(o.max_abs_error, digits=5),
            percent(o.agreement),
        ]
        for name, o in metrics.outputs.items()
    ]


DEVICE_HEADER = ["model", "flash (.tflite)", "weights", "tensor arena (plan)", "LiteRT arena (measured)", "peak live"]


def kib(value: int | None) -> str:
    return MISSING if value is None else f"{value / 1024:,.1f} KiB"


def device_rows(metrics: ValidationMetrics) -> list[list[str]]:
    return [
        [
            kind.label,
            kib(d.flash_bytes),
            kib(d.weight_bytes),
            kib(d.arena_bytes),
            kib(d.interpreter.arena_bytes if d.interpreter else None),
            kib(d.peak_live_bytes),
        ]
        for kind, d in metrics.device.items()
    ]


def device_lines(metrics: ValidationMetrics) -> list[str]:
    """How the planned arena compares with what LiteRT allocated, and what the figures leave out."""
    lines = []
    for kind, d in metrics.device.items():
        check = d.interpreter
        if check is None:
            lines.append(f"- {kind.label}: not checked against the interpreter: {d.note or 'it could not allocate it'}")
            continue
        sentence = (
            f"- {kind.label}: for the tensors LiteRT placed in its arena the plan gives {check.planned_bytes:,} B "
            f"against its {check.arena_bytes:,} B"
        )
        if check.scratch_tensors:
            sentence += (
                f"; its kernels add {check.scratch_tensors} scratch tensor(s) (largest {check.largest_scratch_bytes:,}"
                " B, e.g. im2col buffers of its optimized convolutions) that the model does not list"
            )
        if check.runtime_sized_tensors:
            sentence += (
                f"; {check.runtime_sized_tensors} tensor(s) have shapes known only at run time (LiteRT allocates them"
                " apart; the plan counts them at batch 1)"
            )
        lines.append(sentence + (f"; {d.note}" if d.note else ""))
    return lines


TARGET_HEADER = ["target", "measured by", "task figure", "RAM", "flash", "speed", "operators"]


def _judged_figure(figures: Figures) -> str:
    verdict = judge_fidelity(figures, GateParameters())
    return verdict.figure if verdict else MISSING


def target_rows(metrics: ValidationMetrics | ValidationFigures) -> list[list[str]]:
    """One row per device target (``--target``), each figure from the target's own runtime or compiler."""
    rows = []
    if DeviceTarget.litert in metrics.targets:
        rows.append(
            [
                "LiteRT",
                "LiteRT Interpreter (XNNPACK)",
                _judged_figure(metrics) if metrics.validated else MISSING,
                kib(target_arena(metrics)) + " arena (planned)",
                kib(metrics.quantized_bytes),
                "see Models (host CPU)",
                "",
            ]
        )
    tflm = metrics.tflm
    if tflm is not None:
        rows.append(
            [
                "TFLite Micro",
                tflm.runtime,
                (_judged_figure(tflm.figures) + f" on {tflm.samples:,} rows")
                if tflm.figures
                else f"not run: {tflm.not_run_reason}",
                kib(tflm.arena_bytes) + " arena (allocator)" if tflm.arena_bytes is not None else MISSING,
                kib(metrics.quantized_bytes),
                "reference kernels (not timed)",
                f"{len(tflm.ops)} builtin" if tflm.ran else MISSING,
            ]
        )
    for npu in metrics.npu:
        if not npu.compiled:
            rows.append([npu.target.value, npu.compiler, f"not compiled: {npu.error}", MISSING, MISSING, MISSING, ""])
            continue
        rows.append(
            [
                npu.target.value,
                f"{npu.compiler} ({npu.system_config}, {npu.memory_mode})",
                "compiled only (not run)",
                kib(npu.sram_bytes) + " SRAM",
                kib(npu.flash_bytes),
                f"{npu.inferences_per_second:,.0f} inferences/s (est., {(npu.clock_hz or 0) / 1e6:,.0f} MHz)"
                if npu.inferences_per_second
                else MISSING,
                f"{npu.npu_ops} of {npu.npu_ops + npu.cpu_ops} on the NPU",
            ]
        )
    return rows


def target_arena(metrics: ValidationMetrics | ValidationFigures) -> int | None:
    if isinstance(metrics, ValidationMetrics):
        footprint = metrics.device.get(ModelKind.quantized_tflite)
        return footprint.arena_bytes if footprint else None
    return metrics.arena_bytes


def target_lines(metrics: ValidationMetrics | ValidationFigures) -> list[str]:
    """What the targets' figures mean, as bullets: TFLM against LiteRT, its arena's parts, what Vela left to the
    CPU."""
    lines = []
    tflm = metrics.tflm
    if tflm is not None and tflm.ran:
        rows = f"{tflm.samples:,} test rows" + (
            f" (a draw with seed {tflm.subset_seed}, --tflm-samples)" if tflm.subset_seed is not None else ""
        )
        lines.append(
            f"- TFLite Micro ran {rows}: its outputs equal LiteRT's bit for bit on "
            f"{percent(tflm.identical_to_litert)} of them and differ by at most "
            f"{number(tflm.max_difference_lsb, digits=0)} quantization step(s) (its reference kernels round "
            "differently from LiteRT's optimized ones)."
        )
        head, tail = tflm.arena_head_bytes or 0, tflm.arena_tail_bytes or 0
        temporary = (tflm.arena_bytes or 0) - head - tail
        lines.append(
            f"- TFLite Micro's arena: {tflm.arena_bytes:,} B, the smallest it allocates the model in (model_data.h "
            f"declares it as kTensorArenaSize): {head:,} B of activations and {tail:,} B it keeps for the model's "
            "lifetime (eval tensors, per-channel multipliers and shifts, node structs), as its recording allocator "
            "reports them"
            + (
                f", and {temporary:,} B its operators take temporarily while they are prepared."
                if temporary > 0
                else "."
            )
        )
    for npu in metrics.npu:
        if npu.compiled and npu.cpu_operators:
            lines.append(
                f"- {npu.target.value}: Vela leaves {npu.cpu_ops} operator(s) to the CPU: "
                + "; ".join(f"{o.op} `{o.tensor[:60]}` ({o.reason})" for o in npu.cpu_operators[:10])
            )
        elif npu.compiled:
            lines.append(f"- {npu.target.value}: Vela places every operator on the NPU.")
    return lines


def layer_rows(layers: Sequence[LayerError], count: int = 10) -> list[list[str]]:
    return [
        [
            layer.layer,
            layer.op,
            f"{layer.badness:.2f}",
            f"{layer.rmse_over_scale:.3f}",
            "n/a" if layer.typical_steps is None else f"{layer.typical_steps:.3g}",
            f"{layer.scale:.4g}",
        ]
        for layer in layers[:count]
    ]


def ranking_line(layers: Sequence[LayerError]) -> tuple[str, bool] | None:
    """The ranking margin of the two worst layers as a sentence, and whether it is a close call."""
    margin = ranking_margin(layers[:2])
    if margin is None:
        return None
    sentence = str(margin)
    return sentence[0].upper() + sentence[1:] + ".", margin.close


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _verdict(metrics: ValidationMetrics) -> str:
    if not metrics.validated:
        return f"**Not validated**: {metrics.not_validated_reason}"
    audit = metrics.audit
    integer = "full integer" if audit.full_integer else f"{len(audit.float_ops)} ops with float tensors"
    unrepeatable = (
        f"**outputs differ by up to {metrics.rerun_max_difference:.3g} between two runs on the same input**; "
        if metrics.rerun_max_difference
        else ""
    )
    observed = fidelity_in_words(metrics)
    return unrepeatable + (
        f"{observed[0].upper()}{observed[1:]} on {metrics.samples:,} test samples; {integer}; "
        f"{metrics.quantized_bytes:,} B against {metrics.float_bytes:,} B float; "
        f"{metrics.num_threads} interpreter thread(s)."
    )


def _quantization(tensor: TensorQuantization) -> str:
    return f"{tensor.dtype} (scale {tensor.scale:.6g}, zero point {tensor.zero_point})"


def _audit_lines(audit: TypeAudit) -> list[str]:
    # A device quantizes each input with its own scale and zero point: several inputs are listed by name.
    inputs = (
        "; ".join(f"input {name} {_quantization(tensor)}" for name, tensor in audit.inputs.items())
        if audit.inputs
        else f"input {_quantization(audit.input)}"
    )
    lines = [
        f"- ops: {', '.join(audit.ops)}",
        f"- tensor types: {', '.join(f'{k} x{v}' for k, v in audit.dtypes.items())}",
        f"- {inputs}, output {_quantization(audit.output)}",
    ]
    if audit.flex_ops:
        lines.append(f"- **TensorFlow (Flex) ops**: {', '.join(audit.flex_ops)}")
    if audit.float_ops:
        shown = ", ".join(f"{o.op} ({o.output})" for o in audit.float_ops[:10])
        lines.append(f"- **ops with float tensors**: {shown}")
    else:
        lines.append("- no float tensor: full integer")
    return lines


def _db(value: float | None) -> str:
    return "identical to float" if value is None else f"{value:.1f} dB"


def mixed_lines(mixed: MixedPrecisionCost) -> list[str]:
    """Scheme mixed16: which layers are int16, what the search measured, and the cost against all-int8."""
    choice = mixed.choice
    raised = ", ".join(f"{layer.layer} ({layer.op})" for layer in choice.int16_layers) or "none"
    within = "" if choice.target_met else " (not within reach of whole-model int16 inside the budget)"
    lines = [
        f"- int16 activations in {len(choice.int16_layers)} of {choice.layers} layers "
        f"({choice.int16_fraction:.0%}; at most {choice.max_int16_fraction:.0%}): {raised}",
        f"- worst output SQNR against float on {choice.search_rows} calibration rows: all-int8 "
        f"{_db(choice.int8_sqnr_db)}, mixed {_db(choice.reached_sqnr_db)}, whole-model int16 "
        f"{_db(choice.int16_sqnr_db) if choice.int16_sqnr_db is not None or choice.reached_sqnr_db is None else 'n/a'}"
        f"{within}"
        + (
            f"; rows the integer kernels refuse: all-int8 {choice.int8_refused_rows}, mixed {choice.refused_rows}"
            if choice.int8_refused_rows or choice.refused_rows
            else ""
        ),
        f"- on the test split, mixed: {mixed.mixed_fidelity}; all-int8: {mixed.int8_fidelity}",
        f"- cost against all-int8: {mixed.mixed_bytes:,} B against {mixed.int8_bytes:,} B; latency p50 "
        f"{number(mixed.mixed_latency_ms_p50, ' ms')} against {number(mixed.int8_latency_ms_p50, ' ms')}; "
        + (
            f"TFLM arena {mixed.mixed_arena_bytes:,} B against {mixed.int8_arena_bytes:,} B"
            if mixed.mixed_arena_bytes is not None and mixed.int8_arena_bytes is not None
            else f"arena not measured: {mixed.arena_unavailable}"
        ),
    ]
    return lines


def _repair_lines(repair: RepairCost) -> list[str]:
    lines = [f"- {repair.message}"]
    for i, step in enumerate(repair.steps, 1):
        lines.append(
            f"- step {i}: {', '.join(step.float_layers)} in float: validation {step.validation}, "
            f"{step.quantized_bytes:,} B"
        )
    if repair.succeeded:
        lines.append(
            f"- on the test split, repaired: {repair.repaired_fidelity or percent(repair.repaired_accuracy)}; fully "
            f"quantized: {repair.unrepaired_fidelity or percent(repair.unrepaired_accuracy)}"
        )
        lines.append(
            f"- cost: {repair.repaired_bytes:,} B against {repair.unrepaired_bytes:,} B fully quantized; "
            f"latency p50 {number(repair.repaired_latency_ms_p50, ' ms')} against "
            f"{number(repair.unrepaired_latency_ms_p50, ' ms')}"
        )
    return lines


def _promotion_lines(promotion: PromotionDecision) -> list[str]:
    """The champion/challenger decision of the run that exported (or did not export) this model."""
    champion = "exported model" + (f" (version {promotion.champion_version})" if promotion.champion_version else "")
    if promotion.metric == "none":
        return [f"- {promotion.message}"]
    challenger, champion_figure = promotion_figures(promotion)
    figures = f"{'MAE ' if promotion.metric == 'mae' else ''}{challenger}; {champion}: {champion_figure}"
    tolerance = f"{promotion.tolerance_pp}{'%' if promotion.metric == 'mae' else ' pp'}"
    return [
        f"- {promotion.message}",
        f"- this model: {figures} (on {promotion.comparison or 'the same test rows'}; tolerance {tolerance})",
    ]


DEVICE_NOTE = (
    "The tensor arena is planned from the execution plan as LiteRT's planner lays it out (tensors live from the "
    "operator that writes them to the last that reads them, largest placed first); peak live is the most tensor "
    "bytes live at one operator, which no planner can go below. A device's kernels may add scratch buffers."
)


def unrunnable_line(figures: Refused) -> str:
    """The test samples the figures leave out, and why."""
    return f"**{figures.unrunnable_rows:,} test samples left out of the figures**: {refusals(figures)}."


def judged_file_line(report: ValidationReport) -> str:
    """Which file the figures are of (the export ships it byte for byte), and whether a device can take its
    shapes."""
    quantized = report.quantized_model
    dynamic = report.metrics.audit.dynamic_tensors
    if dynamic is None:  # a report from before the audit looked at shapes
        shapes = ""
    elif not dynamic:
        shapes = "; static shapes, one sample per call"
    else:
        named = ", ".join(dynamic[:3]) + (", ..." if len(dynamic) > 3 else "")
        shapes = f"; **{len(dynamic)} tensors with shapes known only at run time** ({named}): a device wants static"
    return f"Judged file: the quantized `.tflite`, {quantized.bytes:,} B, sha256 `{quantized.sha256}`{shapes}."


def conversion_line(recorded: dict[str, object] | None) -> str | None:
    """How the quantized model was made, in one line: scheme, ops, I/O, weight scales and the fidelity methods."""
    if recorded is None:
        return None
    try:
        options = ConversionParameters.model_validate(recorded)
    except ValidationError:  # a report from a version whose options no longer validate: say nothing rather than guess
        return None
    ranges = f"{RANGE_METHODS[options.calibration_method].label} activation ranges" + (
        f" ({options.percentile:g}%)" if options.percentile is not None else ""
    )
    methods = [
        options.scheme.value,
        f"ops {options.ops.value}",
        f"{options.input_type.value} in, {options.output_type.value} out",
        "per-channel weights" if options.per_channel else "per-tensor weights",
    ]
    if options.scheme.calibrated:
        methods.append(ranges)
    if options.equalize:
        methods.append("equalized activation channels")
    if options.bias_correction:
        methods.append("corrected biases")
    return "Conversion: " + ", ".join(methods) + "."


def render_markdown(report: ValidationReport) -> str:
    metrics = report.metrics
    conversion = conversion_line(report.conversion)
    parts = [
        "# ptqflow validation report",
        "",
        _verdict(metrics),
        "",
        judged_file_line(report),
        "",
        *([unrunnable_line(metrics), ""] if metrics.unrunnable else []),
        *([conversion, ""] if conversion else []),
        *(["## Promotion", "", *_promotion_lines(report.promotion), ""] if report.promotion else []),
        "## Models (test split)",
        "",
        markdown_table(model_header(metrics.task), model_rows(metrics)),
        "",
        "Agreement, output MAE and SQNR compare each model's outputs with the float Keras model's.",
        "",
    ]
    if len(metrics.outputs) > 1:
        parts += [
            "## Outputs (quantized .tflite against float Keras)",
            "",
            markdown_table(OUTPUT_HEADER, output_rows(metrics)),
            "",
        ]
    if metrics.class_names:
        parts += [
            "## Per-class accuracy",
            "",
            markdown_table(
                ["class", *[kind.label for kind in metrics.models]],
                [
                    [name, *[percent(m.per_class_accuracy.get(name)) for m in metrics.models.values()]]
                    for name in metrics.class_names
                ],
            ),
            "",
        ]
    parts += [
        "## Per-layer quantization error (QuantizationDebugger)",
        "",
    ]
    if metrics.layers:
        parts += [
            "Of the fully quantized conversion, worst first. badness = max(rmse/scale x sqrt(12), 1 / typical "
            "steps): 1 is plain rounding; a large value names a layer whose error or lost resolution hurts the "
            "model. Typical steps: the median non-zero activation in quantization steps (below 1, the layer's "
            "range is taken by outliers).",
            "",
            markdown_table(LAYER_HEADER, layer_rows(metrics.layers)),
            *(["", f"**{margin[0]}**" if margin[1] else margin[0]] if (margin := ranking_line(metrics.layers)) else []),
        ]
    else:
        parts.append(f"Not available: {metrics.layers_unavailable}")
    parts += ["", "## Audit", "", *_audit_lines(metrics.audit)]
    if metrics.device:
        parts += [
            "",
            "## Device footprint (one sample at a time)",
            "",
            markdown_table(DEVICE_HEADER, device_rows(metrics)),
            "",
            DEVICE_NOTE,
            "",
            *device_lines(metrics),
        ]
    if metrics.targets != (DeviceTarget.litert,):
        parts += [
            "",
            "## Targets",
            "",
            markdown_table(TARGET_HEADER, target_rows(metrics)),
            "",
            *target_lines(metrics),
        ]
    if metrics.mixed:
        parts += ["", "## Mixed precision (int8, int16 where needed)", "", *mixed_lines(metrics.mixed)]
    if metrics.repair:
        parts += ["", "## Repair", "", *_repair_lines(metrics.repair)]
    dense = any(m.confusion_matrix for m in metrics.models.values())
    if metrics.class_names:
        parts += ["", "## Confusion matrices" if dense else "## Most confused classes", ""]
    for kind, m in metrics.models.items() if metrics.class_names else ():
        table = (
            markdown_table(
                ["true \\ predicted", *metrics.class_names],
                [[name, *[str(v) for v in row]] for name, row in zip(metrics.class_names, m.confusion_matrix)],
            )
            if m.confusion_matrix
            else markdown_table(
                ["true", "predicted", "rows"], [[c.true, c.predicted, str(c.count)] for c in m.most_confused]
            )
        )
        parts += [f"### {kind.label}", "", table, ""]
    return "\n".join(parts) + "\n"


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    # No timestamp or software tag: the same figures give the same bytes.
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode()


def plots(metrics: ValidationMetrics) -> dict[str, str]:
    """Base64 PNGs: accuracy per model, confusion matrices, per-layer error, live tensor memory per operator. Every
    label is plain text: a class or layer name with dollar signs is not read as math (which can fail to parse)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a batch job
    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        return _plots(metrics)


def _plots(metrics: ValidationMetrics) -> dict[str, str]:
    from matplotlib import pyplot as plt

    images = {}
    models = metrics.models
    labels = [kind.label for kind in models]
    if metrics.task is ModelTask.classification:
        figure, axis = plt.subplots(figsize=(5, 3))
        values = [(m.accuracy or 0.0) * 100 for m in models.values()]
        axis.bar(labels, values, color=["#4c72b0", "#55a868", "#c44e52"][: len(values)])
        low = max(0.0, min(values) - 5) if values else 0
        axis.set_ylim(low, 100)
        axis.set_ylabel("test accuracy (%)")
        for i, v in enumerate(values):
            axis.text(i, v, f"{v:.2f}", ha="center", va="bottom")
        images["accuracy"] = _png(figure)
        plt.close(figure)
    elif metrics.task is ModelTask.regression:
        figure, axis = plt.subplots(figsize=(5, 3))
        values = [m.mae or 0.0 for m in models.values()]
        axis.bar(labels, values, color=["#4c72b0", "#55a868", "#c44e52"][: len(values)])
        axis.set_ylabel("test MAE (targets)")
        for i, v in enumerate(values):
            axis.text(i, v, f"{v:.4g}", ha="center", va="bottom")
        images["accuracy"] = _png(figure)
        plt.close(figure)

    if models and metrics.class_names and all(m.confusion_matrix for m in models.values()):
        figure, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.8), squeeze=False)
        for axis, (kind, m) in zip(axes[0], models.items()):
            axis.imshow(m.confusion_matrix, cmap="Blues")
            axis.set_title(kind.label)
            axis.set_xlabel("predicted")
            axis.set_ylabel("true")
            ticks = range(len(metrics.class_names))
            axis.set_xticks(ticks, metrics.class_names, rotation=90, fontsize=7)
            axis.set_yticks(ticks, metrics.class_names, fontsize=7)
        images["confusion"] = _png(figure)
        plt.close(figure)

    layers = metrics.layers[:15]
    if layers:
        figure, axis = plt.subplots(figsize=(6, 0.35 * len(layers) + 1))
        names = [f"{layer.layer} ({layer.op})" for layer in layers][::-1]
        badness = [layer.badness for layer in layers][::-1]
        axis.barh(names, badness, color=["#c44e52" if b > 2 else "#8c8c8c" for b in badness])
        axis.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        axis.set_xscale("log")
        axis.set_xlabel("badness (1 = plain rounding; log scale)")
        images["layers"] = _png(figure)
        plt.close(figure)

    if metrics.device:
        figure, axis = plt.subplots(figsize=(7, 3))
        for (kind, d), color in zip(metrics.device.items(), ["#55a868", "#c44e52"]):
            axis.step(
                range(len(d.live_bytes)),
                [b / 1024 for b in d.live_bytes],
                where="mid",
                color=color,
                label=f"{kind.label} (arena {d.arena_bytes / 1024:,.1f} KiB)",
            )
            axis.axhline(d.arena_bytes / 1024, color=color, linewidth=0.8, linestyle="--")
        axis.set_xlabel("operator (execution order)")
        axis.set_ylabel("live tensors (KiB)")
        axis.legend(fontsize=8)
        images["memory"] = _png(figure)
        plt.close(figure)
    return images


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}.bad{color:#b00}img{max-width:100%}"
)


def render_html(report: ValidationReport) -> str:
    metrics = report.metrics
    images = plots(metrics) if metrics.models else {}

    def image(key: str, alt: str) -> str:
        return f'<img alt="{alt}" src="data:image/png;base64,{images[key]}">' if key in images else ""

    def bullets(lines: list[str]) -> str:
        return "<ul>" + "".join(f"<li>{html.escape(line[2:].replace('**', ''))}</li>" for line in lines) + "</ul>"

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>ptqflow validation report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>ptqflow validation report</h1>",
        f"<p class='{'' if metrics.validated else 'bad'}'>{html.escape(_verdict(metrics).replace('**', ''))}</p>",
        f"<p>{html.escape(judged_file_line(report).replace('**', '').replace('`', ''))}</p>",
    ]
    if metrics.unrunnable:
        parts.append(f"<p class='bad'>{html.escape(unrunnable_line(metrics).replace('**', ''))}</p>")
    conversion = conversion_line(report.conversion)
    if conversion:
        parts.append(f"<p>{html.escape(conversion)}</p>")
    if report.promotion:
        parts += ["<h2>Promotion</h2>", bullets(_promotion_lines(report.promotion))]
    parts += [
        "<h2>Models (test split)</h2>",
        _html_table(model_header(metrics.task), model_rows(metrics)),
        image("accuracy", f"{LABEL_FIGURE[metrics.task]} per model"),
    ]
    if len(metrics.outputs) > 1:
        parts += [
            "<h2>Outputs (quantized .tflite against float Keras)</h2>",
            _html_table(OUTPUT_HEADER, output_rows(metrics)),
        ]
    parts += [
        "<h2>Per-layer quantization error</h2>",
    ]
    if metrics.layers:
        parts += [_html_table(LAYER_HEADER, layer_rows(metrics.layers)), image("layers", "per-layer error")]
        if margin := ranking_line(metrics.layers):
            sentence, close = margin
            parts.append(f"<p class='{'bad' if close else ''}'>{html.escape(sentence)}</p>")
    else:
        parts.append(f"<p>Not available: {html.escape(str(metrics.layers_unavailable))}</p>")
    parts += ["<h2>Audit</h2>", bullets(_audit_lines(metrics.audit))]
    if metrics.device:
        parts += [
            "<h2>Device footprint (one sample at a time)</h2>",
            _html_table(DEVICE_HEADER, device_rows(metrics)),
            f"<p>{html.escape(DEVICE_NOTE)}</p>",
            bullets(device_lines(metrics)),
            image("memory", "tensor memory live per operator"),
        ]
    if metrics.targets != (DeviceTarget.litert,):
        parts += ["<h2>Targets</h2>", _html_table(TARGET_HEADER, target_rows(metrics)), bullets(target_lines(metrics))]
    if metrics.mixed:
        parts += ["<h2>Mixed precision (int8, int16 where needed)</h2>", bullets(mixed_lines(metrics.mixed))]
    if metrics.repair:
        parts += ["<h2>Repair</h2>", bullets(_repair_lines(metrics.repair))]
    if images.get("confusion"):
        parts += ["<h2>Confusion matrices</h2>", image("confusion", "confusion matrices")]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --- the sweep's table ----------------------------------------------------------------------------------------

SWEEP_HEADER = [
    "rank",
    "configuration",
    "accuracy",
    "drop pp",
    "size",
    "x smaller",
    "arena",  # the tensor arena, batch 1 (tasks.evaluation.device)
    "p50 ms",
    "full int",
    "I/O",
    "convert s",
    "verdict",
]


# The task's figure and what quantizing cost by it, then how closely the model follows its float model (top-1
# agreement, output SQNR), so fidelity methods compare side by side.
SWEEP_FIGURES = {
    ModelTask.classification: ("accuracy", "drop pp", "agreement", "SQNR dB"),
    ModelTask.regression: ("MAE", "MAE rise %", "SQNR dB"),
    ModelTask.unlabeled: ("SQNR dB", "agreement"),
}


def sweep_header(task: ModelTask, targets: Sequence[DeviceTarget] = ()) -> list[str]:
    """The sweep table's columns: the task's figures (``SWEEP_FIGURES``) from the third on, and one column per
    device target besides LiteRT (``sweep_targets``) before the verdict."""
    header = [*SWEEP_HEADER]
    header[2:4] = SWEEP_FIGURES[task]
    header[-1:-1] = ["TFLM" if t is DeviceTarget.tflm else t.value for t in targets]
    return header


def sweep_targets(rows: Sequence[SweepRow]) -> tuple[DeviceTarget, ...]:
    """The device targets the configurations were measured on, besides LiteRT."""
    measured = next((r.metrics.targets for r in rows if r.metrics is not None and not r.reference), ())
    return tuple(t for t in measured if t is not DeviceTarget.litert)


def _target_cell(m: ConfigurationMetrics | None, target: DeviceTarget) -> str:
    """A configuration on one device target, in a few words: TFLM's arena and task figure, or Vela's NPU share and
    SRAM."""
    if m is None:
        return MISSING
    if target is DeviceTarget.tflm:
        if m.tflm is None:
            return MISSING
        if not m.tflm.ran:
            return "cannot run"
        return f"{kib(m.tflm.arena_bytes)} arena, " + (_judged_figure(m.tflm.figures) if m.tflm.figures else MISSING)
    npu = next((n for n in m.npu if n.target is target), None)
    if npu is None:
        return MISSING
    if not npu.compiled:
        return "not compiled"
    return f"{npu.npu_share or 0.0:.0%} NPU, {kib(npu.sram_bytes)} SRAM"


def sweep_task(rows: Sequence[SweepRow]) -> ModelTask:
    return next((r.metrics.task for r in rows if r.metrics is not None), ModelTask.classification)


def _sweep_figures(m: ConfigurationMetrics | None, task: ModelTask) -> list[str]:
    if m is None or not m.validated:
        return [MISSING] * len(SWEEP_FIGURES[task])
    sqnr = number(m.sqnr_db, digits=1)
    if m.task is ModelTask.regression:
        return [number(m.quantized_mae, digits=5), number(m.mae_increase_pct, digits=2), sqnr]
    if m.task is ModelTask.unlabeled:
        return [sqnr, percent(m.agreement)]
    return [percent(m.quantized_accuracy), number(m.accuracy_drop_pp, digits=2), percent(m.agreement), sqnr]


def sweep_rows(rows: Sequence[SweepRow]) -> list[list[str]]:
    reference = next((r.metrics for r in rows if r.reference and r.metrics), None)
    task = sweep_task(rows)
    targets = sweep_targets(rows)
    lines = []
    for r in rows:
        m = r.metrics
        smaller = f"{reference.bytes / m.bytes:.2f}" if m and reference else ""
        lines.append(
            [
                str(r.rank or ""),
                r.name,
                *_sweep_figures(m, task),
                f"{m.bytes:,} B" if m else "—",
                smaller,
                kib(m.arena_bytes if m else None),
                f"{m.latency_p50_ms:.3f}" if m and m.latency_p50_ms is not None else "—",
                ("yes" if m.full_integer else "no") if m else "—",
                f"{r.input_type}/{r.output_type}",
                f"{m.conversion_seconds:.2f}" if m else "—",
                *(_target_cell(None if r.reference else m, target) for target in targets),
                r.verdict,
            ]
        )
    return lines


def sweep_markdown(
    rows: Sequence[SweepRow], rank_by: RankBy, gate: GateParameters, task: ModelTask, best: str | None
) -> str:
    header = sweep_header(task, sweep_targets(rows))
    lines = [
        "# ptqflow quantization sweep",
        "",
        f"{len([r for r in rows if not r.reference])} configurations on the test split; gate: "
        f"{gate_in_words(task, gate)}. "
        f"Ranked by {rank_by.value} (then the other two of size, latency, accuracy; accuracy is the task's own "
        "figure). Latency: batch 1, p50, on the worker that evaluated it.",
        "",
        f"**Best: {best}**" if best else "**No configuration passed the gate.**",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(cell.replace("|", "/") for cell in line) + " |" for line in sweep_rows(rows)],
    ]
    return "\n".join(lines) + "\n"


# --- Prefect markdown artifacts -------------------------------------------------------------------------------


def _outcome_lines(summary: RunOutcome) -> list[str]:
    """Where the run's results are, and what became of its export."""
    lines = [f"Manifest: `{summary.manifest}`"]
    if summary.export is not None:
        lines.append(f"Exported as version `{summary.export.version}` to `{summary.export.url}`.")
    if summary.promotion is not None:
        lines.append(summary.promotion.message)
    if summary.registry is not None:
        lines.append(registry_line(summary.registry))
    return lines


def registry_line(record: RegistryRecord) -> str:
    line = f"MLflow: run {record.mlflow_run_id} in {record.registered_model}"
    if record.champion_version is not None:
        moved = record.champion_version != record.previous_champion_version
        line += f"; version {record.champion_version} has the champion alias" + (
            f" (was {record.previous_champion_version or 'none'})" if moved else ""
        )
    return line


def run_summary_markdown(summary: RunSummary) -> str:
    m = summary.metrics
    rows = [
        ["size", "", size(m.float_bytes), size(m.quantized_bytes)],
    ]
    if m.task is ModelTask.classification:
        rows.insert(
            0,
            ["accuracy", percent(m.float_accuracy), percent(m.tflite_float_accuracy), percent(m.quantized_accuracy)],
        )
    elif m.task is ModelTask.regression:
        rows.insert(
            0,
            [
                "MAE",
                number(m.float_mae, digits=5),
                number(m.tflite_float_mae, digits=5),
                number(m.quantized_mae, digits=5),
            ],
        )
    stages = [[name, "yes" if r.cached else "no", number(r.seconds, digits=1)] for name, r in summary.tasks.items()]
    report = summary.artifacts.get("report_html")
    return "\n".join(
        [
            f"# ptq-pipeline: {summary.status.value}",
            "",
            summary.gate.message,
            "",
            markdown_table(["", *[kind.label for kind in ModelKind]], rows),
            "",
            f"{fidelity_figures(m) if m.validated else 'Not validated'}; full integer: "
            f"{'yes' if m.full_integer else 'no'}"
            + (
                f"; tensor arena {kib(m.arena_bytes)} (batch 1)."
                if m.arena_bytes is not None and DeviceTarget.litert in m.targets
                else "."
            ),
            "",
            *(
                [markdown_table(TARGET_HEADER, target_rows(m)), "", *target_lines(m), ""]
                if m.targets != (DeviceTarget.litert,)
                else []
            ),
            *([f"Worst layers: {describe_layers(m.worst_layers, 5)}", ""] if m.worst_layers else []),
            f"Quantized model: `{summary.artifacts['tflite'].uri}`",
            "",
            *([f"Report: `{report.uri}` (also `report.md`, `report.json`)", ""] if report else []),
            *_outcome_lines(summary),
            "",
            markdown_table(["stage", "cached", "seconds"], stages),
        ]
    )


def sweep_summary_markdown(summary: SweepSummary, table: str) -> str:
    return "\n".join(
        [table, "", summary.gate.message, "", f"Plot: `{summary.report.plot.uri}`", "", *_outcome_lines(summary)]
    )


def promotion_figures(promotion: PromotionDecision) -> tuple[str, str]:
    """The challenger's and the champion's figure on the compared rows."""
    if promotion.metric == "mae":
        return number(promotion.challenger_mae, digits=5), number(promotion.champion_mae, digits=5)
    return percent(promotion.challenger_accuracy), percent(promotion.champion_accuracy)


def promotion_markdown(promotion: PromotionDecision) -> str:
    champion = "exported model (champion" + (f", {promotion.champion_version}" if promotion.champion_version else "")
    challenger, champion_figure = promotion_figures(promotion)
    return "\n".join(
        [
            f"# {'promoted' if promotion.promote else 'not promoted'}",
            "",
            promotion.message,
            "",
            *(
                [
                    markdown_table(
                        ["", f"{promotion.metric} ({promotion.comparison or 'this run'})"],
                        [
                            ["new model (challenger)", challenger],
                            [champion + ")", champion_figure],
                        ],
                    ),
                    "",
                    f"Tolerance: {promotion.tolerance_pp} {'%' if promotion.metric == 'mae' else 'pp'}.",
                ]
                if promotion.metric != "none"
                else []
            ),
        ]
    )


# --- the console ----------------------------------------------------------------------------------------------


def _print_ending(summary: RunOutcome, console: Console) -> None:
    if summary.promotion is not None:
        colour = "green" if summary.promotion.promote else "yellow"
        console.print(f"[{colour}]{summary.promotion.message}[/]", highlight=False, soft_wrap=True)
    if summary.export is not None:
        what = "published" if summary.export.published else "already published"
        console.print(
            f"{what}: version {summary.export.version}, pointer {summary.export.pointer}",
            highlight=False,
            soft_wrap=True,
        )
    if summary.registry is not None:
        console.print(registry_line(summary.registry), highlight=False, soft_wrap=True)
    console.print(f"run id: {summary.run_id} (manifest {summary.manifest})", highlight=False, soft_wrap=True)


def _print_gate(summary: RunOutcome, console: Console) -> None:
    colour = "green" if summary.gate.passed else "red"
    console.print(f"[{colour}]{summary.gate.message}[/]", highlight=False)


def print_run_summary(summary: RunSummary, console: Console) -> None:
    from rich.table import Table

    m = summary.metrics
    stages = Table(title="Stages", title_justify="left")
    stages.add_column("stage")
    stages.add_column("result")
    stages.add_column("seconds", justify="right")
    for name, record in summary.tasks.items():
        stages.add_row(name, "cached" if record.cached else "computed", number(record.seconds, digits=1))
    models = Table(title="Models (test split)", title_justify="left")
    figure = {ModelTask.classification: "accuracy", ModelTask.regression: "MAE"}.get(m.task)
    for column in ("model", *([figure] if figure else []), "size"):
        models.add_column(column, justify="right" if column != "model" else "left")
    if m.task is ModelTask.regression:
        figures = [
            number(m.float_mae, digits=5),
            number(m.tflite_float_mae, digits=5),
            number(m.quantized_mae, digits=5),
        ]
    else:
        figures = [percent(m.float_accuracy), percent(m.tflite_float_accuracy), percent(m.quantized_accuracy)]
    sizes = ["", size(m.float_bytes), size(m.quantized_bytes)]
    for kind, value, bytes_ in zip(ModelKind, figures, sizes):
        models.add_row(kind.label, *([value] if figure else []), bytes_)
    console.print(stages)
    console.print(models)
    if m.targets != (DeviceTarget.litert,):
        targets = Table(title="Targets", title_justify="left")
        for column in TARGET_HEADER:
            targets.add_column(column)
        for row in target_rows(m):
            targets.add_row(*row)
        console.print(targets)
        for line in target_lines(m):
            console.print(line, highlight=False, soft_wrap=True)
    if m.validated:
        integer = "yes" if m.full_integer else f"no ({len(m.float_tensors)} float tensors)"
        litert = m.arena_bytes is not None and DeviceTarget.litert in m.targets
        arena = f"; tensor arena {kib(m.arena_bytes)} (batch 1)" if litert else ""
        console.print(f"{fidelity_figures(m)}; full integer: {integer}{arena}", highlight=False)
        if m.int16_layers:
            console.print(f"int16 activations (mixed16): {', '.join(m.int16_layers)}", highlight=False, soft_wrap=True)
    if m.unrunnable:
        console.print(unrunnable_line(m).replace("**", ""), highlight=False, soft_wrap=True)
    _print_gate(summary, console)
    console.print(f"quantized model: {summary.artifacts['tflite'].uri}", highlight=False, soft_wrap=True)
    if "report_html" in summary.artifacts:
        console.print(f"report: {summary.artifacts['report_html'].uri}", highlight=False, soft_wrap=True)
    _print_ending(summary, console)


def print_sweep_summary(summary: SweepSummary, console: Console) -> None:
    from rich.table import Table

    table = Table(title=f"Configurations (test split), ranked by {summary.rank_by}", title_justify="left")
    for column in sweep_header(sweep_task(summary.rows), sweep_targets(summary.rows)):
        table.add_column(column, justify="left" if column in ("configuration", "I/O", "verdict") else "right")
    for line in sweep_rows(summary.rows):
        table.add_row(*line)
    console.print(table)
    _print_gate(summary, console)
    console.print(
        f"table: {summary.report.markdown.uri}\nplot: {summary.report.plot.uri}", highlight=False, soft_wrap=True
    )
    if "tflite" in summary.artifacts:
        console.print(f"best model: {summary.artifacts['tflite'].uri}", highlight=False, soft_wrap=True)
    _print_ending(summary, console)


def _figures(manifest: RunManifest) -> ValidationFigures | None:
    """A manifest's validation figures; None for a sweep where nothing passed (it has none)."""
    try:
        return ValidationFigures.model_validate(manifest.metrics)
    except ValidationError:
        return None


def fidelity_figures(m: ValidationFigures) -> str:
    """The task's figures in words, with the agreement and SQNR against the float model where they add to them."""
    words = fidelity_in_words(m)
    if m.task is ModelTask.classification:
        words += f"; top-1 agreement {percent(m.agreement)}"
    if m.task is not ModelTask.unlabeled:
        words += f"; SQNR against float {number(m.sqnr_db, ' dB', 1)}"
    return words


def run_figures(figures: ValidationFigures | None) -> tuple[str, str]:
    """A run's quantized figure and what quantizing lost, by its task: accuracy and drop (pp), MAE and its rise
    (%), or SQNR against the float model."""
    if figures is None or not figures.validated:
        return MISSING, MISSING
    if figures.task is ModelTask.regression:
        rise = MISSING if figures.mae_increase_pct is None else f"MAE +{figures.mae_increase_pct:.2f}%"
        return f"MAE {number(figures.quantized_mae, digits=4)}", rise
    if figures.task is ModelTask.unlabeled:
        return percent(figures.agreement), f"SQNR {number(figures.sqnr_db, ' dB', 1)}"
    drop = MISSING if figures.accuracy_drop_pp is None else f"-{figures.accuracy_drop_pp:.2f} pp"
    return percent(figures.quantized_accuracy), drop


def print_runs(manifests: Sequence[RunManifest], console: Console) -> None:
    """``ptqflow runs``: one line per run manifest (as stored), newest first."""
    from rich.table import Table

    table = Table(title=f"Runs in {manifests[0].store}", title_justify="left")
    for column in ("run", "flow", "finished (UTC)", "gate", "quantized", "vs float", "exported"):
        table.add_column(column, no_wrap=True)
    for manifest in manifests:
        figures = _figures(manifest)
        table.add_row(
            manifest.run_id[:8],
            manifest.flow,
            manifest.created_at.replace("T", " ")[:19],
            str(manifest.status),
            *run_figures(figures),
            manifest.export.version[:16] if manifest.export else "",
        )
    console.print(table)
