"""Models that are not softmax classifiers, from the CLI: regression on numeric targets, and unlabeled data judged
against the float model's own outputs (``--task``)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_outlier_model

pytestmark = pytest.mark.slow


def write_noisy_function(path, rows: int = 2000, seed: int = 0) -> None:
    """Four features in [-1, 1] and a target ``y``: a smooth function of them plus noise (sd 0.1), as measured
    targets have; the float model's error is then mostly that noise, as in practice."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (rows, 4)).astype(np.float32)
    y = np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.5 * x[:, 3] ** 2 + rng.normal(0, 0.1, rows)
    pq.write_table(pa.table({**{f"x{i}": x[:, i] for i in range(4)}, "y": y.astype(np.float32)}), str(path))


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    """One data set and store for the regression run and sweep: the sweep reuses the run's trained model."""
    folder = tmp_path_factory.mktemp("regression")
    write_noisy_function(folder / "function.parquet")
    data = ["--dataset", str(folder / "function.parquet"), "--task", "regression", "--label-column", "y"]
    return folder, [*data, "--epochs", "30", "--store", str(folder / "store")]


def test_a_regression_model_is_trained_gated_and_promoted_on_its_mae(cli, regression):
    folder, upstream = regression
    store = str(folder / "store")
    args = [*upstream, "--export", str(folder / "export"), "--json"]
    first = cli("run", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads(first.stdout)
    metrics = result["metrics"]
    assert metrics["task"] == "regression" and metrics["float_accuracy"] is None
    assert 0.07 < metrics["float_mae"] < 0.2  # the noise's MAE is 0.08: the model learned the function
    assert 0 <= metrics["mae_increase_pct"] <= 5.0 and metrics["full_integer"]
    assert metrics["mae_increase_pct"] == pytest.approx(
        (metrics["quantized_mae"] - metrics["float_mae"]) / metrics["float_mae"] * 100, abs=1e-3
    )
    assert result["gate"]["name"] == "error_increase" and result["status"] == "passed"
    assert result["promotion"]["promote"] and result["promotion"]["metric"] == "mae"

    report = json.loads(open(result["artifacts"]["report"]["uri"].removeprefix("file://")).read())
    quantized = report["metrics"]["models"]["quantized_tflite"]
    assert quantized["mae"] == metrics["quantized_mae"] and quantized["rmse"] >= quantized["mae"]
    assert quantized["accuracy"] is None and quantized["confusion_matrix"] == []
    markdown = open(result["artifacts"]["report_md"]["uri"].removeprefix("file://")).read()
    assert "MAE (targets)" in markdown and "Per-class accuracy" not in markdown

    # Again: every stage cached, and the champion check compares the two on MAE, over the whole test split.
    second = json.loads(cli("run", *args).stdout)
    assert all(stage["cached"] for stage in second["tasks"].values())
    promotion = second["promotion"]
    assert promotion["metric"] == "mae" and promotion["promote"]
    assert promotion["champion_mae"] == pytest.approx(metrics["quantized_mae"], abs=1e-6)
    assert promotion["compared_rows"] == report["metrics"]["samples"]

    runs = cli("runs", "--store", store)
    assert runs.returncode == 0 and "MAE 0." in runs.stdout


def test_unlabeled_data_gates_a_given_model_on_its_fidelity_to_the_float_model(cli, tmp_path, trained_digits_model):
    from ptqflow.storage.keras_models import keras_model_to_bytes

    model_file = tmp_path / "digits.keras"
    model_file.write_bytes(keras_model_to_bytes(trained_digits_model))
    store = str(tmp_path / "store")
    args = ["--task", "unlabeled", "--model-url", str(model_file), "--store", store, "--json"]
    run = cli("run", *args, "--export", str(tmp_path / "export"))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    metrics = result["metrics"]
    assert metrics["task"] == "unlabeled" and metrics["float_accuracy"] is None and metrics["float_mae"] is None
    assert metrics["sqnr_db"] > 20 and metrics["agreement"] >= 0.98  # class scores: top-1 agreement applies
    assert result["gate"]["name"] == "float_fidelity" and "dB SQNR" in result["gate"]["message"]
    assert result["promotion"]["metric"] == "none" and "no labels to compare" in result["promotion"]["message"]

    # Only the gate changes: no stage reruns, and a bar the model cannot reach fails the run with the option.
    strict = cli("run", *args, "--min-sqnr", "90")
    assert strict.returncode == 1
    failed = json.loads(strict.stdout)
    assert all(stage["cached"] for stage in failed["tasks"].values())
    assert failed["status"] == "failed" and "--min-sqnr" in failed["gate"]["message"]

    # The sweep ranks configurations by their SQNR against the float model, reusing the cached stages.
    sweep = cli(
        "sweep",
        "--in-process",
        *args,
        "--configurations",
        "int8,int8-mse,float16",
        "--calibration-sizes",
        "200",
        "--rank-by",
        "accuracy",
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    swept = json.loads(sweep.stdout)
    ranked = [r for r in swept["rows"] if r["passed"]]
    assert ranked and all(r["metrics"]["task"] == "unlabeled" for r in ranked)
    sqnrs = [r["metrics"]["sqnr_db"] or float("inf") for r in ranked]
    assert sqnrs == sorted(sqnrs, reverse=True)  # the most faithful first
    assert swept["tasks"]["train_float_model"]["cached"]


def write_two_output_model(path, saved_model: bool = False) -> None:
    """A digits model with two heads, in that order: ``box`` (four numbers per image, linear) and ``scores``
    (softmax over the ten digits); as a ``.keras`` file, or ``saved_model`` as a SavedModel directory
    (``model.export``)."""
    import keras

    from ptqflow.tasks.data.datasets import load_dataset

    table = load_dataset("digits")
    x = table.features.astype(np.float32)
    keras.utils.set_random_seed(0)
    pixels = keras.Input((8, 8, 1), name="pixels")
    h = keras.layers.Rescaling(1 / 16)(pixels)
    h = keras.layers.Conv2D(16, 3, activation="relu", padding="same")(h)
    h = keras.layers.Dense(32, activation="relu")(keras.layers.Flatten()(h))
    box = keras.layers.Dense(4, name="box")(h)
    scores = keras.layers.Dense(10, activation="softmax", name="scores")(h)
    model = keras.Model(pixels, [box, scores])
    targets = np.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, :4].mean((1, 2, 3)), x[:, 4:].mean((1, 2, 3))], 1)
    model.compile("adam", ["mse", "sparse_categorical_crossentropy"])
    model.fit(x, [targets / 16, table.labels], epochs=15, verbose=0)
    if saved_model:
        model.export(str(path), verbose=False)
    else:
        model.save(path)


