"""A model whose int8 kernels refuse some test samples, from the CLI: a failed gate naming them, never a crash."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow


def test_refused_samples_fail_the_gate_in_one_line_and_an_allowance_reruns_nothing(cli, tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    windows = rng.normal(size=(600, 8)).astype(np.float32)
    windows[:, 0] = np.abs(windows[:, 0]) + 0.5  # a clear peak in every window...
    windows[::50] = -1.0 - rng.uniform(size=(12, 8)).astype(np.float32)  # ...but 12 silent ones, all distinct
    labels = (windows[:, 1] > 0).astype(np.int64) + (windows[:, 2] > 0)
    inputs = keras.Input((8,), name="window")
    level = keras.layers.ReLU()(inputs)
    peak = keras.ops.max(level, axis=-1, keepdims=True) + 1e-6  # float divides by it; int8 has no step that small
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.ops.divide(level, peak)))
    model.save(tmp_path / "peak.keras")
    table = pa.table({"features": pa.array(list(windows), type=pa.list_(pa.float32(), 8)), "label": labels})
    pq.write_table(table, tmp_path / "windows.parquet")
    args = ["--dataset", str(tmp_path / "windows.parquet"), "--feature-column", "features", "--label-column", "label"]
    args += ["--model-url", str(tmp_path / "peak.keras"), "--store", str(tmp_path / "store"), "--json"]
    args += ["--max-accuracy-drop", "100"]  # an untrained model: only the refused samples are judged here

    refused = cli("run", *args)
    assert refused.returncode == 1, refused.stderr[-3000:]  # a failed gate, not an error (3)
    result = json.loads(refused.stdout)
    assert result["gate"]["name"] == "unrunnable_samples" and "\n" not in result["gate"]["message"]
    assert "the quantized .tflite refused" in result["gate"]["message"] and "DIV (node" in result["gate"]["message"]
    left_out = result["metrics"]["unrunnable_rows"]
    assert left_out > 0 and "Traceback" not in refused.stderr
    report = json.loads(open(result["artifacts"]["report"]["uri"].removeprefix("file://")).read())
    assert report["metrics"]["unrunnable_rows"] == left_out and report["metrics"]["unrunnable"][0]["count"] == left_out

    allowed = cli("run", *args, "--max-unrunnable-fraction", "0.2")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    again = json.loads(allowed.stdout)
    assert again["status"] == "passed" and all(stage["cached"] for stage in again["tasks"].values())
