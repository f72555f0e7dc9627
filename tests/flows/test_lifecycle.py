"""What every run goes through before and after its stages (flows/lifecycle.py)."""

from __future__ import annotations

import os
import uuid

import pytest

from ptqflow.flows.lifecycle import credentials_from_blocks
from ptqflow.storage.store import StoreError


def test_blocks_name_the_credentials_for_the_run_only_and_a_bad_one_leaves_nothing_set(prefect_server, monkeypatch):
    from prefect.blocks.system import Secret

    monkeypatch.delenv("PTQFLOW_STORAGE_BLOCK", raising=False)
    monkeypatch.delenv("PTQFLOW_EXPORT_STORAGE_BLOCK", raising=False)
    name = f"run-credentials-{uuid.uuid4().hex[:8]}"
    Secret(value={"anon": True}).save(name)
    with credentials_from_blocks(name, None):
        assert os.environ["PTQFLOW_STORAGE_BLOCK"] == name and "PTQFLOW_EXPORT_STORAGE_BLOCK" not in os.environ
    assert "PTQFLOW_STORAGE_BLOCK" not in os.environ
    with pytest.raises(StoreError, match="cannot read the block 'missing-block'"):
        with credentials_from_blocks(name, "missing-block"):
            pass
    assert "PTQFLOW_STORAGE_BLOCK" not in os.environ and "PTQFLOW_EXPORT_STORAGE_BLOCK" not in os.environ
