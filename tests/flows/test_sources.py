"""The pipeline on a user's own Parquet data: RGB images in a directory, and a tabular table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import free_port, write_huggingface_images, write_image_folder
from ptqflow.storage.store import ArtifactRef, ArtifactStore

pytestmark = pytest.mark.slow


def no_network(keras_home) -> dict[str, str]:
    """Keras's cache in ``keras_home`` and no network, whatever this machine has: downloads go to a closed port."""
    proxy = f"http://127.0.0.1:{free_port()}"
    return {"KERAS_HOME": str(keras_home), "HTTPS_PROXY": proxy, "https_proxy": proxy}


def write_rgb_parts(folder, parts: int, seed: int = 0, per_part: int = 300) -> None:
    """uint8 RGB 32x32 images of 4 classes (a bright square in a class-specific corner, on noise)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    for part in range(parts):
        labels = rng.integers(0, 4, per_part)
        images = rng.integers(0, 60, (per_part, 32, 32, 3)).astype(np.uint8)
        for i, label in enumerate(labels):
            y, x = [(4, 4), (4, 20), (20, 4), (20, 20)][label]
            images[i, y : y + 8, x : x + 8, label % 3] = 220
        table = pa.table({"image": pa.FixedShapeTensorArray.from_numpy_ndarray(images), "class": pa.array(labels)})
        pq.write_table(table, str(folder / f"part-{part}.parquet"))


def test_rgb_images_from_a_parquet_directory(cli, tmp_path):
    data = tmp_path / "images"
    write_rgb_parts(data, parts=2)
    args = [
        "--dataset",
        str(data),
        "--feature-column",
        "image",
        "--label-column",
        "class",
        "--epochs",
        "8",
        "--store",
        str(tmp_path / "store"),
    ]
    first = cli("run", *args, "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads(first.stdout)
    assert result["metrics"]["accuracy_drop_pp"] <= 1.0 and result["metrics"]["full_integer"]

    # New data in the directory: a new sample, so training and everything after it run again.
    write_rgb_parts(data, parts=3)
    second = json.loads(cli("run", *args, "--json").stdout)
    assert not second["tasks"]["sample_dataset"]["cached"] and not second["tasks"]["train_float_model"]["cached"]
    third = json.loads(cli("run", *args, "--json").stdout)
    assert all(t["cached"] for t in third["tasks"].values())


def test_tabular_features_get_an_mlp(cli, tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 900)
    centers = rng.normal(0, 1.5, (3, 12))
    values = ((centers[labels] + rng.normal(0, 1.0, (900, 12))) * 10 + 50).astype(np.float32)
    pq.write_table(
        pa.table(
            {"features": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), 12), "label": pa.array(labels)}
        ),
        str(tmp_path / "tabular.parquet"),
    )
    run = cli(
        "run",
        "--dataset",
        str(tmp_path / "tabular.parquet"),
        "--epochs",
        "30",
        "--store",
        str(tmp_path / "store"),
        "--json",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["metrics"]["float_accuracy"] > 0.8
    assert result["metrics"]["accuracy_drop_pp"] <= 1.0 and result["metrics"]["full_integer"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "/no/such/data.parquet"], "does not exist"),
        (
            ["--dataset", "s3://KEY:SECRET@bucket/data.parquet"],
            "invalid --dataset: the data set URL carries credentials",
        ),
        (["--input-shape", "3,x"], "invalid --input-shape"),
        (["--model", "not a model"], "invalid --model"),
        (["--sample-size", "5"], "invalid --sample-size: Input should be greater than or equal to 10"),
        (
            ["--sample-size", "5000"],
            "sample of 5000 samples asked for, but the data set digits has only 1797: pass --sample-size 1797 or less",
        ),
        (
            ["--sample-size", "20"],
            "gives class 0 2 samples, but the splits need 5 per class: pass --sample-size 52 or more",
        ),
    ],
)
def test_bad_sources_fail_before_any_work(cli, tmp_path, args, message):
    result = cli("run", "--store", str(tmp_path / "store"), *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "SECRET" not in result.stderr
    assert not (tmp_path / "store" / "blobs").exists()


def test_a_trained_model_from_a_url_is_quantized_without_training(cli, tmp_path, trained_digits_model, digits_splits):
    import hashlib

    from ptqflow.storage.keras_models import keras_model_to_bytes

    model_file = tmp_path / "model.keras"
    model_file.write_bytes(keras_model_to_bytes(trained_digits_model))
    args = ["--model-url", str(model_file), "--store", str(tmp_path / "store"), "--json"]
    first = cli("run", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads(first.stdout)
    assert result["artifacts"]["model"]["sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert result["metrics"]["full_integer"] and result["metrics"]["accuracy_drop_pp"] <= 1.0
    assert result["tasks"]["train_float_model"]["seconds"] < 30  # loaded, not trained

    # A different model at the same URL: the training stage takes it, and everything after it reruns.
    from ptqflow.tasks.models.training import build_default_cnn

    other = build_default_cnn(digits_splits[0])
    other.set_weights([w * 0.5 for w in trained_digits_model.get_weights()])
    model_file.write_bytes(keras_model_to_bytes(other))
    second = json.loads(cli("run", *args).stdout)
    assert not second["tasks"]["train_float_model"]["cached"]
    assert not second["tasks"]["convert_to_tflite"]["cached"]
    assert second["artifacts"]["model"]["sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()


def test_a_legacy_h5_model_with_its_own_input_normalisation_takes_camera_bytes(cli, tmp_path):
    """A model trained on x/127.5 - 1, saved as legacy .h5: with --input-scale/--input-offset and uint8 input it is
    validated on the same raw images as its float self, and loses at most 1 pp."""
    import keras

    write_rgb_parts(tmp_path / "images", parts=2)
    table = pq.read_table(str(tmp_path / "images"))
    raw = table.column("image").combine_chunks().to_numpy_ndarray().astype(np.float32)
    labels = table.column("class").to_numpy()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    hidden = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv")(inputs)
    hidden = keras.layers.Dense(16, activation="relu", name="dense")(keras.layers.Flatten(name="flat")(hidden))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax", name="probabilities")(hidden))
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(raw / 127.5 - 1, labels, epochs=8, batch_size=32, verbose=0)
    # Fed raw bytes instead, the model is lost: the normalisation is what makes it work.
    assert (model.predict(raw, verbose=0).argmax(1) == labels).mean() < 0.9
    model.save(tmp_path / "model.h5")

    args = ["--dataset", str(tmp_path / "images"), "--feature-column", "image", "--label-column", "class"]
    args += ["--model-url", str(tmp_path / "model.h5")]
    args += ["--input-scale", "0.00784313725", "--input-offset", "-1", "--input-type", "uint8"]
    result = cli("run", *args, "--store", str(tmp_path / "store"), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["metrics"]["float_accuracy"] > 0.95  # the float model, on the raw test images
    assert summary["metrics"]["accuracy_drop_pp"] <= 1.0 and summary["metrics"]["full_integer"]
    report = ArtifactStore(str(tmp_path / "store")).read_json(ArtifactRef(**summary["artifacts"]["report"]))
    assert report["metrics"]["audit"]["input"]["dtype"] == "uint8"
    assert {layer["layer"] for layer in report["metrics"]["layers"]} & {"conv", "dense", "probabilities"}


def test_a_savedmodel_directory_runs_end_to_end_and_is_exported_as_it_came(cli, tmp_path, trained_digits_model):
    trained_digits_model.export(str(tmp_path / "saved"))
    args = ["--model-url", str(tmp_path / "saved"), "--store", str(tmp_path / "store")]
    args += ["--export", str(tmp_path / "export"), "--json"]
    first = cli("run", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout)
    assert summary["metrics"]["full_integer"] and summary["metrics"]["accuracy_drop_pp"] <= 1.0
    assert summary["metrics"]["float_accuracy"] > 0.9 and summary["artifacts"]["model"]["uri"].endswith(".zip")
    assert summary["export"]["files"]["model"]["uri"].endswith("/model.savedmodel.zip")
    again = json.loads(cli("run", *args).stdout)
    assert again["tasks"]["train_float_model"]["cached"] and again["tasks"]["convert_to_tflite"]["cached"]


def test_an_image_folder_with_its_own_splits_runs_end_to_end_and_a_broken_image_is_named(cli, tmp_path):
    write_image_folder(tmp_path / "images" / "train", per_class=60, suffix=".jpg")
    write_image_folder(tmp_path / "images" / "test", per_class=20, suffix=".jpg", seed=1)
    args = ["--dataset", str(tmp_path / "images"), "--epochs", "10", "--calibration-size", "60", "--json"]
    exported = ["--store", str(tmp_path / "store"), "--export", str(tmp_path / "export")]
    result = cli("run", *args, *exported)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["metrics"]["float_accuracy"] > 0.9 and summary["metrics"]["accuracy_drop_pp"] <= 1.0
    store = ArtifactStore(str(tmp_path / "store"))
    dataset = store.read_json(ArtifactRef(**summary["artifacts"]["dataset"]))
    assert dataset["spec"]["class_names"] == ["circle", "square", "triangle"]
    assert dataset["spec"]["shape"] == [16, 16, 3]
    # The owner's test folder is the test split, whole; validation is carved from the train folder.
    assert dataset["splits"]["test"]["samples"] == 60
    assert dataset["splits"]["train"]["samples"] + dataset["splits"]["validation"]["samples"] == 180
    assert dataset["split"]["given"]["test"] == "folder test/"
    report = store.read_json(ArtifactRef(**summary["artifacts"]["report"]))
    assert report["metrics"]["samples"] == 60

    # Unchanged data: every stage is a cache hit, and the exported model is compared on the whole test folder,
    # which its recorded row digests prove it never trained on.
    again = json.loads(cli("run", *args, *exported).stdout)
    assert all(task["cached"] for task in again["tasks"].values())
    assert again["promotion"]["compared_rows"] == 60
    assert (tmp_path / "export" / "versions").exists() and list(
        (tmp_path / "export").glob("versions/*/seen_rows.parquet")
    )

    (tmp_path / "images" / "train" / "square" / "007.jpg").write_bytes(b"truncated")
    broken = cli("run", *args, "--store", str(tmp_path / "other"))
    assert broken.returncode == 2 and "train/square/007.jpg cannot be decoded" in broken.stderr
    assert "Traceback" not in broken.stderr and not (tmp_path / "other" / "blobs").exists()


def test_a_wide_table_runs_end_to_end_and_a_text_column_is_refused(cli, tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 900)
    columns = {f"f_{i}": pa.array((rng.normal(size=900) + 2 * labels * (i < 3)).astype(np.float32)) for i in range(8)}
    columns["note"] = pa.array(["x"] * 900)
    pq.write_table(pa.table({**columns, "label": pa.array(labels)}), str(tmp_path / "wide.parquet"))
    args = ["--dataset", str(tmp_path / "wide.parquet"), "--epochs", "20", "--json"]
    result = cli("run", *args, "--feature-columns", "f_*", "--store", str(tmp_path / "store"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["metrics"]["float_accuracy"] > 0.85 and summary["metrics"]["accuracy_drop_pp"] <= 1.0
    dataset = ArtifactStore(str(tmp_path / "store")).read_json(ArtifactRef(**summary["artifacts"]["dataset"]))
    assert dataset["spec"]["shape"] == [8]

    refused = cli("run", *args, "--feature-columns", "f_0,note", "--store", str(tmp_path / "other"))
    assert refused.returncode == 2 and "feature column 'note' has type string, not a number" in refused.stderr
    assert not (tmp_path / "other" / "blobs").exists()


def test_hugging_face_image_parquet_runs_end_to_end_with_its_class_names(cli, tmp_path):
    (tmp_path / "data").mkdir()
    write_huggingface_images(tmp_path / "data" / "train-00000-of-00001.parquet", rows=300)
    write_huggingface_images(tmp_path / "data" / "test-00000-of-00001.parquet", rows=90, seed=1)
    args = [
        "--dataset",
        str(tmp_path / "data"),
        "--feature-column",
        "image",
        "--epochs",
        "10",
        "--calibration-size",
        "100",
    ]
    result = cli("run", *args, "--store", str(tmp_path / "store"), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["metrics"]["float_accuracy"] > 0.95 and summary["metrics"]["accuracy_drop_pp"] <= 1.0
    dataset = ArtifactStore(str(tmp_path / "store")).read_json(ArtifactRef(**summary["artifacts"]["dataset"]))
    assert dataset["spec"]["class_names"] == ["cat", "dog", "fox"]
    assert dataset["splits"]["test"]["samples"] == 90  # the test file, as given
    assert dataset["split"]["given"]["test"] == "1 file: test-00000-of-00001.parquet"


def test_calibration_from_another_parquet_source(cli, tmp_path):
    data, production = tmp_path / "images", tmp_path / "production"
    write_rgb_parts(data, parts=2)
    write_rgb_parts(production, parts=1, seed=7, per_part=120)
    base = [
        "--dataset",
        str(data),
        "--feature-column",
        "image",
        "--label-column",
        "class",
        "--epochs",
        "6",
        "--store",
        str(tmp_path / "store"),
        "--json",
    ]
    own = json.loads(cli("run", *base).stdout)
    run = cli("run", *base, "--calibration-source", str(production), "--calibration-size", "100")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["tasks"]["train_float_model"]["cached"]  # same model, other calibration data
    assert not result["tasks"]["materialize_calibration_set"]["cached"]
    assert result["artifacts"]["calibration"]["sha256"] != own["artifacts"]["calibration"]["sha256"]
    assert result["metrics"]["accuracy_drop_pp"] <= 1.0

    too_few = cli("run", *base, "--calibration-source", str(production), "--calibration-size", "500")
    assert too_few.returncode == 2 and "the calibration source" in too_few.stderr and "has only 120" in too_few.stderr


def test_a_calibration_source_of_another_shape_is_refused(cli, tmp_path):
    data = tmp_path / "images"
    write_rgb_parts(data, parts=1)
    other = tmp_path / "other.parquet"
    pq.write_table(
        pa.table(
            {
                "image": pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((50, 8, 8, 3), np.uint8)),
                "class": pa.array(np.arange(50) % 4),
            }
        ),
        str(other),
    )
    run = cli(
        "run",
        "--dataset",
        str(data),
        "--feature-column",
        "image",
        "--label-column",
        "class",
        "--calibration-source",
        str(other),
        "--store",
        str(tmp_path / "store"),
    )
    assert run.returncode == 2
    assert "samples of shape [8, 8, 3], but the data set's are uint8 of shape [32, 32, 3]" in run.stderr
    assert not list((tmp_path / "store" / "blobs").rglob("*.keras"))  # refused before training


def test_a_keras_dataset_from_keras_cache_sampled_before_splitting(cli, tmp_path):
    import fsspec
    from keras_cache import write_fashion_mnist

    keras_home = tmp_path / "keras"
    write_fashion_mnist(keras_home / "datasets", n_train=600, n_test=200)
    offline = no_network(keras_home)
    run = cli(
        "run",
        "--dataset",
        "fashion_mnist",
        "--sample-size",
        "400",
        "--epochs",
        "6",
        "--store",
        str(tmp_path / "store"),
        "--json",
        env=offline,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    with fsspec.open(result["artifacts"]["dataset"]["uri"]) as f:
        sampled = json.load(f)
    assert sampled["sample_size"] == 400
    assert sum(split["samples"] for split in sampled["splits"].values()) == 400
    assert sampled["spec"]["shape"] == [28, 28, 1] and sampled["spec"]["class_names"][9] == "Ankle boot"
    assert sampled["split"]["given"]["test"] == "keras.datasets.fashion_mnist test part"
    assert result["metrics"]["accuracy_drop_pp"] <= 1.0 and result["metrics"]["full_integer"]


def test_a_keras_dataset_offline_says_where_to_put_the_file(cli, tmp_path):
    keras_home = tmp_path / "keras"
    keras_home.mkdir()
    offline = no_network(keras_home)
    run = cli("run", "--dataset", "mnist", "--store", str(tmp_path / "store"), env=offline)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "cannot download the mnist data set" in run.stderr
    assert f"mnist.npz as {keras_home / 'datasets' / 'mnist.npz'}, then rerun" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "store" / "blobs").exists()


def test_a_source_url_with_the_run_date(cli, tmp_path):
    from datetime import datetime, timezone

    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")  # (a run started across midnight UTC would miss it)
    (tmp_path / "events").mkdir()
    write_rgb_parts(tmp_path / "events" / today, parts=1)
    args = [
        "--dataset",
        str(tmp_path / "events" / "{date:%Y-%m-%d}"),
        "--feature-column",
        "image",
        "--label-column",
        "class",
        "--epochs",
        "2",
        "--calibration-size",
        "100",
        "--store",
        str(tmp_path / "store"),
    ]
    result = cli("run", *args, "--max-accuracy-drop", "100", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    dataset = json.loads(
        ArtifactStore(str(tmp_path / "store")).read_bytes(ArtifactRef(**summary["artifacts"]["dataset"]))
    )
    assert dataset["source"] == str(tmp_path / "events" / today)
    manifest = json.loads((tmp_path / "store" / "runs" / f"{summary['run_id']}.json").read_text())
    assert manifest["parameters"]["sampling"]["dataset"].endswith("{date:%Y-%m-%d}")  # the template, as given


def write_table(path, values: np.ndarray, labels: np.ndarray, metadata: bytes | None = None) -> str:
    table = pa.table(
        {
            "features": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1]),
            "label": pa.array(labels),
        }
    )
    if metadata is not None:
        table = table.replace_schema_metadata({b"ptqflow": metadata})
    pq.write_table(table, str(path))
    return str(path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda p: ["--dataset", write_table(p, np.full((300, 6), 7.0, np.float32), np.arange(300) % 3)],
            "every value of every sample is 7 (value range [7, 7]): there is nothing to learn",
        ),
        (
            lambda p: [
                "--dataset",
                write_table(
                    p,
                    np.random.default_rng(0).random((300, 6), np.float32),
                    np.arange(300) % 3,
                    b'{"shape": "six", "value_range": [0, 1]}',
                ),
            ],
            "the table's 'ptqflow' schema metadata is malformed (shape 'six' is not a list of positive integers)",
        ),
        (
            lambda p: [
                "--dataset",
                write_table(p, np.random.default_rng(0).random((300, 6), np.float32), np.arange(300) % 3, b"{not json"),
            ],
            "the table's 'ptqflow' schema metadata is malformed",
        ),
        (lambda p: ["--input-shape", "\u00b2"], "invalid --input-shape '\u00b2'"),
    ],
    ids=["constant-features", "metadata-wrong-type", "metadata-not-json", "superscript-shape"],
)
def test_more_bad_input_ends_in_one_line_and_exit_2(cli, tmp_path, make, message):
    result = cli("run", "--store", str(tmp_path / "store"), *make(tmp_path / "data.parquet"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "store" / "blobs").exists()


def test_nan_in_a_calibration_source_is_refused_with_exit_2(cli, tmp_path):
    rng = np.random.default_rng(0)
    data = write_table(tmp_path / "data.parquet", rng.random((300, 6), np.float32) * 10, np.arange(300) % 3)
    bad = rng.random((100, 6), np.float32) * 10
    bad[[4, 9], 2] = np.nan
    source = write_table(tmp_path / "calibration.parquet", bad, np.arange(100) % 3)
    result = cli(
        "run",
        "--store",
        str(tmp_path / "store"),
        "--dataset",
        data,
        "--calibration-source",
        source,
        "--calibration-size",
        "100",
        "--epochs",
        "2",
    )  # all of it: the bad rows are drawn
    assert result.returncode == 2, result.stderr[-2000:]
    assert "samples of the calibration source" in result.stderr and "have NaN or Inf values" in result.stderr
    assert "Traceback" not in result.stderr


def peak_rss_of(command: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run ``command`` in a child of a fresh Python; its result, wall seconds and peak RSS (bytes, the largest
    process in its tree)."""
    probe = (
        "import json, resource, subprocess, sys, time\n"
        "started = time.monotonic()\n"
        "r = subprocess.run(json.loads(sys.argv[1]), capture_output=True, text=True)\n"
        "print(json.dumps([r.returncode, r.stdout, r.stderr, time.monotonic() - started,"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(command)], env=env, capture_output=True, text=True, timeout=600
    )
    code, stdout, stderr, seconds, rss = json.loads(out.stdout)
    return subprocess.CompletedProcess(command, code, stdout, stderr), seconds, rss


