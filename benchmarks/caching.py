"""The whole pipeline on digits: a warm rerun (everything cached) and a conversion-only change vs a cold run.
Measured in one process with the Prefect server already up, so the figures are the flow's own time."""

from __future__ import annotations

import tempfile

from benchmarks.common import Result, median_seconds


def run(repeats: int = 3) -> list[Result]:
    from prefect import flow

    from ptqflow.flows.pipeline import ptq_pipeline
    from ptqflow.tasks.core.parameters import ConversionParameters, TensorType

    @flow(name="ptqflow-benchmark-warm-up")
    def warm_up() -> int:
        return 1

    warm_up()  # starts Prefect's ephemeral server outside the timings
    with tempfile.TemporaryDirectory(prefix="ptqflow-bench-") as tmp:
        cold_stores = iter(f"{tmp}/cold-{i}" for i in range(repeats))
        changed_stores = iter(f"{tmp}/cold-{i}" for i in range(repeats))
        cold_s, cold_all = median_seconds(lambda: ptq_pipeline(store=next(cold_stores)), repeats)
        warm_s, warm_all = median_seconds(lambda: ptq_pipeline(store=f"{tmp}/cold-0"), repeats)
        uint8_io = ConversionParameters(input_type=TensorType.uint8, output_type=TensorType.uint8)
        changed_s, changed_all = median_seconds(
            lambda: ptq_pipeline(store=next(changed_stores), conversion=uint8_io), repeats
        )
    share = warm_s / cold_s
    return [
        Result(
            name="caching_warm",
            metric="warm rerun of the whole pipeline (digits), all stages cached",
            unit="s",
            ours=warm_s,
            baseline=cold_s,
            ratio=cold_s / warm_s,
            target="<= 15% of a cold run",
            met=share <= 0.15,
            ours_label="warm rerun",
            baseline_label="cold run (the tutorial reruns everything)",
            detail={"share_of_cold": share, "ours_runs_s": warm_all, "baseline_runs_s": cold_all},
        ),
        Result(
            name="caching_conversion_change",
            metric="conversion-only change (uint8 I/O): only conversion and validation rerun",
            unit="s",
            ours=changed_s,
            baseline=cold_s,
            ratio=cold_s / changed_s,
            target="reported",
            met=None,
            ours_label="rerun after a conversion change",
            baseline_label="cold run",
            detail={"share_of_cold": changed_s / cold_s, "ours_runs_s": changed_all, "baseline_runs_s": cold_all},
        ),
    ]
