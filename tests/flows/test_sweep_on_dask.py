"""``ptqflow sweep`` on Dask: a LocalCluster of two worker processes with the store and export on S3 (moto), and an
existing cluster reached with --dask-address. Workers share nothing but the store."""

from __future__ import annotations

import json
import os
import uuid

import httpx
import pytest

from ptqflow.storage.store import ArtifactRef, ArtifactStore
from ptqflow.tasks.core.parameters import CalibrationParameters
from ptqflow.tasks.sweep.grid import sweep_grid

pytestmark = pytest.mark.slow

# The default grid with --calibration-sizes 50,200 (digits' training split is 1168 samples).
CONFIGURATIONS = len(sweep_grid(CalibrationParameters().calibration_size, (50, 200)))


@pytest.fixture(scope="module")
def s3_sweep(cli, s3_endpoint):
    import s3fs

    bucket = f"sweep-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_endpoint).mkdir(bucket)
    env = {"AWS_ENDPOINT_URL": s3_endpoint}
    args = (
        "sweep",
        "--store",
        f"s3://{bucket}/store",
        "--export",
        f"s3://{bucket}/models",
        "--epochs",
        "3",
        "--calibration-sizes",
        "50,200",
        "--workers",
        "2",
        "--json",
    )
    first = cli(*args, env=env)
    second = cli(*args, env=env)
    return bucket, first, second


def _store(s3_endpoint: str, url: str) -> ArtifactStore:
    return ArtifactStore(url, storage_options={"endpoint_url": s3_endpoint})


def test_sweep_ranks_every_configuration_and_exports_the_best(s3_sweep, s3_endpoint):
    bucket, first, _ = s3_sweep
    assert first.returncode == 0, first.stderr[-4000:]
    summary = json.loads(first.stdout)
    rows = summary["rows"]
    assert len([r for r in rows if not r["reference"]]) == CONFIGURATIONS
    passing = [r for r in rows if r["passed"]]
    assert passing and [r["rank"] for r in passing] == list(range(1, len(passing) + 1))
    assert summary["best"] == passing[0]["name"] and summary["status"] == "passed"
    sizes = [r["metrics"]["bytes"] for r in passing]
    assert sizes == sorted(sizes)  # ranked by size by default

    store = _store(s3_endpoint, f"s3://{bucket}/store")
    for row in rows:
        store.verify(ArtifactRef(**row["metrics"]["model"]))
    document = json.loads(store.read_bytes(ArtifactRef(**summary["report"]["table"])))
    assert document["best"] == summary["best"] and document["rows"] == rows
    assert store.read_bytes(ArtifactRef(**summary["report"]["plot"])).startswith(b"\x89PNG")
    assert "| 1 | " + summary["best"] in store.read_bytes(ArtifactRef(**summary["report"]["markdown"])).decode()

    # The best configuration was validated in full and is what latest.json points to.
    best = passing[0]
    assert summary["artifacts"]["tflite"]["sha256"] == best["metrics"]["model"]["sha256"]
    assert "report_html" in summary["artifacts"]
    latest = json.loads(_store(s3_endpoint, f"s3://{bucket}/models").read_named("latest.json"))
    assert latest["run_id"] == summary["run_id"]
    assert latest["files"]["tflite"]["sha256"] == best["metrics"]["model"]["sha256"]
    manifest = json.loads(store.read_named(f"runs/{summary['run_id']}.json"))
    assert manifest["flow"] == "ptq-sweep" and manifest["metrics"]["best"] == summary["best"]
    # Stages run on the Dask workers name their cache records too, so `ptqflow gc` keeps a kept sweep warm.
    worker_stages = [name for name in manifest["tasks"] if name.startswith(("convert[", "evaluate["))]
    assert worker_stages and all(manifest["tasks"][name]["cache_key"] for name in worker_stages), manifest["tasks"]


def test_the_configurations_ran_in_the_dask_worker_processes(s3_sweep):
    _, first, _ = s3_sweep
    summary = json.loads(first.stdout)
    processes = {r["metrics"]["measured_on"] for r in summary["rows"]}
    assert len(processes) == 2, processes  # both workers evaluated configurations (in-process gives one)
    conversions = [name for name, record in summary["tasks"].items() if name.startswith("convert[")]
    assert len(conversions) == CONFIGURATIONS + 1
    assert "predict_float_outputs" in summary["tasks"]  # once, for every evaluation
    # Each stage run on a worker has the seconds it ran there (Prefect's record of its task run).
    worker_stages = [r for n, r in summary["tasks"].items() if n.startswith(("convert[", "evaluate["))]
    assert worker_stages and all(r["seconds"] is not None and r["seconds"] > 0 for r in worker_stages)


def test_the_sweep_is_attached_to_its_prefect_run(s3_sweep, prefect_server):
    _, first, _ = s3_sweep
    summary = json.loads(first.stdout)
    artifacts = httpx.post(
        f"{prefect_server}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [summary["run_id"]]}}}
    ).json()
    by_key = {a["key"]: a for a in artifacts}
    table = by_key["ptq-sweep"]
    assert table["type"] == "table"
    data = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    assert [row["configuration"] for row in data] == [r["name"] for r in summary["rows"]]
    assert summary["report"]["plot"]["uri"] in by_key["ptq-sweep-plot"]["data"]  # a link artifact
    assert summary["best"] in by_key["ptq-sweep-summary"]["data"]


def test_a_rerun_reuses_every_stage_and_publishes_nothing_new(s3_sweep):
    _, first, second = s3_sweep
    assert second.returncode == 0, second.stderr[-4000:]
    before, after = json.loads(first.stdout), json.loads(second.stdout)
    assert all(record["cached"] for record in after["tasks"].values()), after["tasks"]
    # A cache hit only looks its result up: less time on the worker than the conversion it stands for.
    conversions = [n for n in before["tasks"] if n.startswith("convert[")]
    assert all(after["tasks"][n]["seconds"] < before["tasks"][n]["seconds"] for n in conversions), after["tasks"]
    assert after["best"] == before["best"]
    assert after["export"]["version"] == before["export"]["version"] and not after["export"]["published"]


def test_an_existing_cluster_is_used_through_dask_address(cli, tmp_path):
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        result = cli(
            "sweep",
            "--store",
            str(tmp_path / "store"),
            "--epochs",
            "2",
            "--configurations",
            "int8,float16",
            "--dask-address",
            cluster.scheduler_address,
            "--json",
        )
        assert result.returncode == 0, result.stderr[-4000:]
        executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
        worker_pids = set(client.run(os.getpid).values())
    summary = json.loads(result.stdout)
    assert {r["name"] for r in summary["rows"] if not r["reference"]} == {"int8", "float16"}
    # The float outputs, three conversions and three evaluations (float reference included).
    assert sum(executed.values()) >= 7
    assert {int(r["metrics"]["measured_on"].rsplit(" ", 1)[1]) for r in summary["rows"]} <= worker_pids


def test_bad_sweep_options_fail_with_one_line(cli, tmp_path):
    unknown = cli("sweep", "--store", str(tmp_path / "store"), "--configurations", "int8,int4")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().count("\n") == 0 and "unknown sweep configuration 'int4'" in unknown.stderr
    sizes = cli("sweep", "--store", str(tmp_path / "store"), "--calibration-sizes", "50,0")
    assert sizes.returncode == 2 and "--calibration-sizes" in sizes.stderr
    assert not (tmp_path / "store").exists()
