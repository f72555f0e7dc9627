"""Faults a nightly pipeline meets: a killed process, a flipped byte, a planted pickle, an S3 outage, two runs at
once. Each run is the real CLI in a subprocess against the session's Prefect server."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from pickle_probe import planted_pickle_record

from conftest import free_port, ptqflow_executable, start_cli

pytestmark = pytest.mark.slow

STAGES = [
    "sample_dataset",
    "materialize_calibration_set",
    "train_float_model",
    "convert_to_tflite",
    "validate_with_interpreter",
]
FAST = ["--epochs", "3"]


def blob_files(store: Path) -> list[Path]:
    return [p for p in (store / "blobs").rglob("*") if p.is_file() and ".tmp-" not in p.name]


def assert_every_blob_intact(store: Path) -> None:
    for blob in blob_files(store):
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name.split(".")[0], blob


def run_json(cli, *args: str, env: dict | None = None) -> dict:
    result = cli("run", *args, "--json", env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def wait_for_line(process, needle: str, timeout: float = 300) -> list[str]:
    """Read the process's stderr until a line contains ``needle``; returns the lines read."""
    lines: list[str] = []
    found = threading.Event()

    def reader():
        for line in process.stderr:
            lines.append(line)
            if needle in line:
                found.set()
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    assert found.wait(timeout), f"never saw {needle!r}; stderr tail: {''.join(lines[-30:])}"
    return lines


@pytest.fixture(scope="module")
def reference(cli, tmp_path_factory) -> dict:
    """An uninterrupted run: what every recovered run must reproduce byte for byte."""
    return run_json(cli, "--store", str(tmp_path_factory.mktemp("reference") / "store"), *FAST)


