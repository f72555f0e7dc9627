"""Limits read from metadata before any data (storage/limits.py): pure checks."""

from __future__ import annotations

import pyarrow as pa
import pytest

from ptqflow.storage.limits import (
    MAX_DECODED_BYTES,
    MAX_ROWS,
    check_label_range,
    check_source_size,
    declared_sample_bytes,
)
from ptqflow.tasks.core.errors import InvalidDataset


def test_bytes_per_sample_come_from_the_type_alone():
    assert declared_sample_bytes(pa.list_(pa.float32(), 12)) == 48
    assert declared_sample_bytes(pa.list_(pa.list_(pa.uint8(), 32), 32)) == 1024
    assert declared_sample_bytes(pa.fixed_shape_tensor(pa.uint8(), [32, 32, 3])) == 3072
    assert declared_sample_bytes(pa.list_(pa.float32())) is None  # variable: only the data says
    assert declared_sample_bytes(pa.binary()) is None


def test_a_source_past_a_limit_is_refused_naming_the_setting(monkeypatch):
    with pytest.raises(
        InvalidDataset,
        match="declares 1,000,000,000 rows, above the limit of 50,000,000 rows in a source: raise PTQFLOW_MAX_ROWS",
    ):
        check_source_size("s3://b/x.parquet", 10**9, 1)
    with pytest.raises(InvalidDataset, match="would decode to .* raise PTQFLOW_MAX_DECODED_BYTES"):
        check_source_size("s3://b/x.parquet", 10**6, 12_288)
    check_source_size("s3://b/x.parquet", 10**6, 12_288, held_rows=10_000)  # a draw holds only what it takes
    with pytest.raises(InvalidDataset, match="has a label of 10,000,000,000.*raise PTQFLOW_MAX_CLASSES"):
        check_label_range("s3://b/x.parquet", 10**10)
    monkeypatch.setenv(MAX_ROWS.setting, "2e9")
    check_source_size("s3://b/x.parquet", 10**9, 1)
    monkeypatch.setenv(MAX_DECODED_BYTES.setting, "lots")
    with pytest.raises(InvalidDataset, match="PTQFLOW_MAX_DECODED_BYTES='lots' is not a number"):
        check_source_size("s3://b/x.parquet", 10, 1)
