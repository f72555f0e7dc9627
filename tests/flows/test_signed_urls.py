"""A signed URL's secret (S3 presigned, Azure SAS) reaches the reader and nothing else: not Prefect's records of
the run, its logs, the manifest, the report, the JSON output, the Prefect artifacts or the export."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ptqflow.storage.store import hold_signed_url, redact_url, scrub_signed_urls

SIGNED = [
    (
        "https://b.s3.amazonaws.com/d/x.parquet?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID%2F20261130"
        "&X-Amz-Signature=abc123",
        "https://b.s3.amazonaws.com/d/x.parquet",
    ),
    (
        "https://acct.blob.core.windows.net/c/x.parquet?sv=2022-11-02&sp=r&se=2026-12-01&sig=c2VjcmV0",
        "https://acct.blob.core.windows.net/c/x.parquet",
    ),
    (
        "https://storage.googleapis.com/b/x.parquet?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Signature=ff00",
        "https://storage.googleapis.com/b/x.parquet",
    ),
]


@pytest.mark.parametrize(("url", "redacted"), SIGNED)
def test_signed_urls_are_reduced_to_scheme_host_and_path(url, redacted):
    assert redact_url(url) == redacted


def test_urls_without_a_secret_are_kept_whole():
    for url in (
        "s3://bucket/data.parquet",
        "https://example.org/data.parquet?version=3",
        "/data/x.parquet",
        "abfs://container@account.dfs.core.windows.net/data",
    ):
        assert redact_url(url) == url


def test_a_held_url_is_found_again_by_the_reader_and_scrubbed_from_messages(monkeypatch):
    from ptqflow.storage.store import SIGNED_URLS_ENV, filesystem_for

    monkeypatch.delenv(SIGNED_URLS_ENV, raising=False)
    url, redacted = SIGNED[0]
    assert hold_signed_url(url) == redacted
    _, path = filesystem_for(redacted)
    assert path == url  # the reader opens the signed original
    assert scrub_signed_urls(f"403 Forbidden for url {url}") == f"403 Forbidden for url {redacted}"


def tabular(path: Path) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 600)
    values = ((rng.normal(0, 1.5, (3, 8))[labels] + rng.normal(0, 1.0, (600, 8))) * 10 + 50).astype(np.float32)
    pq.write_table(
        pa.table(
            {"features": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), 8), "label": pa.array(labels)}
        ),
        str(path),
    )


def everything_said_and_stored(result, folders: list[Path], prefect_server: str, run_id: str) -> dict[str, str]:
    """Every place a secret could end up, as text: the CLI's output, every file the run wrote, and what the
    Prefect server recorded of the run (its parameters, logs, artifacts, task runs)."""
    import httpx

    texts = {"stdout": result.stdout, "stderr": result.stderr}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                texts[str(path)] = path.read_bytes().decode("utf-8", errors="replace")
    with httpx.Client(base_url=prefect_server, timeout=30) as client:
        texts["flow run"] = client.get(f"/flow_runs/{run_id}").text
        texts["logs"] = client.post(
            "/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}
        ).text
        texts["artifacts"] = client.post(
            "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}
        ).text
        texts["task runs"] = client.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}).text
    return texts


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["s3-presigned", "azure-sas-style"])
def test_a_signed_dataset_url_leaves_its_secret_nowhere(cli, prefect_server, s3_endpoint, tmp_path, kind):
    import boto3
    from botocore.config import Config

    bucket = f"signed-{uuid.uuid4().hex[:10]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, config=Config(signature_version="s3v4"))
    s3.create_bucket(Bucket=bucket)
    tabular(tmp_path / "data.parquet")
    s3.upload_file(str(tmp_path / "data.parquet"), bucket, "data/tabular.parquet")
    url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "data/tabular.parquet"}, ExpiresIn=3600
    )
    secret = url.split("X-Amz-Signature=")[1].split("&")[0]
    if kind == "azure-sas-style":  # an Azure SAS's query on a URL this machine can serve (S3 ignores the rest)
        secret = "c2FzLXNpZ25hdHVyZS1zZWNyZXQ"
        url += f"&sv=2022-11-02&sp=r&sig={secret}"
    assert len(secret) > 10 and secret in url

    store, export = tmp_path / "store", tmp_path / "export"
    result = cli(
        "run", "--dataset", url, "--epochs", "10", "--store", str(store), "--export", str(export), "--json", "--verbose"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert json.loads((store / "runs" / f"{summary['run_id']}.json").read_text())["parameters"]["sampling"][
        "dataset"
    ] == redact_url(url)
    texts = everything_said_and_stored(result, [store, export], prefect_server, summary["run_id"])
    assert len(texts) > 20  # the run wrote its artifacts, manifest, report and export
    leaks = [where for where, text in texts.items() if secret in text]
    assert not leaks, leaks


@pytest.mark.slow
def test_a_failing_run_on_a_signed_url_leaves_its_secret_out_of_every_record(
    cli, prefect_server, s3_endpoint, tmp_path
):
    """A stage that fails quoting the URL it read (here: the data set is not Parquet) must not carry the signature
    into the store's result records, Prefect's result storage or the Prefect server's database."""
    import boto3
    from botocore.config import Config

    from conftest import PREFECT_HOMES

    bucket = f"signed-{uuid.uuid4().hex[:10]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, config=Config(signature_version="s3v4"))
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="data/broken.parquet", Body=b"this is not a parquet file at all" * 40)
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "data/broken.parquet"})
    secret = url.split("X-Amz-Signature=")[1].split("&")[0]
    store = tmp_path / "store"
    result = cli("run", "--dataset", url, "--epochs", "1", "--store", str(store), "--json")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "broken.parquet" in result.stderr  # the failure is named, the URL redacted
    stored = [p for p in [*store.rglob("*"), *PREFECT_HOMES[prefect_server].rglob("*")] if p.is_file()]
    assert any(p.name.endswith(".db") for p in stored)  # the server's database is among what is searched
    leaks = [str(p) for p in stored if secret.encode() in p.read_bytes()]
    assert not leaks, leaks
