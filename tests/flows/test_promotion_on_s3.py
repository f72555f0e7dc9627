"""Champion and challenger with the data, store and export on S3 (moto): a first run on a data directory is
published, an unchanged rerun publishes nothing, a new file retrains and is compared before publishing, a worse
model is not promoted (and the run still completes), `ptqflow promote` and `ptqflow rollback` move latest.json
and keep every pointer."""

from __future__ import annotations

import json
import uuid

import pytest

from ptqflow.storage.store import ArtifactRef, ArtifactStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    import s3fs

    name = f"promo-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_endpoint).mkdir(name)
    return name


def _write_digits_part(s3_endpoint: str, bucket: str, part: int, folder: str = "data") -> None:
    """One third of digits as a Parquet file under s3://<bucket>/<folder>/."""
    import numpy as np

    from ptqflow.storage.tables import write_parquet_bytes
    from ptqflow.tasks.data.datasets import load_dataset

    table = load_dataset("digits")
    rows = np.array_split(np.random.default_rng(0).permutation(len(table)), 3)[part]
    store = ArtifactStore(f"s3://{bucket}/{folder}", storage_options={"endpoint_url": s3_endpoint})
    store.write_named(f"part-{part}.parquet", write_parquet_bytes(table.take(np.sort(rows))))


@pytest.fixture(scope="module")
def runs(cli, s3_endpoint, bucket):
    env = {"AWS_ENDPOINT_URL": s3_endpoint}
    where = ("--store", f"s3://{bucket}/store", "--export", f"s3://{bucket}/models")
    args = ("run", "--dataset", f"s3://{bucket}/data/", *where, "--json")
    _write_digits_part(s3_endpoint, bucket, 0)
    _write_digits_part(s3_endpoint, bucket, 1)
    champion = cli(*args, "--epochs", "8", env=env)
    unchanged = cli(*args, "--epochs", "8", env=env)
    _write_digits_part(s3_endpoint, bucket, 2)  # new data arrives
    grown = cli(*args, "--epochs", "8", env=env)
    # One epoch: a worse model. Its own gate is opened wide so that only the comparison can refuse it.
    worse = cli(*args, "--epochs", "1", "--max-accuracy-drop", "100", env=env)
    return env, where, champion, unchanged, grown, worse


def _export(s3_endpoint: str, bucket: str) -> ArtifactStore:
    return ArtifactStore(f"s3://{bucket}/models", storage_options={"endpoint_url": s3_endpoint})


def test_the_first_run_is_published_and_an_unchanged_rerun_publishes_nothing(runs, s3_endpoint, bucket):
    _, _, champion, unchanged, _, _ = runs
    assert champion.returncode == 0, champion.stderr[-3000:]
    first = json.loads(champion.stdout)
    assert first["promotion"]["promote"] and first["export"]["published"]
    assert first["promotion"]["message"] == "promoted: there is no exported model yet"

    assert unchanged.returncode == 0, unchanged.stderr[-3000:]
    again = json.loads(unchanged.stdout)
    assert all(t["cached"] for t in again["tasks"].values())
    assert again["promotion"]["challenger_accuracy"] == again["promotion"]["champion_accuracy"]
    assert not again["export"]["published"] and again["export"]["version"] == first["export"]["version"]


def test_new_data_retrains_and_is_compared_before_publishing(runs, s3_endpoint, bucket):
    _, _, champion, _, grown, _ = runs
    assert grown.returncode == 0, grown.stderr[-3000:]
    result = json.loads(grown.stdout)
    assert not result["tasks"]["sample_dataset"]["cached"] and not result["tasks"]["train_float_model"]["cached"]
    decision = result["promotion"]
    assert decision["champion_run_id"] == json.loads(champion.stdout)["run_id"]
    assert decision["champion_accuracy"] is not None and decision["challenger_accuracy"] is not None
    latest = json.loads(_export(s3_endpoint, bucket).read_named("latest.json"))
    assert latest["run_id"] == (result["run_id"] if decision["promote"] else decision["champion_run_id"])
    assert (result["export"] is not None) is decision["promote"]


def test_a_worse_model_is_not_promoted_and_the_run_completes(runs, s3_endpoint, bucket):
    _, _, _, _, _, worse = runs
    assert worse.returncode == 0, worse.stderr[-3000:]
    result = json.loads(worse.stdout)
    decision = result["promotion"]
    assert result["status"] == "passed" and result["export"] is None
    assert not decision["promote"] and decision["message"].startswith("not promoted: accuracy"), decision
    assert decision["challenger_accuracy"] < decision["champion_accuracy"]
    export = _export(s3_endpoint, bucket)
    assert json.loads(export.read_named("latest.json"))["run_id"] == decision["champion_run_id"]
    store = ArtifactStore(f"s3://{bucket}/store", storage_options={"endpoint_url": s3_endpoint})
    manifest = json.loads(store.read_named(f"runs/{result['run_id']}.json"))
    assert manifest["promotion"] == decision and manifest["export"] is None
    # The run's report records the decision too (the validation's own cached report does not change).
    report = json.loads(store.read_bytes(ArtifactRef(**manifest["artifacts"]["report"])))
    assert report["promotion"] == decision
    assert (
        f"## Promotion\n\n- {decision['message']}"
        in store.read_bytes(ArtifactRef(**manifest["artifacts"]["report_md"])).decode()
    )
    assert "<h2>Promotion</h2>" in store.read_bytes(ArtifactRef(**manifest["artifacts"]["report_html"])).decode()


