"""``ptqflow run --dask-address``: the test split predicted shard by shard on an existing Dask cluster's workers
(LiteRT, and TFLite Micro), and a report equal to the one-process run's."""

from __future__ import annotations

import json
import os

import pytest

from ptqflow.storage.store import ArtifactRef, ArtifactStore
from ptqflow.storage.tables import read_parquet
from ptqflow.tasks.core.validation_report import without_timings

pytestmark = pytest.mark.slow


def _report(store: str, summary: dict) -> dict:
    return json.loads(ArtifactStore(store).read_bytes(ArtifactRef(**summary["artifacts"]["report"])))


def test_validation_sharded_on_a_dask_cluster_reports_what_one_process_reports(cli, tmp_path):
    from distributed import Client, LocalCluster

    store = str(tmp_path / "store")
    common = ("run", "--store", store, "--epochs", "2", "--validation-batch-size", "64", "--json")
    common += ("--target", "tflm", "--tflm-samples", "100")  # TFLite Micro too, on a draw that spans the shards
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        sharded = cli(*common, "--shard-rows", "64", "--dask-address", cluster.scheduler_address)
        assert sharded.returncode == 0, sharded.stderr[-4000:]
        executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
        worker_pids = set(client.run(os.getpid).values())
    one_process = cli(*common)
    assert one_process.returncode == 0, one_process.stderr[-4000:]

    sharded_summary, one_summary = json.loads(sharded.stdout), json.loads(one_process.stdout)
    shards = [name for name in sharded_summary["tasks"] if name.startswith("predict_test_rows[")]
    assert len(shards) == 6  # digits' 360 test rows, 64 a shard
    assert sum(executed.values()) >= len(shards) and len([n for n in executed.values() if n]) == 2
    assert not any(name.startswith("predict_test_rows") for name in one_summary["tasks"])
    assert worker_pids.isdisjoint({os.getpid()})

    # The same models (the one-process run reused the sharded run's stages) and the same figures.
    assert sharded_summary["artifacts"]["tflite"] == one_summary["artifacts"]["tflite"]
    sharded_report, one_report = _report(store, sharded_summary), _report(store, one_summary)
    assert without_timings(sharded_report["metrics"]) == without_timings(one_report["metrics"])
    assert sharded_report["metrics"]["tflm"]["ran"] and sharded_report["metrics"]["tflm"]["samples"] == 100
    # TFLM ran in the shards (the validate stage would otherwise run it itself, to the same figures).
    ran_in_shards = []
    for record in (tmp_path / "store" / "prefect-results").iterdir():
        result = json.loads(json.loads(record.read_text())["result"])
        if result["__class__"].endswith(".PredictedRows") and result["data"]["tflm"]["outputs"]:
            outputs = ArtifactRef(**result["data"]["tflm"]["outputs"])
            ran_in_shards += read_parquet(ArtifactStore(store).read_bytes(outputs)).labels.tolist()
    assert sorted(ran_in_shards) == sorted(set(ran_in_shards)) and len(ran_in_shards) == 100
    assert without_timings(sharded_summary["metrics"]) == without_timings(one_summary["metrics"])


def test_an_unreachable_scheduler_fails_before_anything_runs(cli, tmp_path):
    result = cli("run", "--store", str(tmp_path / "store"), "--dask-address", "tcp://127.0.0.1:9", "--json")
    assert result.returncode == 2
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "store").exists()


def test_a_test_split_read_in_windows_reports_the_same_sharded_or_not(prefect_server, tmp_path, monkeypatch):
    """Validation reads, predicts and sums the test split window by window: windows that do not line up with the
    shards (96 rows against 64), TFLite Micro's draw across them, and the report of the sharded run is still the
    one-process run's; no window holds more rows than ``window_rows``."""
    import ptqflow
    from ptqflow.tasks.evaluation import validation

    monkeypatch.setattr(validation, "WINDOW_BYTES", 100 * 8 * 8)  # digits: 8x8 uint8 rows, batch 32: 96 rows
    windows: list[int] = []
    add = validation.Evaluation.add

    def counted(self, start, features, *args, **kwargs):
        windows.append(len(features))
        return add(self, start, features, *args, **kwargs)

    monkeypatch.setattr(validation.Evaluation, "add", counted)
    store = str(tmp_path / "store")
    common = {"store": store, "epochs": 1, "validation_batch_size": 32, "target": "tflm", "tflm_samples": 100}
    sharded = ptqflow.run(**common, shard_rows=64)
    assert windows == [96, 96, 96, 72]  # digits' 360 test rows
    one_process = ptqflow.run(**common)
    assert windows[4:] == [96, 96, 96, 72]
    assert sum(name.startswith("predict_test_rows[") for name in sharded.tasks) == 6
    assert not any(name.startswith("predict_test_rows") for name in one_process.tasks)
    sharded_report = _report(store, sharded.model_dump(mode="json"))
    one_report = _report(store, one_process.model_dump(mode="json"))
    assert sharded_report["metrics"]["tflm"]["ran"] and sharded_report["metrics"]["tflm"]["samples"] == 100
    assert without_timings(sharded_report["metrics"]) == without_timings(one_report["metrics"])
