"""Models that are not softmax classifiers, from the CLI: regression on numeric targets, and unlabeled data judged
against the float model's own outputs (``--task``)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow


def write_noisy_function(path, rows: int = 2000, seed: int = 0) -> None:
    """Four features in [-1, 1] and a target ``y``: a smooth function of them plus noise (sd 0.1), as measured
    targets have; the float model's error is then mostly that noise, as in practice."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (rows, 4)).astype(np.float32)
    y = np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.5 * x[:, 3] ** 2 + rng.normal(0, 0.1, rows)
    pq.write_table(pa.table({**{f"x{i}": x[:, i] for i in range(4)}, "y": y.astype(np.float32)}), str(path))


def test_a_regression_model_is_trained_gated_and_promoted_on_its_mae(cli, tmp_path):
    write_noisy_function(tmp_path / "function.parquet")
    store, export = str(tmp_path / "store"), str(tmp_path / "export")
    args = ["--dataset", str(tmp_path / "function.parquet"), "--task", "regression", "--label-column", "y"]
    args += ["--epochs", "30", "--store", store, "--export", export, "--json"]
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


def test_the_sweep_says_it_ranks_classifiers_only(cli, tmp_path):
    write_noisy_function(tmp_path / "function.parquet", rows=200)
    result = cli(
        "sweep",
        "--in-process",
        "--dataset",
        str(tmp_path / "function.parquet"),
        "--task",
        "regression",
        "--label-column",
        "y",
        "--store",
        str(tmp_path / "store"),
    )
    assert result.returncode == 2 and "ptqflow sweep ranks classifiers by accuracy so far" in result.stderr
    assert not (tmp_path / "store" / "blobs").exists()
