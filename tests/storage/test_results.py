"""Prefect's result storage for ptqflow: JSON records only; a planted pickle is never loaded."""

from __future__ import annotations

import json
import os

import pytest
from pickle_probe import planted_pickle_record

from storage.results import JsonResultStorage, UnsafeResultRecord, check_result_record


def json_record(result: object) -> bytes:
    return json.dumps(
        {"metadata": {"serializer": {"type": "json"}, "storage_key": "k", "expiration": None}, "result": json.dumps(result)}
    ).encode()


def test_json_records_round_trip(tmp_path):
    storage = JsonResultStorage(store_url=str(tmp_path))
    storage.write_path("tasks.sample-abc", json_record({"a": 1}), _sync=True)
    assert json.loads(storage.read_path("tasks.sample-abc", _sync=True))["metadata"]["serializer"]["type"] == "json"
    assert (tmp_path / "prefect-results" / "tasks.sample-abc").exists()


def test_a_planted_pickle_record_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    storage = JsonResultStorage(store_url=str(tmp_path))
    (tmp_path / "prefect-results").mkdir()
    (tmp_path / "prefect-results" / "tasks.sample-abc").write_bytes(planted_pickle_record(str(marker)))
    with pytest.raises(UnsafeResultRecord, match="serializer 'pickle'"):
        storage.read_path("tasks.sample-abc", _sync=True)
    assert not marker.exists()


def test_prefect_treats_a_refused_record_as_absent(tmp_path):
    """Prefect's own ResultStore sees no record, so the task recomputes and overwrites it."""
    from prefect.results import ResultStore

    marker = tmp_path / "pwned"
    (tmp_path / "prefect-results").mkdir()
    (tmp_path / "prefect-results" / "key").write_bytes(planted_pickle_record(str(marker)))
    store = ResultStore(result_storage=JsonResultStorage(store_url=str(tmp_path)))
    assert store.exists("key") is False
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"not json", b"{}", b'{"metadata": {"serializer": "json"}}'])
def test_malformed_records_are_refused(content):
    with pytest.raises(UnsafeResultRecord):
        check_result_record(content, "somewhere")


def test_keys_are_confined_to_the_results_folder(tmp_path):
    storage = JsonResultStorage(store_url=str(tmp_path))
    storage.write_path("../../outside", json_record(1), _sync=True)
    assert not (tmp_path.parent / "outside").exists()
    assert (tmp_path / "prefect-results" / "outside").exists()
    assert not os.path.exists(tmp_path / "outside")