def test_every_output_of_a_two_output_model_is_validated_by_name(cli, tmp_path):
    write_two_output_model(tmp_path / "two_heads.keras")
    args = ["--task", "unlabeled", "--model-url", str(tmp_path / "two_heads.keras")]
    args += ["--store", str(tmp_path / "store"), "--json"]
    run = cli("run", *args, "--min-sqnr", "10")
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads(run.stdout)["metrics"]
    outputs = metrics["outputs"]
    assert list(outputs) == ["box", "scores"]  # the Keras model's order and names, whatever the .tflite's order
    assert outputs["scores"]["agreement"] >= 0.98 and outputs["box"]["agreement"] is None  # a box has no top-1
    assert metrics["sqnr_db"] == min(o["sqnr_db"] for o in outputs.values())
    assert outputs["scores"]["max_abs_error"] < 0.1 and outputs["box"]["mae"] > 0

    # The gate holds every output to it, and names the one that fails it; nothing but the gate is run again.
    strict_bar = (outputs["box"]["sqnr_db"] + outputs["scores"]["sqnr_db"]) / 2
    strict = cli("run", *args, "--min-sqnr", f"{strict_bar:.2f}")
    assert strict.returncode == 1
    failed = json.loads(strict.stdout)
    worst = min(outputs, key=lambda name: outputs[name]["sqnr_db"])
    assert f"(worst of 2 outputs: {worst})" in failed["gate"]["message"]
    assert all(stage["cached"] for stage in failed["tasks"].values())
    markdown = open(failed["artifacts"]["report_md"]["uri"].removeprefix("file://")).read()
    assert "## Outputs (quantized .tflite against float Keras)" in markdown and "| scores |" in markdown

    # Two outputs and class labels: one output is compared with the labels, so the run is refused.
    labelled = cli("run", "--model-url", str(tmp_path / "two_heads.keras"), "--store", str(tmp_path / "other"))
    assert labelled.returncode == 2 and "validate a model with several outputs against its float self" in (
        labelled.stderr
    )


