"""The whole flow on S3 (moto on 127.0.0.1): store and export in a bucket, credentials from the environment or
from a Prefect Secret block."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

from ptqflow.storage.store import ArtifactRef, ArtifactStore
from ptqflow.tasks.evaluation.interpreter import audit_tensor_types

pytestmark = pytest.mark.slow

SECRET = "ptqflow-test-secret-7f3a9c"


@pytest.fixture(scope="module")
def s3_run(cli, s3_endpoint):
    import s3fs

    bucket = f"bucket-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_endpoint).mkdir(bucket)
    env = {"AWS_ACCESS_KEY_ID": "AKIDPTQFLOWTEST", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": s3_endpoint}
    args = ("--store", f"s3://{bucket}/prefix", "--export", f"s3://{bucket}/models/digits", "--epochs", "3")
    first = cli("run", *args, "--json", env=env)
    second = cli("run", *args, "--json", env=env)
    return bucket, env, first, second


def test_run_on_s3_leaves_verified_artifacts_a_manifest_and_latest_json(s3_run, s3_endpoint):
    bucket, _, first, _ = s3_run
    assert first.returncode == 0, first.stderr[-4000:]
    result = json.loads(first.stdout)
    store = ArtifactStore(f"s3://{bucket}/prefix", storage_options={"endpoint_url": s3_endpoint})
    for ref in result["artifacts"].values():
        assert ref["uri"].startswith(f"s3://{bucket}/prefix/blobs/")
        store.verify(ArtifactRef(**ref))
    assert audit_tensor_types(store.read_bytes(ArtifactRef(**result["artifacts"]["tflite"]))).full_integer

    manifest = json.loads(store.read_named(f"runs/{result['run_id']}.json"))
    assert manifest["status"] == "passed" and manifest["artifacts"] == result["artifacts"]
    assert manifest["export"]["version"] == result["export"]["version"]

    export = ArtifactStore(f"s3://{bucket}/models/digits", storage_options={"endpoint_url": s3_endpoint})
    latest = json.loads(export.read_named("latest.json"))
    assert latest["run_id"] == result["run_id"]
    for name, ref in latest["files"].items():
        data = export.read_named(ref["uri"])  # a path relative to the export, as a device resolves it
        assert hashlib.sha256(data).hexdigest() == ref["sha256"] and len(data) == ref["bytes"]
        if name != "manifest":
            assert ref["sha256"] == result["artifacts"][name]["sha256"]


def test_cached_rerun_on_s3_publishes_nothing_new(s3_run, s3_endpoint):
    bucket, _, first, second = s3_run
    assert second.returncode == 0, second.stderr[-4000:]
    again = json.loads(second.stdout)
    assert all(t["cached"] for t in again["tasks"].values())
    assert again["export"]["published"] is False
    assert again["export"]["version"] == json.loads(first.stdout)["export"]["version"]


def test_credentials_appear_nowhere(s3_run, s3_endpoint):
    import s3fs
    from prefect.client.orchestration import get_client

    bucket, _, first, second = s3_run
    for process in (first, second):
        assert SECRET not in process.stdout and SECRET not in process.stderr
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_endpoint)
    for path in fs.find(bucket):
        if path.endswith(".json") or "/prefect-results/" in path:
            assert SECRET.encode() not in fs.cat_file(path), path
    run_id = json.loads(first.stdout)["run_id"]
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(run_id)
        assert SECRET not in json.dumps(flow_run.parameters)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
        assert artifacts and all(SECRET not in json.dumps(a.data) for a in artifacts)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        assert logs and all(SECRET not in log.message for log in logs)


BLOCK_SECRET = "ptqflow-block-secret-4be2d1"


def test_credentials_from_a_secret_block_open_s3_and_appear_nowhere(prefect_server, s3_endpoint, tmp_path):
    import os
    import subprocess

    import s3fs
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client

    from conftest import ptqflow_events, ptqflow_executable, wait_for

    name = f"s3-credentials-{uuid.uuid4().hex[:8]}"
    Secret(value={"key": "AKIDPTQFLOWBLOCK", "secret": BLOCK_SECRET, "endpoint_url": s3_endpoint}).save(name)
    bucket = f"bucket-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_endpoint)
    fs.mkdir(bucket)
    # No credentials anywhere but in the block: no AWS_* variables, no credentials or config file.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        PREFECT_API_URL=prefect_server,
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ENDPOINT_URL=s3_endpoint,
    )
    args = ["run", "--store", f"s3://{bucket}/store", "--export", f"s3://{bucket}/models", "--epochs", "2", "--json"]

    def ptqflow(*more: str) -> subprocess.CompletedProcess:
        command = [ptqflow_executable(), *args, *more]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)

    without = ptqflow()
    # The control: without them nothing opens the bucket, and the run says so in one line.
    assert without.returncode == 2 and not fs.find(bucket), without.stderr[-2000:]
    assert "Traceback" not in without.stderr and "credentials" in without.stderr.lower()
    missing = ptqflow("--storage-block", "no-such-block")
    assert missing.returncode == 2 and "cannot read the block 'no-such-block'" in missing.stderr
    assert "Traceback" not in missing.stderr

    since = datetime.now(timezone.utc) - timedelta(seconds=5)
    run = ptqflow("--storage-block", name, "--export-block", f"secret/{name}")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert fs.exists(f"{bucket}/models/latest.json") and fs.find(f"{bucket}/store/blobs")

    for process in (without, missing, run):
        assert BLOCK_SECRET not in process.stdout + process.stderr
    for path in fs.find(bucket):
        if path.endswith((".json", ".md", ".html")) or "/prefect-results/" in path:
            assert BLOCK_SECRET.encode() not in fs.cat_file(path), path
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(result["run_id"])
        assert flow_run.parameters["storage_block"] == name and BLOCK_SECRET not in json.dumps(flow_run.parameters)
        # Logs and events reach the server asynchronously: wait until they are there.
        logs = wait_for(
            lambda: client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[result["run_id"]])))
        )
        assert logs and all(BLOCK_SECRET not in log.message for log in logs)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[result["run_id"]]))
        )
        assert artifacts and all(BLOCK_SECRET not in json.dumps(a.data) for a in artifacts)
        events = wait_for(lambda: ptqflow_events(client, since), count=2)
        assert events and all(BLOCK_SECRET not in e.model_dump_json() for e in events)
