"""The ``ptqflow`` command as a user runs it: a subprocess, against the session's Prefect server."""

from __future__ import annotations

import json
import os
import re
import subprocess
from datetime import datetime, timedelta, timezone

import pytest

from conftest import ptqflow_events, ptqflow_executable, wait_for, write_outlier_model

pytestmark = pytest.mark.slow

JSON_KEYS = {"run_id", "status", "artifacts", "metrics", "tasks"}
ARTIFACTS = {"dataset", "model", "calibration", "tflite", "tflite_float", "report", "report_md", "report_html"}
METRICS = {
    "float_accuracy",
    "tflite_float_accuracy",
    "quantized_accuracy",
    "accuracy_drop_pp",
    "agreement",
    "float_bytes",
    "quantized_bytes",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cli") / "store")


@pytest.fixture(scope="module")
def first_run(cli, store):
    return cli("run", "--store", store, "--epochs", "6", "--json")


def test_json_output_is_one_object_with_the_documented_keys(first_run):
    assert first_run.returncode == 0, first_run.stderr[-3000:]
    result = json.loads(first_run.stdout)  # the whole of stdout is one JSON object
    assert JSON_KEYS <= result.keys()
    assert result["status"] == "passed"
    assert set(result["artifacts"]) == ARTIFACTS
    for ref in result["artifacts"].values():
        assert set(ref) == {"uri", "sha256", "bytes"}
    assert METRICS <= result["metrics"].keys()
    assert all(set(t) == {"cached", "seconds", "cache_key"} for t in result["tasks"].values())
    # Every stage persists its result, so each names its cache record (what `ptqflow gc` keeps).
    assert all(t["cache_key"].startswith("ptqflow.tasks.") for t in result["tasks"].values())
    assert result["artifacts"]["tflite"]["uri"].endswith(".tflite")


def test_rerun_is_all_cached_and_prints_a_readable_summary(first_run, cli, store):
    second = cli("run", "--store", store, "--epochs", "6")
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout
    assert out.count("cached") == 5 and "computed" not in out
    assert "quantized .tflite" in out and "accuracy gate passed" in out
    assert json.loads(first_run.stdout)["artifacts"]["tflite"]["uri"] in out.replace("\n", "")


def test_another_calibration_method_reconverts_only_and_is_recorded(first_run, cli, store):
    result = cli("run", "--store", store, "--epochs", "6", "--calibration-method", "mse", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    cached = {name: stage["cached"] for name, stage in summary["tasks"].items()}
    assert cached == {
        "sample_dataset": True,
        "materialize_calibration_set": True,
        "train_float_model": True,
        "convert_to_tflite": False,
        "validate_with_interpreter": False,
    }
    assert summary["metrics"]["full_integer"] and summary["metrics"]["accuracy_drop_pp"] <= 1.0
    report = json.loads(open(summary["artifacts"]["report"]["uri"].removeprefix("file://")).read())
    assert report["conversion"]["calibration_method"] == "mse"
    assert summary["artifacts"]["tflite"]["sha256"] != json.loads(first_run.stdout)["artifacts"]["tflite"]["sha256"]


def test_equalization_and_bias_correction_reconvert_only_and_are_recorded(first_run, cli, store):
    args = ("run", "--store", store, "--epochs", "6", "--equalize", "--bias-correction", "--json")
    result = cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    computed = {name for name, stage in summary["tasks"].items() if not stage["cached"]}
    assert computed == {"convert_to_tflite", "validate_with_interpreter"}
    assert summary["metrics"]["full_integer"] and summary["metrics"]["accuracy_drop_pp"] <= 1.0
    report = json.loads(open(summary["artifacts"]["report"]["uri"].removeprefix("file://")).read())
    assert report["conversion"]["equalize"] is True and report["conversion"]["bias_correction"] is True
    assert summary["artifacts"]["tflite"]["sha256"] != json.loads(first_run.stdout)["artifacts"]["tflite"]["sha256"]
    again = json.loads(cli(*args).stdout)
    assert all(stage["cached"] for stage in again["tasks"].values())
    assert again["artifacts"]["tflite"]["sha256"] == summary["artifacts"]["tflite"]["sha256"]  # deterministic


def test_a_device_budget_is_judged_without_recomputing_and_fails_in_one_line(first_run, cli, store):
    measured = json.loads(first_run.stdout)["metrics"]["arena_bytes"]
    assert measured > 0
    within = cli("run", "--store", store, "--epochs", "6", "--ram-budget", str(measured), "--json")
    assert within.returncode == 0, within.stderr[-3000:]
    over = cli("run", "--store", store, "--epochs", "6", "--ram-budget", str(measured - 1), "--json")
    assert over.returncode == 1, over.stderr[-3000:]
    result = json.loads(over.stdout)
    assert all(stage["cached"] for stage in result["tasks"].values())  # a budget is the gate's, in no stage's key
    assert result["gate"]["name"] == "device_budget" and result["status"] == "failed"
    assert (
        f"tensor arena needs {measured / 1024:,.1f} KiB ({measured:,} B), over --ram-budget"
        in result["gate"]["message"]
    )
    report = json.loads(open(result["artifacts"]["report"]["uri"].removeprefix("file://")).read())
    assert report["metrics"]["device"]["quantized_tflite"]["arena_bytes"] == measured


def test_device_targets_revalidate_without_reconverting_and_ship_their_files(first_run, cli, store, tmp_path):
    import numpy as np

    from ptqflow.tasks.evaluation.tflm import run_isolated

    export = str(tmp_path / "export")
    args = ("run", "--store", store, "--epochs", "6", "--target", "tflm,ethos-u55-128", "--export", export, "--json")
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    tasks = result["tasks"]
    assert tasks["convert_to_tflite"]["cached"] and not tasks["validate_with_interpreter"]["cached"]
    shipped = open(result["artifacts"]["tflite"]["uri"].removeprefix("file://"), "rb").read()
    tflm, npu = result["metrics"]["tflm"], result["metrics"]["npu"]
    assert tflm["ran"] and tflm["arena_bytes"] == run_isolated(shipped, np.zeros((1, 8, 8, 1))).arena.total_bytes
    document = json.loads(open(result["artifacts"]["report"]["uri"].removeprefix("file://")).read())
    assert tflm["samples"] == document["metrics"]["samples"] and document["metrics"]["tflm"] == tflm  # the test split
    assert tflm["figures"]["accuracy_drop_pp"] is not None and 0 <= tflm["identical_to_litert"] <= 1
    assert [n["target"] for n in npu] == ["ethos-u55-128"] and npu[0]["compiled"] and npu[0]["npu_ops"] > 0
    assert {"tflite_vela_ethos-u55-128", "model_data_cc", "model_data_h"} <= set(result["artifacts"])
    version = tmp_path / "export" / "versions" / result["export"]["version"]
    assert {"model_vela_ethos-u55-128.tflite", "model_data.cc", "model_data.h"} <= {f.name for f in version.iterdir()}
    assert f"kTensorArenaSize = {tflm['arena_bytes']};" in (version / "model_data.h").read_text()
    report = open(result["artifacts"]["report_md"]["uri"].removeprefix("file://")).read()
    assert "## Targets" in report and "ethos-u55-128" in report and "bit for bit" in report

    # A RAM budget the planned LiteRT arena meets but TFLM's measured one does not: judged by TFLM's.
    between = (result["metrics"]["arena_bytes"] + tflm["arena_bytes"]) // 2
    over = cli(*args[:-3], "--ram-budget", str(between), "--json")
    assert over.returncode == 1, over.stderr[-3000:]
    verdict = json.loads(over.stdout)["gate"]
    assert (
        verdict["name"] == "device_budget" and f"({tflm['arena_bytes']:,} B), over --ram-budget" in verdict["message"]
    )
    assert all(stage["cached"] for stage in json.loads(over.stdout)["tasks"].values())


def test_a_sweep_on_device_targets_has_a_column_per_target_and_ships_the_best_ones_files(first_run, cli, store):
    args = ("sweep", "--in-process", "--store", store, "--epochs", "6", "--configurations", "int8,int8-per-tensor")
    # 60 rows judge TFLM's accuracy to a few points only: a loose gate keeps this about the table and the files.
    done = cli(*args, "--target", "tflm,ethos-u55-128", "--tflm-samples", "60", "--max-accuracy-drop", "10", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    measured = [r for r in summary["rows"] if not r["reference"]]
    assert all(r["metrics"]["tflm"]["samples"] == 60 and r["metrics"]["npu"][0]["compiled"] for r in measured)
    assert {"tflite_vela_ethos-u55-128", "model_data_cc", "model_data_h"} <= set(summary["artifacts"])
    table = open(summary["artifacts"]["sweep_md"]["uri"].removeprefix("file://")).read()
    assert "| TFLM | ethos-u55-128 | verdict |" in table and "NPU" in table


def test_failed_gate_exits_non_zero_with_the_results(cli, store, tmp_path, trained_digits_model):
    from prefect.client.orchestration import get_client

    since = datetime.now(timezone.utc) - timedelta(seconds=5)
    model_file = tmp_path / "outlier.keras"
    write_outlier_model(trained_digits_model, model_file)  # only its dense layer collapses under int8
    failed = cli("run", "--store", store, "--model-url", str(model_file), "--json")
    assert failed.returncode == 1, failed.stderr[-3000:]
    result = json.loads(failed.stdout)
    assert result["status"] == "failed" and result["metrics"]["accuracy_drop_pp"] > 1.0
    assert "Traceback" not in failed.stderr
    with get_client(sync_client=True) as client:  # automations can react to it: an event with the reason
        events = wait_for(
            lambda: [e for e in ptqflow_events(client, since) if e.payload.get("run_id") == result["run_id"]]
        )
    assert [e.event for e in events] == ["ptqflow.gate.failed"]
    assert events[0].payload["message"] == result["gate"]["message"] and events[0].payload["status"] == "failed"


def digits_train_rows() -> int:
    """How many rows the CLI's default split (seed 0) puts in digits' training split."""
    from ptqflow.tasks.core.parameters import SamplingParameters
    from ptqflow.tasks.data.datasets import load_dataset
    from ptqflow.tasks.data.sampling import split_dataset

    return len(split_dataset(load_dataset("digits"), SamplingParameters(), seed=0)["train"])


DIGITS_TRAIN_ROWS = digits_train_rows()


@pytest.mark.parametrize(
    ("args", "message", "written"),
    [
        (["--dataset", "nope"], "unknown data set 'nope': choose one of cifar10, digits, fashion_mnist, mnist", set()),
        (["--epochs", "0"], "invalid --epochs: Input should be greater than or equal to 1", set()),
        (["--calibration-size", "-5"], "invalid --calibration-size: Input should be greater than or equal to 1", set()),
        (
            ["--target", "tflm,ethos-u99"],
            "invalid --target: unknown target 'ethos-u99': choose from litert, tflm, ethos-u55-32, ethos-u55-64",
            set(),
        ),
        (
            ["--vela-memory-mode", "Shared_Sram"],
            "give --vela-system-config and --vela-memory-mode together",
            set(),
        ),
        (
            ["--ram-budget", "lots"],
            "invalid --ram-budget: 'lots' is not a size: give bytes or a unit, e.g. 262144, 256KiB or 1MB",
            set(),
        ),
        (
            [
                "--scheme",
                "float16",
                "--input-type",
                "float32",
                "--output-type",
                "float32",
                "--ops",
                "builtins",
                "--equalize",
            ],
            "--equalize prepares a model for int8 weights; scheme float16 has none: drop --equalize",
            set(),
        ),
        # The splits are complete artifacts; the check comes before training, so no model is written.
        (["--calibration-size", "5000"], f"pass --calibration-size {DIGITS_TRAIN_ROWS} or less", {".json", ".parquet"}),
    ],
)
def test_bad_input_is_one_clear_line_and_a_non_zero_exit(cli, tmp_path, args, message, written):
    store = tmp_path / "store"
    result = cli("run", "--store", str(store), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("ptqflow:")]
    assert len(error_lines) == 1
    blobs = list((store / "blobs").rglob("*.*")) if store.exists() else []
    assert {blob.suffix for blob in blobs} == written


def test_version_and_shell_completion_are_offered():
    from importlib.metadata import version

    shown = subprocess.run([ptqflow_executable(), "--version"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.strip() == f"ptqflow {version('ptqflow')}"
    # Typer reads the shell from the process's parents, and finds none under a detached test runner: name it.
    completion = subprocess.run(
        [ptqflow_executable(), "--show-completion", "bash"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"},
    )
    assert completion.returncode == 0 and "_PTQFLOW_COMPLETE" in completion.stdout, completion.stderr[-1000:]


def test_help_lists_the_options_with_defaults():
    result = subprocess.run(
        [ptqflow_executable(), "run", "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}
    )
    assert result.returncode == 0
    for option in (
        "--dataset",
        "--store",
        "--seed",
        "--epochs",
        "--calibration-size",
        "--input-type",
        "--output-type",
        "--ops",
        "--max-accuracy-drop",
        "--json",
    ):
        assert option in result.stdout
    assert "[default: 200]" in result.stdout


def test_runs_lists_complete_runs_and_show_prints_one(first_run, cli, store):
    run_id = json.loads(first_run.stdout)["run_id"]
    listed = cli("runs", "--store", store, "--json")
    assert listed.returncode == 0
    manifests = json.loads(listed.stdout)
    assert run_id in [m["run_id"] for m in manifests]
    table = cli("runs", "--store", store)
    assert run_id[:8] in table.stdout
    shown = cli("show", run_id[:13], "--store", store)
    assert shown.returncode == 0, shown.stderr
    manifest = json.loads(shown.stdout)
    assert manifest["run_id"] == run_id
    assert manifest["artifacts"] == json.loads(first_run.stdout)["artifacts"]
    assert manifest["parameters"]["training"]["epochs"] == 6
    missing = cli("show", "no-such-run", "--store", store)
    assert missing.returncode == 2 and "ptqflow runs" in missing.stderr


def test_a_store_url_nothing_can_open_is_one_line_and_exit_2(cli):
    for command in (["runs", "--store", "foo://x"], ["show", "abc", "--store", "foo://x"]):
        result = cli(*command)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "cannot open the store 'foo://x'" in result.stderr and "Traceback" not in result.stderr


def test_a_corrupt_manifest_is_named_with_the_fix(cli, tmp_path):
    runs = tmp_path / "store" / "runs"
    runs.mkdir(parents=True)
    (runs / "0badc0de-0000-4000-8000-000000000000.json").write_text('{"kind": "ptqflow.run_manifest", "run_id": ')
    # `runs` skips it, naming it (one bad file must not hide every run); `show` of that very run refuses it.
    for command, code in (
        (["runs", "--store", str(tmp_path / "store")], 0),
        (["show", "0badc0de", "--store", str(tmp_path / "store")], 2),
    ):
        result = cli(*command)
        assert result.returncode == code, result.stderr[-2000:]
        message = " ".join(result.stderr.split())
        assert "0badc0de-0000-4000-8000-000000000000.json is not a readable run manifest" in message
        assert "move it out of runs/" in message and "Traceback" not in result.stderr


def _on_a_terminal(args: list[str], env: dict[str, str], timeout: float = 600) -> tuple[int, list[str]]:
    """Run ``args`` with a pseudo-terminal (200 columns) as its stdin, stdout and stderr: what a user sees, as
    lines (cursor movements and colours removed; a line redrawn in place counts once per drawing)."""
    import fcntl
    import pty
    import re
    import select
    import struct
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1)[0]:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child and its children closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        process.kill()
        os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    return code, [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]


# Not anchored: a library's line written while the progress display is drawn lands in the middle of its line.
FOREIGN_LINES = re.compile(
    r"[IWEF]\d{4} \d\d:\d\d:|absl::|oneDNN|cuda|Traceback|Warning:|\| (INFO|WARNING|ERROR|DEBUG) +\||"
    r"(WARNING|INFO|ERROR): "
)


def test_a_cold_run_on_a_terminal_shows_only_what_ptqflow_writes(prefect_server, tmp_path):
    # As in a user's shell: no TF_CPP_MIN_LOG_LEVEL (conftest sets one for the tests' own process). DO_NOT_TRACK:
    # Prefect's one-time telemetry notice on a new PREFECT_HOME is Prefect's to show; ptqflow does not hide it.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(PREFECT_API_URL=prefect_server, DO_NOT_TRACK="1")
    store = str(tmp_path / "store")
    code, lines = _on_a_terminal([ptqflow_executable(), "run", "--epochs", "2", "--store", store], env)
    assert code == 0, "\n".join(lines[-40:])
    assert [line for line in lines if FOREIGN_LINES.search(line)] == []
    assert any(line.startswith("quantized model: ") for line in lines) and lines[-1].startswith("run id: ")
    # The same capture shows what --verbose lets through (Prefect's log lines), so the check above can fail.
    code, verbose = _on_a_terminal([ptqflow_executable(), "run", "--epochs", "2", "--store", store, "--verbose"], env)
    assert code == 0 and any(FOREIGN_LINES.search(line) for line in verbose)


def test_serve_takes_every_option_of_run_that_shapes_a_run():
    """One definition per option: a scheduled run and the UI's form start from the same options as `ptqflow run`
    (only the console's --json and --verbose are run's own)."""
    import typer.main

    from ptqflow.flows.cli import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    options = {name: {p.name for p in command.params} for name, command in commands.items()}
    assert options["run"] - {"as_json", "verbose"} <= options["serve"]
    assert {"dataset", "model_url", "calibration_size", "max_accuracy_drop"} <= options["sweep"]


@pytest.mark.slow
def test_a_run_without_a_prefect_server_starts_its_own_and_prints_only_its_json(tmp_path):
    """The command on its own (no PREFECT_API_URL): its temporary Prefect server starts while TensorFlow imports,
    records the run, and stops; stdout is the summary alone."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    result = subprocess.run(
        [ptqflow_executable(), "run", "--epochs", "1", "--store", str(tmp_path / "store"), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode in (0, 1), result.stderr[-4000:]
    summary = json.loads(result.stdout)
    assert summary["status"] in ("passed", "failed") and summary["run_id"]
    import sqlite3

    with sqlite3.connect(tmp_path / "prefect-home" / "prefect.db") as records:  # the temporary server's database
        states = records.execute("SELECT state_type FROM flow_run WHERE id = ?", (summary["run_id"],)).fetchall()
    assert states == [("COMPLETED",)] or states == [("FAILED",)]