def test_a_saved_model_with_two_outputs_is_validated_output_by_output(cli, tmp_path):
    """The SavedModel's serving signature names its outputs output_0, output_1 (model.export): they are validated
    in that order, under those names, each against the same output of the .tflite."""
    write_two_output_model(tmp_path / "two_heads", saved_model=True)
    args = ["--task", "unlabeled", "--model-url", str(tmp_path / "two_heads"), "--store", str(tmp_path / "store")]
    run = cli("run", *args, "--min-sqnr", "10", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = json.loads(run.stdout)["metrics"]["outputs"]
    assert list(outputs) == ["output_0", "output_1"]
    # Matched right: the box against the box, the scores against the scores (a swap would not even fit: 4 and 10
    # values per sample), each close to its float self.
    assert all(o["sqnr_db"] >= 10 for o in outputs.values())
    assert outputs["output_1"]["max_abs_error"] < 0.1  # probabilities
    # A SavedModel's graph does not say which output holds class scores: compared by value, not by top-1.
    assert all(o["agreement"] is None for o in outputs.values())


def test_repair_brings_an_unlabeled_model_back_within_its_fidelity_gate(cli, tmp_path, trained_digits_model):
    write_outlier_model(trained_digits_model, tmp_path / "outlier.keras")  # only its dense layer collapses in int8
    args = ["--task", "unlabeled", "--model-url", str(tmp_path / "outlier.keras"), "--ops", "builtins"]
    run = cli("run", *args, "--store", str(tmp_path / "store"), "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert summary["repair"]["succeeded"] and "dense" in summary["repair"]["float_layers"]
    assert summary["repair"]["steps"][-1]["validation"].startswith("SQNR ")  # judged by the task's own figure
    assert summary["gate"]["message"].startswith("gate passed after repair: quantized outputs at")
    assert summary["metrics"]["sqnr_db"] >= 20 and summary["metrics"]["agreement"] >= 0.98
    report = json.loads(open(summary["artifacts"]["report"]["uri"].removeprefix("file://")).read())
    cost = report["metrics"]["repair"]
    assert cost["unrepaired_accuracy"] is None and cost["unrepaired_fidelity"].startswith("quantized outputs at")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "unlabeled"], "--task unlabeled has no labels to train on: pass the trained model to quantize"),
        (["--task", "regression"], "digits labels its samples with classes, not numeric targets"),
        (["--label-column", "y", "--dataset", "{function}"], "numeric targets need --task regression"),
        (["--task", "classification", "--dataset", "{unlabeled}"], "or, for a model whose float outputs are the"),
    ],
)
def test_data_or_models_that_do_not_fit_the_task_are_one_line_and_exit_2(cli, tmp_path, args, message):
    write_noisy_function(tmp_path / "function.parquet", rows=200)
    pq.write_table(pq.read_table(str(tmp_path / "function.parquet")).drop_columns(["y"]), str(tmp_path / "x.parquet"))
    paths = {"{function}": str(tmp_path / "function.parquet"), "{unlabeled}": str(tmp_path / "x.parquet")}
    result = cli("run", "--store", str(tmp_path / "store"), *[paths.get(a, a) for a in args])
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "store" / "blobs").exists()


def test_a_regression_sweep_ranks_configurations_by_their_mae_and_exports_the_best(cli, regression):
    folder, upstream = regression
    result = cli(
        "sweep",
        "--in-process",
        *upstream,
        "--configurations",
        "int8,int8-per-tensor,int16x8,float16",
        "--calibration-sizes",
        "200",
        "--rank-by",
        "accuracy",
        "--export",
        str(folder / "sweep-export"),
        "--json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    rows = [r for r in summary["rows"] if not r["reference"]]
    assert all(r["metrics"]["task"] == "regression" and r["metrics"]["quantized_mae"] > 0 for r in rows)
    ranked = [r for r in rows if r["passed"]]
    rises = [r["metrics"]["mae_increase_pct"] for r in ranked]
    assert ranked and rises == sorted(rises)  # ranked by the task's own figure
    assert summary["best"] == ranked[0]["name"] and summary["metrics"]["task"] == "regression"
    assert summary["export"] is not None and summary["promotion"]["metric"] == "mae"
    table = open(summary["report"]["markdown"]["uri"].removeprefix("file://")).read()
    assert "| MAE | MAE rise % |" in table