def write_rows(path, rows: int, label: int = 0) -> str:
    """A Parquet file of ``rows`` one-byte samples of one label, a few MB whatever ``rows`` (run-length encoded)."""
    chunk = min(rows, 10_000_000)
    table = pa.table(
        {
            "features": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(chunk, np.uint8)), 1),
            "label": pa.array(np.full(chunk, label, np.int64)),
        }
    )
    with pq.ParquetWriter(str(path), table.schema, compression="zstd") as writer:
        for _ in range(rows // chunk):
            writer.write_table(table, row_group_size=chunk)
    return str(path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: write_rows(p, 100_000_000), "declares 100,000,000 rows, above the limit of 50,000,000 rows"),
        (
            lambda p: write_table(p, np.zeros((4, 2), np.float32), np.array([0, 1, 2, 10**10])),
            "has a label of 10,000,000,000, above the limit of 100,000 classes",
        ),
    ],
    ids=["1e8-rows-in-7-MB", "label-1e10"],
)
def test_a_source_past_the_limits_is_refused_in_seconds_without_memory(tmp_path, prefect_server, make, message):
    from conftest import ptqflow_executable

    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    store = str(tmp_path / "store")
    data = make(tmp_path / "data.parquet")
    baseline, _, baseline_rss = peak_rss_of([ptqflow_executable(), "run", "--dataset", "nope", "--store", store], env)
    assert baseline.returncode == 2
    for extra in ([], ["--sample-size", "1000"]):  # loaded whole, and drawn while reading
        result, seconds, rss = peak_rss_of(
            [ptqflow_executable(), "run", "--dataset", data, "--store", store, *extra], env
        )
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr and "Traceback" not in result.stderr
        assert rss - baseline_rss < 500 << 20, (rss, baseline_rss)
        assert seconds < 120
        print(
            f"{extra or 'whole'}: refused in {seconds:.1f} s, peak RSS {(rss - baseline_rss) >> 20} MB above baseline"
        )
    assert not (tmp_path / "store" / "blobs").exists()


def test_a_model_file_past_the_limit_is_refused_before_it_is_read(cli, tmp_path, trained_digits_model):
    from ptqflow.storage.keras_models import keras_model_to_bytes

    model = tmp_path / "model.keras"
    model.write_bytes(keras_model_to_bytes(trained_digits_model))
    result = cli(
        "run", "--model-url", str(model), "--store", str(tmp_path / "store"), env={"PTQFLOW_MAX_MODEL_BYTES": "1000"}
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        f"is {model.stat().st_size:,} bytes, above the limit of 1,000 bytes in a model file: raise "
        "PTQFLOW_MAX_MODEL_BYTES" in result.stderr
    )
