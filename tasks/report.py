"""The validation report for people: ``report.md`` and a self-contained ``report.html`` (plots embedded as PNG),
rendered from the same document as ``report.json``. Pure functions of that document."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

REPORT_VERSION = 2
MODEL_LABELS = {"float_keras": "float Keras", "float_tflite": "float .tflite", "quantized_tflite": "quantized .tflite"}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2%}"


def _num(value: float | None, unit: str = "", digits: int = 3) -> str:
    return "—" if value is None else f"{value:,.{digits}f}{unit}"


def model_rows(metrics: dict[str, Any]) -> list[list[str]]:
    rows = []
    for key, label in MODEL_LABELS.items():
        m = metrics.get("models", {}).get(key)
        if m is None:
            rows.append([label, "not run", "", "", "", "", "", "", ""])
            continue
        speed = m.get("speed", {})
        latency = speed.get("latency_ms", {})
        rows.append(
            [
                label,
                _pct(m["accuracy"]),
                _pct(m["agreement_with_float"]),
                _num(m["output_mae"], digits=5),
                "—" if m["output_sqnr_db"] is None else f"{m['output_sqnr_db']:.1f} dB",
                "—" if m["bytes"] is None else f"{m['bytes']:,} B",
                _num(latency.get("p50"), " ms"),
                _num(latency.get("p95"), " ms"),
                _num(speed.get("throughput_per_s"), "/s", 0),
            ]
        )
    return rows


MODEL_HEADER = [
    "model",
    "accuracy",
    "top-1 agreement",
    "output MAE",
    "SQNR",
    "size",
    "latency p50 (batch 1)",
    "latency p95",
    "throughput",
]
LAYER_HEADER = ["layer", "op", "badness", "rmse / scale", "typical steps", "scale"]


def layer_rows(metrics: dict[str, Any], count: int = 10) -> list[list[str]]:
    return [
        [
            layer["layer"],
            layer["op"],
            f"{layer['badness']:.2f}",
            f"{layer['rmse_over_scale']:.3f}",
            "n/a" if layer["typical_steps"] is None else f"{layer['typical_steps']:.3g}",
            f"{layer['scale']:.4g}",
        ]
        for layer in metrics.get("layers", [])[:count]
    ]


def ranking_line(metrics: dict[str, Any]) -> tuple[str, bool] | None:
    """The ranking margin of the two worst layers as a sentence, and whether it is a close call."""
    from ptqflow.tasks.diagnose import LayerError, ranking_margin

    margin = ranking_margin([LayerError(**layer) for layer in metrics.get("layers", [])[:2]])
    if margin is None:
        return None
    sentence = str(margin)
    return sentence[0].upper() + sentence[1:] + ".", margin.close


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _verdict(metrics: dict[str, Any]) -> str:
    if not metrics["validated"]:
        return f"**Not validated**: {metrics['not_validated_reason']}"
    audit = metrics["audit"]
    integer = "full integer" if audit["full_integer"] else f"{len(audit['float_ops'])} ops with float tensors"
    unrepeatable = (
        f"**outputs differ by up to {metrics['rerun_max_difference']:.3g} between two runs on the same input**; "
        if metrics.get("rerun_max_difference")
        else ""
    )
    return unrepeatable + (
        f"Quantized accuracy {_pct(metrics['quantized_accuracy'])} against {_pct(metrics['float_accuracy'])} float "
        f"(drop {metrics['accuracy_drop_pp']:.2f} pp) on {metrics['samples']:,} test samples; {integer}; "
        f"{metrics['quantized_bytes']:,} B against {metrics['float_bytes']:,} B float; "
        f"{metrics['num_threads']} interpreter thread(s)."
    )


def _audit_lines(audit: dict[str, Any]) -> list[str]:
    lines = [
        f"- ops: {', '.join(audit['ops'])}",
        f"- tensor types: {', '.join(f'{k} x{v}' for k, v in audit['dtypes'].items())}",
        f"- input {audit['input']['dtype']} (scale {audit['input']['scale']:.6g}, zero point "
        f"{audit['input']['zero_point']}), output {audit['output']['dtype']} (scale {audit['output']['scale']:.6g}, "
        f"zero point {audit['output']['zero_point']})",
    ]
    if audit["flex_ops"]:
        lines.append(f"- **TensorFlow (Flex) ops**: {', '.join(audit['flex_ops'])}")
    if audit["float_ops"]:
        shown = ", ".join(f"{o['op']} ({o['output']})" for o in audit["float_ops"][:10])
        lines.append(f"- **ops with float tensors**: {shown}")
    else:
        lines.append("- no float tensor: full integer")
    return lines


def _repair_lines(repair: dict[str, Any] | None) -> list[str]:
    if not repair:
        return []
    lines = [f"- {repair['message']}"]
    for i, step in enumerate(repair["steps"], 1):
        lines.append(
            f"- step {i}: {', '.join(step['float_layers'])} in float: validation drop "
            f"{step['validation_drop_pp']:.2f} pp, "
            f"{step['quantized_bytes']:,} B"
        )
    if repair.get("succeeded"):
        lines.append(
            f"- test accuracy {_pct(repair.get('repaired_accuracy'))} repaired, against "
            f"{_pct(repair.get('unrepaired_accuracy'))} fully quantized"
        )
        lines.append(
            f"- cost: {repair['repaired_bytes']:,} B against {repair['unrepaired_bytes']:,} B fully quantized; "
            f"latency p50 {_num(repair.get('repaired_latency_ms_p50'), ' ms')} against "
            f"{_num(repair.get('unrepaired_latency_ms_p50'), ' ms')}"
        )
    return lines


def _promotion_lines(promotion: dict[str, Any] | None) -> list[str]:
    """The champion/challenger decision of the run that exported (or did not export) this model."""
    if not promotion:
        return []
    champion = "exported model" + (
        f" (version {promotion['champion_version']})" if promotion.get("champion_version") else ""
    )
    return [
        f"- {promotion['message']}",
        f"- this model: {_pct(promotion['challenger_accuracy'])}; {champion}: {_pct(promotion['champion_accuracy'])} "
        f"(on {promotion.get('comparison') or 'the same test rows'}; tolerance {promotion['tolerance_pp']} pp)",
    ]


def render_markdown(document: dict[str, Any]) -> str:
    metrics = document["metrics"]
    promotion = _promotion_lines(document.get("promotion"))
    parts = [
        "# ptqflow validation report",
        "",
        _verdict(metrics),
        "",
        *(["## Promotion", "", *promotion, ""] if promotion else []),
        "## Models (test split)",
        "",
        _markdown_table(MODEL_HEADER, model_rows(metrics)),
        "",
        "Agreement, MAE and SQNR compare each model's outputs with the float Keras model's.",
        "",
        "## Per-class accuracy",
        "",
        _markdown_table(
            ["class", *[MODEL_LABELS[k] for k in metrics.get("models", {})]],
            [
                [name, *[_pct(m["per_class_accuracy"][name]) for m in metrics.get("models", {}).values()]]
                for name in metrics["class_names"]
            ],
        ),
        "",
        "## Per-layer quantization error (QuantizationDebugger)",
        "",
    ]
    if metrics.get("layers"):
        parts += [
            "Of the fully quantized conversion, worst first. badness = max(rmse/scale x sqrt(12), 1 / typical "
            "steps): 1 is plain rounding; a large value names a layer whose error or lost resolution hurts the "
            "model. Typical steps: the median non-zero activation in quantization steps (below 1, the layer's "
            "range is taken by outliers).",
            "",
            _markdown_table(LAYER_HEADER, layer_rows(metrics)),
            *(["", f"**{margin[0]}**" if margin[1] else margin[0]] if (margin := ranking_line(metrics)) else []),
        ]
    else:
        parts.append(f"Not available: {metrics.get('layers_unavailable')}")
    parts += ["", "## Audit", "", *_audit_lines(metrics["audit"])]
    if metrics.get("repair"):
        parts += ["", "## Repair", "", *_repair_lines(metrics["repair"])]
    parts += ["", "## Confusion matrices", ""]
    for key, m in metrics.get("models", {}).items():
        parts += [
            f"### {MODEL_LABELS[key]}",
            "",
            _markdown_table(
                ["true \\ predicted", *metrics["class_names"]],
                [[name, *[str(v) for v in row]] for name, row in zip(metrics["class_names"], m["confusion_matrix"])],
            ),
            "",
        ]
    return "\n".join(parts) + "\n"


def _png(figure) -> str:
    buffer = io.BytesIO()
    # No timestamp or software tag: the same figures give the same bytes.
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode()


def plots(metrics: dict[str, Any]) -> dict[str, str]:
    """Base64 PNGs: accuracy per model, confusion matrices, per-layer error."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a batch job
    from matplotlib import pyplot as plt

    images = {}
    models = metrics.get("models", {})
    figure, axis = plt.subplots(figsize=(5, 3))
    labels = [MODEL_LABELS[k] for k in models]
    values = [m["accuracy"] * 100 for m in models.values()]
    axis.bar(labels, values, color=["#4c72b0", "#55a868", "#c44e52"][: len(values)])
    low = max(0.0, min(values) - 5) if values else 0
    axis.set_ylim(low, 100)
    axis.set_ylabel("test accuracy (%)")
    for i, v in enumerate(values):
        axis.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    images["accuracy"] = _png(figure)
    plt.close(figure)

    if models:
        figure, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.8), squeeze=False)
        for axis, (key, m) in zip(axes[0], models.items()):
            axis.imshow(m["confusion_matrix"], cmap="Blues")
            axis.set_title(MODEL_LABELS[key])
            axis.set_xlabel("predicted")
            axis.set_ylabel("true")
            ticks = range(len(metrics["class_names"]))
            axis.set_xticks(ticks, metrics["class_names"], rotation=90, fontsize=7)
            axis.set_yticks(ticks, metrics["class_names"], fontsize=7)
        images["confusion"] = _png(figure)
        plt.close(figure)

    layers = metrics.get("layers", [])[:15]
    if layers:
        figure, axis = plt.subplots(figsize=(6, 0.35 * len(layers) + 1))
        names = [f"{layer['layer']} ({layer['op']})" for layer in layers][::-1]
        badness = [layer["badness"] for layer in layers][::-1]
        axis.barh(names, badness, color=["#c44e52" if b > 2 else "#8c8c8c" for b in badness])
        axis.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        axis.set_xscale("log")
        axis.set_xlabel("badness (1 = plain rounding; log scale)")
        images["layers"] = _png(figure)
        plt.close(figure)
    return images


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}.bad{color:#b00}img{max-width:100%}"
)