def test_the_published_report_says_why_it_was_published(runs, s3_endpoint, bucket):
    _, _, champion, _, _, _ = runs
    version = json.loads(champion.stdout)["export"]["version"]
    report = _export(s3_endpoint, bucket).read_named(f"versions/{version}/report.md").decode()
    assert "## Promotion\n\n- promoted: there is no exported model yet" in report


def test_promote_waits_for_a_run_that_holds_the_export_lock(runs, cli, prefect_server, s3_endpoint, bucket):
    import time

    from conftest import start_cli
    from ptqflow.flows.locks import exclusive

    env, where, champion, _, _, _ = runs
    url = f"s3://{bucket}/locked-models"  # an export of its own: the other tests' pointers stay as they are
    export = _export(s3_endpoint, bucket).__class__(url, storage_options={"endpoint_url": s3_endpoint})
    args = ("promote", json.loads(champion.stdout)["run_id"], where[0], where[1], "--export", url)
    with exclusive(export.url):  # what a run holds from its start until it has published
        refused = cli(*args, "--wait", "1", env=env)
        assert refused.returncode == 3, refused.stderr[-3000:]
        assert f"a run is using {export.url} (it holds the lock" in refused.stderr
        assert refused.stderr.strip().count("\n") == 0 and "Traceback" not in refused.stderr
        waiting = start_cli(prefect_server, *args, env=env)
        time.sleep(5)
        assert waiting.poll() is None and not export.exists_named("latest.json")
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err[-3000:]
    assert json.loads(export.read_named("latest.json"))["run_id"] == json.loads(champion.stdout)["run_id"]


def test_promote_by_hand_then_roll_back(runs, cli, s3_endpoint, bucket):
    env, where, _, _, _, worse = runs
    worse_id = json.loads(worse.stdout)["run_id"]
    export = _export(s3_endpoint, bucket)
    before = json.loads(export.read_named("latest.json"))
    pointers = len(export.list_named("history"))

    promoted = cli("promote", worse_id[:8], *where, env=env)
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    assert json.loads(export.read_named("latest.json"))["run_id"] == worse_id

    rolled = cli("rollback", "--export", where[3], env=env)
    assert rolled.returncode == 0, rolled.stderr[-3000:]
    latest = json.loads(export.read_named("latest.json"))
    assert latest["version"] == before["version"] and latest["action"] == "rollback"
    assert len(export.list_named("history")) == pointers + 2  # the promoted run's publish and the rollback

    while (again := cli("rollback", "--export", where[3], env=env)).returncode == 0:
        pass  # back to the first version
    assert again.returncode == 2 and "nothing to roll back to" in again.stderr
    assert again.stderr.strip().count("\n") == 0


def test_a_dated_folder_on_s3_is_read_for_the_run_date(cli, s3_endpoint, bucket):
    from datetime import datetime, timedelta, timezone

    today = datetime.now(timezone.utc)  # (a run started across midnight UTC would miss it)
    _write_digits_part(s3_endpoint, bucket, 0, folder=f"events/{today:%Y-%m-%d}")
    env = {"AWS_ENDPOINT_URL": s3_endpoint}
    template = f"s3://{bucket}/events/{{date:%Y-%m-%d}}/"
    args = ("run", "--store", f"s3://{bucket}/dated-store", "--epochs", "2", "--max-accuracy-drop", "100", "--json")
    result = cli(*args, "--dataset", template, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    store = ArtifactStore(f"s3://{bucket}/dated-store", storage_options={"endpoint_url": s3_endpoint})
    dataset = json.loads(store.read_bytes(ArtifactRef(**summary["artifacts"]["dataset"])))
    assert dataset["source"] == f"s3://{bucket}/events/{today:%Y-%m-%d}/"
    assert sum(split["samples"] for split in dataset["splits"].values()) == 599  # that one file, a third of digits

    # --since selects by the objects' LastModified: none was written tomorrow.
    tomorrow = f"{today + timedelta(days=1):%Y-%m-%d}"
    refused = cli(*args, "--dataset", f"s3://{bucket}/events/{today:%Y-%m-%d}/", "--since", tomorrow, env=env)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"was modified since {tomorrow} 00:00 UTC: widen --window-days or move --since back" in refused.stderr
    assert refused.stderr.strip().count("\n") == 0 and "Traceback" not in refused.stderr