@pytest.mark.parametrize("killed_in", STAGES)
def test_kill_9_in_a_stage_then_rerun_completes_and_reuses_what_was_done(
    prefect_server, cli, reference, tmp_path, killed_in
):
    store = tmp_path / "store"
    # Without the store's lock: a killed holder's lease lapses only after about a minute (see flows/locks.py),
    # and this test is about what the killed run left in the store.
    no_lock = {"PTQFLOW_STORE_LOCK": "off"}
    process = start_cli(prefect_server, "run", "--store", str(store), *FAST, "--verbose", env=no_lock)
    try:
        wait_for_line(process, f"{killed_in}: starting")
        time.sleep({"train_float_model": 1.5, "convert_to_tflite": 0.5}.get(killed_in, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert not (store / "runs").exists()  # no manifest: the run did not complete
    assert_every_blob_intact(store)  # a killed write leaves at most a temporary file, never a bad blob

    rerun = run_json(cli, "--store", str(store), *FAST, env=no_lock)
    done_before = STAGES[: STAGES.index(killed_in)]
    assert all(rerun["tasks"][stage]["cached"] for stage in done_before), rerun["tasks"]
    # The recovered run is the uninterrupted run, byte for byte: nothing half-written was read.
    # (The dataset manifest and the report name their store's URIs, so they differ between stores.)
    for name in ("model", "calibration", "tflite", "tflite_float"):
        assert rerun["artifacts"][name]["sha256"] == reference["artifacts"][name]["sha256"], name
    assert rerun["metrics"] == reference["metrics"]
    assert_every_blob_intact(store)


def kill_group(process: subprocess.Popen) -> None:
    """kill -9 of a run and its children (its ephemeral Prefect server among them)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@pytest.mark.parametrize("killed_in", STAGES)
def test_kill_9_of_a_run_holding_the_lock_never_blocks_the_next_run_without_a_server(reference, tmp_path, killed_in):
    """The CLI on its own (no PREFECT_API_URL, one PREFECT_HOME for both runs), the lock on as by default, killed
    with its children in each stage."""
    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONUNBUFFERED="1")
    command = [ptqflow_executable(), "run", "--store", str(store), *FAST, "--verbose"]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        lines = wait_for_line(process, f"{killed_in}: starting")
        time.sleep({"train_float_model": 1.5, "convert_to_tflite": 0.5}.get(killed_in, 0.05))
    finally:
        kill_group(process)
    assert any("holding the lock on" in line for line in lines)  # it held the lock when it was killed

    started = time.monotonic()
    rerun = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert "waiting for the lock" not in rerun.stderr  # the dead run's lock went with it
    result = json.loads(rerun.stdout)
    assert all(result["tasks"][stage]["cached"] for stage in STAGES[: STAGES.index(killed_in)]), result["tasks"]
    assert result["artifacts"]["tflite"]["sha256"] == reference["artifacts"]["tflite"]["sha256"]
    print(f"rerun after kill -9 in {killed_in} without a server: {time.monotonic() - started:.1f} s to completion")


def test_kill_9_of_a_run_holding_the_lock_on_a_prefect_server_frees_it_after_the_lease(prefect_server, tmp_path):
    """With a server, the killed holder's lease lapses (LEASE_SECONDS) and the server's lease service (every 15 s)
    frees the slot: the next run holds the lock within that bound plus its own start-up."""
    from ptqflow.flows.locks import LEASE_SECONDS

    store = tmp_path / "store"
    process = start_cli(prefect_server, "run", "--store", str(store), *FAST, "--verbose")
    try:
        wait_for_line(process, "holding the lock on")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    killed = time.monotonic()
    rerun = start_cli(prefect_server, "run", "--store", str(store), *FAST, "--verbose")
    try:
        wait_for_line(rerun, "holding the lock on", timeout=LEASE_SECONDS + 15 + 180)
        waited = time.monotonic() - killed
        _, rest = rerun.communicate(timeout=600)
    finally:
        if rerun.poll() is None:
            rerun.kill()
    assert rerun.returncode == 0, rest[-4000:]
    print(f"lock held again {waited:.1f} s after the kill -9 (lease {LEASE_SECONDS} s)")


def test_the_next_run_holding_the_lock_sweeps_what_killed_writers_left(cli, tmp_path):
    store, export = tmp_path / "store", tmp_path / "export"
    first = run_json(cli, "--store", str(store), "--export", str(export), *FAST)
    # What a writer killed between its write and its rename leaves: <name>.tmp-<uuid4 hex> beside the final name.
    blob = Path(first["artifacts"]["model"]["uri"].removeprefix("file://"))
    leftovers = [
        blob.with_name(blob.name + ".tmp-" + "5e1f" * 8),
        store / "runs" / f"{first['run_id'][:8]}0.json.tmp-{'77aa' * 8}",
        export / "versions" / f"{first['export']['version']}" / f"model.tflite.tmp-{'0b0b' * 8}",
        export / f"latest.json.tmp-{'1c1c' * 8}",
    ]
    young = store / "runs" / f"ffffffff.json.tmp-{'c0de' * 8}"  # a live writer's, for all this run knows
    # Not ptqflow's: a file named like a temporary in a folder ptqflow does not write stays.
    foreign = export / "notes" / f"plan.txt.tmp-{'abcd' * 8}"
    foreign.parent.mkdir()
    for path in [*leftovers, young, foreign]:
        path.write_bytes(b"half a file")
    for path in [*leftovers, foreign]:
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    # The leftover in runs/ shares the run's id prefix: lookups by prefix must not see it.
    shown = cli("show", first["run_id"][:8], "--store", str(store))
    assert shown.returncode == 0 and first["run_id"] in shown.stdout, shown.stderr[-2000:]

    second = cli("run", "--store", str(store), "--export", str(export), *FAST, "--json", "--verbose")
    assert second.returncode == 0, second.stderr[-4000:]
    assert not any(path.exists() for path in leftovers) and young.exists() and foreign.exists()
    for path in leftovers:
        assert path.name in second.stderr  # each removal is logged
    assert_every_blob_intact(store)


def test_a_flipped_byte_is_detected_moved_aside_and_recomputed(cli, reference, tmp_path):
    store = tmp_path / "store"
    first = run_json(cli, "--store", str(store), *FAST)
    for name in ("model", "calibration"):
        blob = Path(first["artifacts"][name]["uri"].removeprefix("file://"))
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0x01
        blob.write_bytes(bytes(data))

    second = run_json(cli, "--store", str(store), *FAST)
    cached = {stage: second["tasks"][stage]["cached"] for stage in STAGES}
    assert cached == {
        "sample_dataset": True,
        "materialize_calibration_set": False,  # its blob was corrupt: recomputed
        "train_float_model": False,  # likewise
        "convert_to_tflite": True,  # same bytes again, so the same cache key
        "validate_with_interpreter": True,
    }
    assert second["artifacts"] == first["artifacts"]
    assert_every_blob_intact(store)
    assert len(list((store / "quarantine").iterdir())) == 2


def test_a_planted_pickle_in_the_result_storage_is_never_run(cli, tmp_path):
    store = tmp_path / "store"
    run_json(cli, "--store", str(store), *FAST)
    marker = tmp_path / "pwned"
    [record] = (store / "prefect-results").glob("ptqflow.tasks.stages.sample-*")
    record.write_bytes(planted_pickle_record(str(marker)))

    rerun = run_json(cli, "--store", str(store), *FAST)
    assert not marker.exists()
    assert not rerun["tasks"]["sample_dataset"]["cached"]  # the planted record was ignored, the stage rerun
    assert json.loads(record.read_bytes())["metadata"]["serializer"]["type"] == "json"


def on_python_path(folder: Path) -> str:
    return os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))


def plant_json_records(read, write, results: str, marker: Path, probe_dir: Path) -> dict[str, str]:
    """Replace three stages' cache records with JSON records that would run code if Prefect honoured them:
    a custom object_decoder (a shell command), a custom object_encoder, and a payload naming a class whose module
    creates ``marker`` when imported (from ``probe_dir``, on the rerun's PYTHONPATH)."""
    from ptqflow.storage.results import EXPECTED_SERIALIZER

    (probe_dir / "ptqflow_planted_probe.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Anything: ...\n")
    planted = {
        "ptqflow.tasks.stages.sample": (
            {**EXPECTED_SERIALIZER, "object_decoder": "subprocess.getoutput"},
            json.dumps({f"touch {marker}": 0}),
        ),
        "ptqflow.tasks.stages.calibrate": ({**EXPECTED_SERIALIZER, "object_encoder": "subprocess.getoutput"}, None),
        "ptqflow.tasks.stages.train": (
            EXPECTED_SERIALIZER,
            json.dumps({"__class__": "ptqflow_planted_probe.Anything", "data": {}}),
        ),
    }
    files = {}
    for prefix, (serializer, result) in planted.items():
        [path] = [p for p in read(results) if p.rsplit("/", 1)[-1].startswith(prefix + "-")]
        record = json.loads(read(path, whole=True))
        record["metadata"]["serializer"] = serializer
        if result is not None:
            record["result"] = result
        write(path, json.dumps(record).encode())
        files[prefix] = path.rsplit("/", 1)[-1]
    return files


def assert_planted_records_ran_nothing(rerun, files: dict[str, str], marker: Path) -> None:
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert not marker.exists()
    result = json.loads(rerun.stdout)
    for stage in ("sample_dataset", "materialize_calibration_set", "train_float_model"):
        assert not result["tasks"][stage]["cached"], stage  # refused, so recomputed
    for name in files.values():
        assert name in rerun.stderr  # the warning names each planted file


def test_planted_json_records_in_a_local_store_run_nothing_and_are_reported(cli, tmp_path):
    store = tmp_path / "store"
    run_json(cli, "--store", str(store), *FAST)
    marker = tmp_path / "pwned"

    def read(path: str, whole: bool = False):
        return Path(path).read_text() if whole else [str(p) for p in Path(path).iterdir()]

    files = plant_json_records(
        read, lambda path, data: Path(path).write_bytes(data), str(store / "prefect-results"), marker, tmp_path
    )
    rerun = cli(
        "run", "--store", str(store), *FAST, "--json", "--verbose", env={"PYTHONPATH": on_python_path(tmp_path)}
    )
    assert_planted_records_ran_nothing(rerun, files, marker)


def test_planted_json_records_in_an_s3_store_run_nothing_and_are_reported(cli, s3_endpoint, tmp_path):
    import s3fs

    bucket = f"planted-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.mkdir(bucket)
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "PYTHONPATH": on_python_path(tmp_path)}
    store = f"s3://{bucket}/ptq"
    run_json(cli, "--store", store, *FAST, env=env)
    marker = tmp_path / "pwned"

    def read(path: str, whole: bool = False):
        return fs.cat_file(path).decode() if whole else fs.ls(path, detail=False, refresh=True)

    files = plant_json_records(read, fs.pipe_file, f"{bucket}/ptq/prefect-results", marker, tmp_path)
    rerun = cli("run", "--store", store, *FAST, "--json", "--verbose", env=env)
    assert_planted_records_ran_nothing(rerun, files, marker)


def test_two_identical_runs_at_once_take_turns_and_share_one_set_of_blobs(prefect_server, tmp_path):
    store = tmp_path / "store"
    processes = [start_cli(prefect_server, "run", "--store", str(store), *FAST, "--json") for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-4000:]
    first, second = (json.loads(stdout) for stdout, _ in outputs)
    assert first["run_id"] != second["run_id"]
    # The store's lock (one run at a time per store on a Prefect server) makes the later run wait, then reuse
    # every stage of the earlier one.
    cached = sorted(all(t["cached"] for t in run["tasks"].values()) for run in (first, second))
    assert cached == [False, True]
    assert first["artifacts"] == second["artifacts"]
    dataset = json.loads(Path(first["artifacts"]["dataset"]["uri"].removeprefix("file://")).read_text())
    expected = {ref["sha256"] for ref in first["artifacts"].values()} | {
        split["sha256"] for split in dataset["splits"].values()
    }
    assert {blob.name.split(".")[0] for blob in blob_files(store)} == expected
    assert len(blob_files(store)) == len(expected)
    assert_every_blob_intact(store)
    assert len(list((store / "runs").iterdir())) == 2


@pytest.fixture
def flaky_s3():
    """A moto S3 server of the test's own, which the test may stop and start again on the same port."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "flaky",
        "AWS_SECRET_ACCESS_KEY": "flaky",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        # Botocore's own retries (standard AWS configuration) on top of the pipeline's: keep the test short.
        "AWS_MAX_ATTEMPTS": "2",
        "AWS_RETRY_MODE": "standard",
    }
    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=port)]
    servers[0].start()

    class Control:
        def stop(self):
            servers[-1].stop()

        def start(self):
            servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port))
            servers[-1].start()

        def fs(self):
            import s3fs

            return s3fs.S3FileSystem(key="flaky", secret="flaky", endpoint_url=endpoint, skip_instance_cache=True)

    control = Control()
    control.env = env
    try:
        yield control
    finally:
        try:
            servers[-1].stop()
        except Exception:
            pass


def test_s3_outage_mid_run_fails_cleanly_after_retries_and_the_store_stays_consistent(
    prefect_server, cli, flaky_s3, reference
):
    bucket = f"flaky-{uuid.uuid4().hex[:10]}"
    flaky_s3.fs().mkdir(bucket)
    store = f"s3://{bucket}/ptq"
    process = start_cli(prefect_server, "run", "--store", store, *FAST, "--verbose", env=flaky_s3.env)
    try:
        lines = wait_for_line(process, "train_float_model: starting")
        flaky_s3.stop()
        started = time.monotonic()
        _, rest = process.communicate(timeout=600)
        elapsed = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
    stderr = "".join(lines) + rest
    assert process.returncode == 3, stderr[-4000:]
    final = [line for line in stderr.splitlines() if line.startswith("ptqflow:")]
    assert len(final) == 1 and "storage unreachable after 3 attempts" in final[0], final
    assert "Retry 2/2" in stderr  # Prefect retried with backoff before giving up
    assert elapsed < 300

    flaky_s3.start()
    fs = flaky_s3.fs()
    blobs = [p for p in fs.find(f"{bucket}/ptq/blobs")]
    assert blobs, "the stages before the outage stored their artifacts"
    for path in blobs:
        assert hashlib.sha256(fs.cat_file(path)).hexdigest() == path.rsplit("/", 1)[-1].split(".")[0], path
    assert not fs.exists(f"{bucket}/ptq/runs")  # no manifest for an incomplete run

    rerun = run_json(cli, "--store", store, *FAST, env=flaky_s3.env)
    assert rerun["tasks"]["sample_dataset"]["cached"] and rerun["tasks"]["materialize_calibration_set"]["cached"]
    assert rerun["artifacts"]["tflite"]["sha256"] == reference["artifacts"]["tflite"]["sha256"]
