"""The sweep's plot: size against what quantizing cost, and latency, per configuration."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from ptqflow.tasks.core.parameters import ModelTask
from ptqflow.tasks.evaluation.fidelity import LOSS_LABEL, fidelity_loss
from ptqflow.tasks.sweep.ranking import SweepRow


def render_sweep_plot(rows: Sequence[SweepRow]) -> bytes:
    """PNG: size against what quantizing cost by the task's figure (passing configurations in green), and latency
    per configuration."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a batch job
    from matplotlib import pyplot as plt

    measured = [
        (r, m, loss)
        for r in rows
        if (m := r.metrics) is not None
        and m.validated
        and (loss := fidelity_loss(m)) is not None
        and math.isfinite(loss)
    ]
    task = measured[0][1].task if measured else ModelTask.classification
    figure, (scatter, bars) = plt.subplots(1, 2, figsize=(13, 5))
    for r, m, loss in measured:
        colour = "#8c8c8c" if r.reference else "#55a868" if r.passed else "#c44e52"
        scatter.scatter(m.bytes / 1024, loss, color=colour, s=40)
        scatter.annotate(
            r.name,
            (m.bytes / 1024, loss),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    scatter.set_xlabel("model size (KiB)")
    scatter.set_ylabel(LOSS_LABEL[task])
    scatter.set_title("size vs fidelity (green: passes the gate)")
    timed = [(r, m) for r, m, _ in measured if m.latency_p50_ms is not None]
    bars.barh(
        [r.name for r, _ in timed][::-1],
        [m.latency_p50_ms for _, m in timed][::-1],
        color=["#8c8c8c" if r.reference else "#55a868" if r.passed else "#c44e52" for r, _ in timed][::-1],
    )
    bars.set_xlabel("latency at batch 1, p50 (ms)")
    bars.set_title("latency")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()
