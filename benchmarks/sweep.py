"""The ptq-sweep flow (every configuration of the default grid) on a LocalCluster of two Dask worker processes
against the same flow running the configurations one at a time in its own process.

The model is a small MobileNetV2 (alpha 0.35, 64x64x3 input, random initialisation and one epoch on synthetic
images; nothing downloaded): a conversion takes seconds, as with real models, not the fraction of a second of the digits
CNN, whose sweep is dominated by fixed costs. The model is trained once; each measured run gets a fresh
store whose sampling, calibration sets and model (that trained model, by --model-url) were cached just before,
untimed; the timed sweep then converts and evaluates every
configuration and validates the best one in full. The Dask figure includes starting the cluster and TensorFlow
in each worker: that is what a user waits for."""

from __future__ import annotations

import statistics
import tempfile
import time

from benchmarks.common import Result

WORKERS = 2
IMAGE = 64
SAMPLES = 1600  # the training split (65%) must hold the largest calibration size, 1000
CLASSES = 10


def mobilenet_v2_small(input_shape, n_classes):
    """`--model benchmarks.sweep:mobilenet_v2_small`: MobileNetV2 (alpha 0.35) taking raw 0..255 pixels."""
    import keras

    inputs = keras.Input(tuple(input_shape), name="raw_input")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    backbone = keras.applications.MobileNetV2(
        input_shape=tuple(input_shape), alpha=0.35, weights=None, classes=n_classes
    )
    return keras.Model(inputs, backbone(x), name="mobilenet_v2_small")


def _write_images(path: str) -> None:
    """Synthetic images whose class sets their mean colour (one epoch does not get far: the figures here are
    times, and that both ways give the same models)."""
    import numpy as np

    from ptqflow.storage.tables import TensorTable, write_parquet_bytes

    rng = np.random.default_rng(0)
    labels = np.arange(SAMPLES) % CLASSES
    colours = rng.uniform(40, 215, (CLASSES, 3))
    images = colours[labels][:, None, None, :] + rng.normal(0, 40, (SAMPLES, IMAGE, IMAGE, 3))
    table = TensorTable(features=np.clip(images, 0, 255).astype(np.uint8), labels=labels.astype(np.int64))
    with open(path, "wb") as f:
        f.write(write_parquet_bytes(table))


def _rows(summary) -> dict[str, tuple[str, float | None]]:
    return {r.name: (r.metrics.model.sha256, r.metrics.quantized_accuracy) for r in summary.rows if r.metrics}


def _differences(runs: list[tuple[str, dict]]) -> list[str]:
    """Every configuration whose model bytes or accuracy differ from the first run's."""
    (first_mode, first), found = runs[0], []
    for i, (mode, rows) in enumerate(runs[1:], 1):
        for name, (sha, accuracy) in rows.items():
            if (sha, accuracy) != first[name]:
                found.append(
                    f"{mode} run {i} {name}: sha {sha[:12]} vs {first[name][0][:12]}, accuracy {accuracy} "
                    f"vs {first[name][1]} ({first_mode} run 0)"
                )
    return found


def run(repeats: int = 3) -> list[Result]:
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    from ptqflow.flows.cluster import dask_task_runner, shared_prefect_api
    from ptqflow.flows.pipeline import upstream_stages
    from ptqflow.flows.stages import StageRunner
    from ptqflow.flows.sweep import ptq_sweep
    from ptqflow.storage.store import ArtifactStore
    from ptqflow.tasks.core.parameters import (
        CalibrationParameters,
        GateParameters,
        SamplingParameters,
        SweepParameters,
        TrainingParameters,
    )

    with shared_prefect_api(), tempfile.TemporaryDirectory(prefix="ptqflow-bench-sweep-") as tmp:
        _write_images(f"{tmp}/images.parquet")
        parameters = {
            "sampling": SamplingParameters(dataset=f"{tmp}/images.parquet"),
            "training": TrainingParameters(model="benchmarks.sweep:mobilenet_v2_small", epochs=1),
            "calibration": CalibrationParameters(),
        }
        sweep = SweepParameters()
        gate = GateParameters(max_accuracy_drop=100.0)  # a best configuration (and its full validation) always

        @flow(name="ptqflow-benchmark-upstream")
        def upstream(store: str):
            return upstream_stages(
                StageRunner(ArtifactStore(store)), 0, **parameters, more_calibration_sizes=sweep.calibration_sizes
            )[2]

        # Trained once; every measured run quantizes that very .keras (--model-url), so all of them convert the
        # same model.
        trained = upstream(f"{tmp}/training")
        parameters["training"] = TrainingParameters(model_url=trained.model.uri)

        runners = {
            "sequential": lambda: ThreadPoolTaskRunner(max_workers=1),
            "dask": lambda: dask_task_runner(workers=WORKERS),
        }
        seconds: dict[str, list[float]] = {mode: [] for mode in runners}
        runs: list[tuple[str, dict]] = []
        configurations = 0
        for i in range(repeats):
            for mode, runner in runners.items():  # interleaved, so drift on the machine hits both alike
                store = f"{tmp}/{mode}-{i}"
                upstream(store)
                started = time.perf_counter()
                summary = ptq_sweep.with_options(task_runner=runner())(
                    store=store, sweep=sweep, gate=gate, **parameters
                )
                seconds[mode].append(time.perf_counter() - started)
                runs.append((mode, _rows(summary)))
                configurations = len([r for r in summary.rows if not r.reference])
        differences = _differences(runs)
        same = not differences
    dask_s, sequential_s = statistics.median(seconds["dask"]), statistics.median(seconds["sequential"])
    share = dask_s / sequential_s
    return [
        Result(
            name="sweep_dask",
            metric=f"sweep of {configurations} configurations (MobileNetV2 0.35, 64x64) on {WORKERS} Dask worker "
            "processes",
            unit="s",
            ours=dask_s,
            baseline=sequential_s,
            ratio=sequential_s / dask_s,
            target="<= 0.65x sequential wall time",
            met=share <= 0.65,
            ours_label=f"LocalCluster, {WORKERS} worker processes",
            baseline_label="one at a time, in the flow's process",
            detail={
                "share_of_sequential": share,
                "ours_runs_s": seconds["dask"],
                "baseline_runs_s": seconds["sequential"],
                "configurations": configurations,
                "same_models_and_accuracies": same,
                "differences": differences,
            },
        )
    ]
