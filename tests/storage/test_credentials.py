"""Storage options from Prefect blocks, saved on the session's real Prefect server."""

from __future__ import annotations

import uuid

import pytest

from ptqflow.storage import credentials
from ptqflow.storage.credentials import options_from_block
from ptqflow.storage.store import StoreError


@pytest.fixture(autouse=True)
def no_cached_blocks(monkeypatch):
    monkeypatch.setattr(credentials, "_cache", {})


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def test_a_secret_block_holds_the_fsspec_options_as_json(prefect_server):
    from prefect.blocks.system import Secret

    name = unique("options")
    Secret(value={"key": "AKID", "secret": "s3cr3t", "endpoint_url": "http://127.0.0.1:9"}).save(name)
    assert options_from_block(name) == {"key": "AKID", "secret": "s3cr3t", "endpoint_url": "http://127.0.0.1:9"}
    assert options_from_block(f"secret/{name}") == options_from_block(name)
    text = unique("text")
    Secret(value='{"anon": true}').save(text)  # JSON kept as a string works the same
    assert options_from_block(text) == {"anon": True}


def test_prefect_aws_blocks_give_s3fs_options(prefect_server):
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    name = unique("aws")
    aws = AwsCredentials(
        aws_access_key_id="AKID",
        aws_secret_access_key="s3cr3t",
        region_name="eu-west-1",
        aws_client_parameters=AwsClientParameters(endpoint_url="http://127.0.0.1:9"),
    )
    aws.save(name)
    expected = {
        "key": "AKID",
        "secret": "s3cr3t",
        "endpoint_url": "http://127.0.0.1:9",
        "client_kwargs": {"region_name": "eu-west-1"},
    }
    assert options_from_block(f"aws-credentials/{name}") == expected
    bucket = unique("bucket")
    S3Bucket(bucket_name="models", credentials=aws).save(bucket)
    assert options_from_block(f"s3-bucket/{bucket}") == expected


@pytest.mark.parametrize(
    ("make", "reference", "message"),
    [
        (None, "no-such-block", "cannot read the block 'no-such-block' .*create it"),
        ("not json", "{name}", "does not hold a JSON object of fsspec storage options"),
        (None, "gcs-bucket/x", "unknown block type 'gcs-bucket'"),
    ],
)
def test_a_block_that_gives_no_options_is_refused_by_name_without_its_value(prefect_server, make, reference, message):
    from prefect.blocks.system import Secret

    name = unique("bad")
    if make is not None:
        Secret(value=make).save(name)
    with pytest.raises(StoreError, match=message) as refused:
        options_from_block(reference.format(name=name))
    assert "not json" not in str(refused.value)
