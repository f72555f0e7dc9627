"""MLflow, for real: a ``mlflow server`` (SQLite, local artifacts) started here on 127.0.0.1; runs, promote,
rollback and sync-registry from the CLI; the registry read back through MLflow's own client. After every command
the champion alias and the export's latest.json name the same model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, stop_process_group, wait_until_healthy

pytestmark = pytest.mark.slow

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115 - kept open for the server's lifetime
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(server, f"{url}/health", root / "server.log", "mlflow server")
    try:
        yield url
    finally:
        stop_process_group(server, signal.SIGTERM)
        log.close()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, trained_digits_model) -> str:
    path = tmp_path_factory.mktemp("model") / "digits.keras"
    trained_digits_model.save(path)
    return str(path)


def champion_agrees_with_export(client, name: str, export: Path) -> tuple[str, str]:
    """The champion alias's version and the export's latest.json name the same run and the same .tflite bytes."""
    pointer = json.loads((export / "latest.json").read_text())
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags["ptqflow.run_id"] == pointer["run_id"]
    assert champion.tags["ptqflow.export_version"] == pointer["version"]
    assert champion.tags["tflite.sha256"] == pointer["files"]["tflite"]["sha256"]
    return champion.version, pointer["run_id"]


def test_runs_promote_rollback_and_sync_keep_the_registry_and_the_export_in_line(
    cli, mlflow_server, model_file, tmp_path
):
    from mlflow import MlflowClient

    store, export = str(tmp_path / "store"), tmp_path / "export"
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    common = ["--store", store, "--export", str(export), "--model-url", model_file, "--json"]
    env = {"MLFLOW_TRACKING_URI": mlflow_server}  # as a team sets it; --mlflow-uri is its option

    first = cli("run", *common, "--registered-model", "digits-int8", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout)  # MLflow's own links went to stderr: stdout is one JSON object
    assert summary["registry"]["registered_model"] == "digits-int8"
    assert champion_agrees_with_export(client, "digits-int8", export) == ("1", summary["run_id"])
    # The run itself: its parameters, figures and report
    recorded = client.get_run(summary["registry"]["mlflow_run_id"])
    assert (
        recorded.data.tags["ptqflow.run_id"] == summary["run_id"] and recorded.data.tags["ptqflow.status"] == "passed"
    )
    assert recorded.data.params["sampling.dataset"] == "digits" and recorded.data.params["conversion.ops"] == "int8"
    assert recorded.data.metrics["quantized_accuracy"] == pytest.approx(summary["metrics"]["quantized_accuracy"])
    assert recorded.data.metrics["arena_bytes"] == summary["metrics"]["arena_bytes"]
    logged = {f.path for f in client.list_artifacts(recorded.info.run_id, "ptqflow")}
    assert {"ptqflow/report.json", "ptqflow/report.md", "ptqflow/report.html"} <= logged
    version = client.get_model_version("digits-int8", "1")
    assert float(version.tags["quantized_accuracy"]) == pytest.approx(summary["metrics"]["quantized_accuracy"])
    registered_files = {f.path for f in client.list_artifacts(version.run_id, "model")}
    assert {"model/model.tflite", "model/model.keras", "model/report.json", "model/manifest.json"} <= registered_files

    # A second model (from another calibration set), promoted: version 2 becomes the champion.
    second = cli(
        "run", *common, "--calibration-size", "150", "--promotion-tolerance", "100", "--mlflow-uri", mlflow_server,
        "--registered-model", "digits-int8",
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    second_run = json.loads(second.stdout)["run_id"]
    assert champion_agrees_with_export(client, "digits-int8", export) == ("2", second_run)

    back = cli("rollback", "--export", str(export), "--registered-model", "digits-int8", env=env)
    assert back.returncode == 0, back.stderr[-3000:]
    assert "digits-int8 version 1 has the champion alias (was 2)" in back.stdout
    assert champion_agrees_with_export(client, "digits-int8", export) == ("1", summary["run_id"])

    forward = cli("promote", second_run, "--store", store, "--export", str(export), "--registered-model", "digits-int8",
                  env=env)  # fmt: skip
    assert forward.returncode == 0, forward.stderr[-3000:]
    assert champion_agrees_with_export(client, "digits-int8", export) == ("2", second_run)
    assert len(client.search_model_versions("name = 'digits-int8'")) == 2  # promoted again: not registered again

    # The registry drifted (an alias moved by hand, or a command that could not reach MLflow): one command mends it.
    client.set_registered_model_alias("digits-int8", "champion", "1")
    mended = cli("sync-registry", "--export", str(export), "--registered-model", "digits-int8", env=env)
    assert mended.returncode == 0, mended.stderr[-3000:]
    assert champion_agrees_with_export(client, "digits-int8", export) == ("2", second_run)

    # An MLflow that does not answer stops a rollback before latest.json moves: the two stay in line.
    dead = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    refused = cli("rollback", "--export", str(export), "--registered-model", "digits-int8", env=dead)
    assert refused.returncode == 2 and "does not answer" in refused.stderr
    assert champion_agrees_with_export(client, "digits-int8", export) == ("2", second_run)


def test_the_registered_model_is_named_after_the_data_set_by_default():
    from ptqflow.flows.registry import registered_model_name
    from ptqflow.tasks.core.parameters import RegistryParameters

    default = RegistryParameters(mlflow_uri="http://mlflow:5000")
    assert registered_model_name(default, "digits") == "ptqflow-digits"
    assert registered_model_name(default, "s3://bucket/photos/") == "ptqflow-photos"
    assert registered_model_name(default, "/data/sensors.parquet") == "ptqflow-sensors"
    assert registered_model_name(default.model_copy(update={"registered_model": "mine"}), "digits") == "mine"


def test_an_mlflow_server_that_does_not_answer_stops_the_run_before_anything_is_written(cli, tmp_path):
    store = tmp_path / "store"
    result = cli("run", "--store", str(store), "--mlflow-uri", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("ptqflow:")]
    assert len(lines) == 1 and "does not answer" in lines[0] and "start it or correct --mlflow-uri" in lines[0]
    assert "Traceback" not in result.stderr
    assert not store.exists() or not list((store / "blobs").rglob("*.*"))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--mlflow-uri", "https://user:secret@mlflow.example.com", "--mlflow-uri carries credentials"),
        ("--registered-model", "my model/../x", "is not a model name"),
    ],
)
def test_registry_options_are_checked_before_anything_runs(cli, tmp_path, option, value, message):
    result = cli("run", "--store", str(tmp_path / "store"), "--mlflow-uri", "http://127.0.0.1:9", option, value)
    assert result.returncode == 2 and message in result.stderr
    assert "secret" not in result.stderr


def test_a_crafted_run_id_in_the_export_is_refused_not_put_in_a_registry_query(mlflow_server, tmp_path):
    from ptqflow.flows.registry import RegistryError, sync_with_export
    from ptqflow.storage.store import ArtifactStore
    from ptqflow.tasks.core.parameters import RegistryParameters

    crafted = {"kind": "ptqflow.export_pointer", "version": "v", "run_id": "x' or name != '", "files": {}}
    (tmp_path / "latest.json").write_text(json.dumps(crafted))
    registry = RegistryParameters(mlflow_uri=mlflow_server, registered_model="crafted")
    with pytest.raises(RegistryError, match="names no valid run id"):
        sync_with_export(registry, ArtifactStore(str(tmp_path)))


def test_a_sweeps_best_configuration_is_recorded_and_becomes_the_champion(cli, mlflow_server, model_file, tmp_path):
    from mlflow import MlflowClient

    export = tmp_path / "export"
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    result = cli(
        "sweep", "--store", str(tmp_path / "store"), "--export", str(export), "--model-url", model_file,
        "--configurations", "int8,int8-per-tensor", "--mlflow-uri", mlflow_server, "--registered-model",
        "digits-sweep", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["registry"]["registered_model"] == "digits-sweep"
    version, run_id = champion_agrees_with_export(client, "digits-sweep", export)
    assert (version, run_id) == ("1", summary["run_id"])
    recorded = client.get_run(summary["registry"]["mlflow_run_id"])
    assert recorded.data.tags["ptqflow.run_id"] == summary["run_id"]
    assert recorded.data.tags["ptqflow.status"] == summary["status"] == "passed"