def render_html(document: dict[str, Any]) -> str:
    metrics = document["metrics"]
    images = plots(metrics) if metrics.get("models") else {}

    def image(key: str, alt: str) -> str:
        return f'<img alt="{alt}" src="data:image/png;base64,{images[key]}">' if key in images else ""

    def bullets(lines: list[str]) -> str:
        return "<ul>" + "".join(f"<li>{html.escape(line[2:].replace('**', ''))}</li>" for line in lines) + "</ul>"

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>ptqflow validation report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>ptqflow validation report</h1>",
        f"<p class='{'' if metrics['validated'] else 'bad'}'>{html.escape(_verdict(metrics).replace('**', ''))}</p>",
    ]
    if document.get("promotion"):
        parts += ["<h2>Promotion</h2>", bullets(_promotion_lines(document["promotion"]))]
    parts += [
        "<h2>Models (test split)</h2>",
        _html_table(MODEL_HEADER, model_rows(metrics)),
        image("accuracy", "accuracy per model"),
        "<h2>Per-layer quantization error</h2>",
    ]
    if metrics.get("layers"):
        parts += [_html_table(LAYER_HEADER, layer_rows(metrics)), image("layers", "per-layer error")]
        if margin := ranking_line(metrics):
            sentence, close = margin
            parts.append(f"<p class='{'bad' if close else ''}'>{html.escape(sentence)}</p>")
    else:
        parts.append(f"<p>Not available: {html.escape(str(metrics.get('layers_unavailable')))}</p>")
    parts += ["<h2>Audit</h2>", bullets(_audit_lines(metrics["audit"]))]
    if metrics.get("repair"):
        parts += ["<h2>Repair</h2>", bullets(_repair_lines(metrics["repair"]))]
    if images.get("confusion"):
        parts += ["<h2>Confusion matrices</h2>", image("confusion", "confusion matrices")]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
