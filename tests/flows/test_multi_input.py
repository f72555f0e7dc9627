"""Models with several inputs, from the CLI: one feature column per input (``--feature-column a,b``), each input
with its own normalisation and its own quantization parameters, fed by name from the data to the ``.tflite``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

ROW_SUM_SCALE = 1 / 128  # what the test's model was trained on: row sums / 128 and pixels / 16
PIXEL_SCALE = 1 / 16


def digits_in_two_columns(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Digits as two inputs: the 8x8x1 image (uint8, 0..16) and its eight row sums (float32, 0..128), so the two
    inputs' raw ranges differ eightfold."""
    from ptqflow.tasks.data.datasets import load_dataset

    digits = load_dataset("digits")
    images = digits.features
    sums = images.astype(np.float32).sum(axis=(2, 3))
    table = pa.table(
        {
            "image": pa.FixedShapeTensorArray.from_numpy_ndarray(images),
            "rowsums": pa.FixedSizeListArray.from_arrays(pa.array(sums.ravel()), 8),
            "label": pa.array(digits.labels),
        }
    )
    pq.write_table(table, str(path))
    return images, sums, digits.labels


@pytest.fixture(scope="module")
def two_columns(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two-inputs")
    return folder, *digits_in_two_columns(folder / "digits.parquet")


def test_a_two_input_h5_model_is_quantized_with_each_inputs_normalisation_and_fed_raw_bytes(cli, two_columns):
    """The model takes (row sums, pixels), named otherwise than the columns and trained on normalised values: the
    columns are given in its order, each with its scale; the .tflite takes raw uint8 per input, named after the
    columns, each with its own scale and zero point."""
    import keras

    from ptqflow.tasks.models.feeds import quantize_input

    folder, images, sums, labels = two_columns
    keras.utils.set_random_seed(0)
    rows_in, pixels_in = keras.Input((8,), name="rows_in"), keras.Input((64,), name="pixels_in")
    hidden = keras.layers.Concatenate()(
        [keras.layers.Dense(16, activation="relu")(rows_in), keras.layers.Dense(32, activation="relu")(pixels_in)]
    )
    model = keras.Model([rows_in, pixels_in], keras.layers.Dense(10, activation="softmax")(hidden))
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit([sums * ROW_SUM_SCALE, images.reshape(-1, 64) * PIXEL_SCALE], labels, epochs=25, verbose=0)
    model.save(folder / "two.h5")

    args = ["--dataset", str(folder / "digits.parquet"), "--feature-column", "rowsums,image"]
    args += ["--model-url", str(folder / "two.h5"), "--input-scale", f"{ROW_SUM_SCALE},{PIXEL_SCALE}"]
    args += ["--input-type", "uint8", "--store", str(folder / "store"), "--json"]
    run = cli("run", *args, "--export", str(folder / "export"))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    metrics = result["metrics"]
    assert result["status"] == "passed" and metrics["full_integer"]
    assert metrics["float_accuracy"] > 0.9 and metrics["accuracy_drop_pp"] <= 1.0

    report = json.loads(Path(result["artifacts"]["report"]["uri"].removeprefix("file://")).read_text())
    inputs = report["metrics"]["audit"]["inputs"]
    assert set(inputs) == {"image", "rowsums"} and {i["dtype"] for i in inputs.values()} == {"uint8"}
    # Each input quantized over its own raw range: pixels 0..16, row sums 0..128.
    assert inputs["image"]["scale"] == pytest.approx(16 / 255, rel=1e-3)
    assert inputs["rowsums"]["scale"] > 4 * inputs["image"]["scale"]
    markdown = Path(result["artifacts"]["report_md"]["uri"].removeprefix("file://")).read_text()
    assert "input image uint8" in markdown and "input rowsums uint8" in markdown

    # A device feeds each input its raw values by name, quantized with that input's own scale and zero point.
    from ai_edge_litert.interpreter import Interpreter

    latest = json.loads((folder / "export" / "latest.json").read_text())
    exported = folder / "export" / "versions" / latest["version"] / "model.tflite"
    runner = Interpreter(model_content=exported.read_bytes()).get_signature_runner()
    details = runner.get_input_details()
    assert [int(d) for d in details["image"]["shape_signature"]] == [1, 8, 8, 1]  # one sample per call, as a device
    image = quantize_input(images[:300].astype(np.float32), details["image"])
    rowsums = quantize_input(sums[:300], details["rowsums"])
    scores = np.concatenate(
        [next(iter(runner(image=image[i : i + 1], rowsums=rowsums[i : i + 1]).values())) for i in range(300)]
    )
    assert np.mean(np.argmax(scores, axis=1) == labels[:300]) > 0.9

    # Again: every stage cached, and the champion check runs the exported model on the test rows, input by input.
    again = json.loads(cli("run", *args, "--export", str(folder / "export")).stdout)
    assert all(stage["cached"] for stage in again["tasks"].values())
    promotion = again["promotion"]
    assert promotion["compared_rows"] == report["metrics"]["samples"]
    assert promotion["champion_accuracy"] == pytest.approx(metrics["quantized_accuracy"], abs=1e-9)


def test_the_default_model_trains_on_two_columns_and_the_sweep_ranks_every_method_on_them(cli, two_columns):
    folder, *_ = two_columns
    args = ["--dataset", str(folder / "digits.parquet"), "--feature-column", "image,rowsums", "--epochs", "30"]
    args += ["--store", str(folder / "default-store")]
    run = cli("run", *args, "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["status"] == "passed" and result["metrics"]["accuracy_drop_pp"] <= 1.0

    configurations = "int8,int8-percentile,int8-equalize-bias-correction,int8-fallback"
    sweep = cli("sweep", "--in-process", *args, "--configurations", configurations, "--json")
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads(sweep.stdout)["rows"] if not row["reference"]}
    assert set(rows) == set(configurations.split(","))
    assert all(row["metrics"]["validated"] and row["metrics"]["quantized_accuracy"] > 0.9 for row in rows.values())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset", "digits"], "digits is a built-in data set, whose samples feed one model input"),
        (["--feature-column", "image,nope"], "no column\\(s\\) 'nope'"),
        (["--feature-column", "image,rowsums", "--model", "cnn"], "--model cnn takes one image input"),
        (["--feature-column", "image,rowsums", "--input-shape", "8,8,1"], "takes no --input-shape"),
    ],
)
def test_several_input_columns_that_cannot_work_are_one_line_and_exit_2(cli, two_columns, tmp_path, extra, message):
    import re

    folder, *_ = two_columns
    args = ["--dataset", str(folder / "digits.parquet"), "--feature-column", "image,rowsums", "--epochs", "1"]
    run = cli("run", *args, *extra, "--store", str(tmp_path / "store"))
    assert run.returncode == 2, run.stderr[-2000:]
    assert re.search(message, run.stderr) and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
