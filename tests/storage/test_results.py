"""Prefect's result storage for ptqflow: only records exactly as ptqflow writes them; nothing planted runs."""

from __future__ import annotations

import json
import os

import pytest
from pickle_probe import planted_pickle_record

from ptqflow.storage.results import EXPECTED_SERIALIZER, JsonResultStorage, UnsafeResultRecord, check_result_record

CALIBRATION_SET = {
    "__class__": "ptqflow.tasks.core.artifacts.CalibrationSet",
    "data": {
        "table": {"uri": "file:///s/blobs/5b/" + "5b" * 32 + ".parquet", "sha256": "5b" * 32, "bytes": 6956},
        "samples": 200,
    },
}


def json_record(result: object, **serializer: object) -> bytes:
    return json.dumps(
        {
            "metadata": {"serializer": {**EXPECTED_SERIALIZER, **serializer}, "storage_key": "k", "expiration": None},
            "result": json.dumps(result),
        }
    ).encode()


def planted(tmp_path, record: bytes, key: str = "tasks.data.sampling-abc") -> JsonResultStorage:
    (tmp_path / "prefect-results").mkdir(exist_ok=True)
    (tmp_path / "prefect-results" / key).write_bytes(record)
    return JsonResultStorage(store_url=str(tmp_path))


def test_json_records_round_trip(tmp_path):
    storage = JsonResultStorage(store_url=str(tmp_path))
    import ptqflow.tasks.core.artifacts  # noqa: F401 - the stage outputs are loaded wherever a stage runs

    storage.write_path("tasks.data.sampling-abc", json_record(CALIBRATION_SET), _sync=True)
    assert (
        json.loads(storage.read_path("tasks.data.sampling-abc", _sync=True))["metadata"]["serializer"]["type"] == "json"
    )
    assert (tmp_path / "prefect-results" / "tasks.data.sampling-abc").exists()


def test_a_planted_pickle_record_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    storage = JsonResultStorage(store_url=str(tmp_path))
    (tmp_path / "prefect-results").mkdir()
    (tmp_path / "prefect-results" / "tasks.data.sampling-abc").write_bytes(planted_pickle_record(str(marker)))
    with pytest.raises(UnsafeResultRecord, match="serializer 'pickle'"):
        storage.read_path("tasks.data.sampling-abc", _sync=True)
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


@pytest.mark.parametrize(
    ("planted_record", "refusal"),
    [
        # Prefect rebuilds the serializer from the record, decoder included: this one would run a shell command.
        (
            lambda marker: json_record({f"touch {marker}": 0}, object_decoder="subprocess.getoutput"),
            "serializer settings ptqflow never writes (object_decoder)",
        ),
        (
            lambda marker: json_record(CALIBRATION_SET, object_encoder="subprocess.getoutput"),
            "serializer settings ptqflow never writes (object_encoder)",
        ),
        (
            lambda marker: json_record(CALIBRATION_SET, loads_kwargs={"object_hook": "x"}),
            "serializer settings ptqflow never writes (loads_kwargs)",
        ),
        # Prefect's own decoder imports whatever class a payload names.
        (
            lambda marker: json_record({"__class__": "ptqflow_planted_probe.Anything", "data": {}}),
            "names types outside ptqflow's stage outputs (ptqflow_planted_probe.Anything)",
        ),
        (
            lambda marker: json_record({"__exc_type__": "subprocess.Popen", "message": f"touch {marker}"}),
            "names types outside ptqflow's stage outputs (subprocess.Popen)",
        ),
    ],
    ids=["object_decoder", "object_encoder", "loads_kwargs", "foreign_class", "exception_type"],
)
def test_a_planted_json_record_is_refused_and_prefect_runs_nothing(tmp_path, monkeypatch, planted_record, refusal):
    from prefect.results import ResultStore

    marker = tmp_path / "pwned"
    # A module whose import would prove that a record chose code to load.
    (tmp_path / "ptqflow_planted_probe.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Anything: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    storage = planted(tmp_path, planted_record(marker))
    with pytest.raises(UnsafeResultRecord, match=refusal.replace("(", r"\(").replace(")", r"\)")):
        storage.read_path("tasks.data.sampling-abc", _sync=True)
    assert ResultStore(result_storage=storage).exists("tasks.data.sampling-abc") is False  # a cache miss to Prefect
    assert not marker.exists()


def test_a_refused_record_is_reported_by_name(tmp_path, caplog):
    storage = planted(tmp_path, json_record(CALIBRATION_SET, object_decoder="subprocess.getoutput"))
    with caplog.at_level("WARNING", logger="ptqflow.results"), pytest.raises(UnsafeResultRecord):
        storage.read_path("tasks.data.sampling-abc", _sync=True)
    assert "prefect-results/tasks.data.sampling-abc has serializer settings ptqflow never writes" in caplog.text
    assert "recomputed" in caplog.text
