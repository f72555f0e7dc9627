"""Variables set for a while are restored as they were, set or not, even when the block fails."""

from __future__ import annotations

import os

import pytest

from ptqflow.flows.environment import variables_set


def test_variables_are_restored_as_they_were_set_or_not(monkeypatch):
    monkeypatch.setenv("PTQFLOW_TEST_KEPT", "before")
    monkeypatch.delenv("PTQFLOW_TEST_NEW", raising=False)
    with pytest.raises(RuntimeError), variables_set({"PTQFLOW_TEST_KEPT": "during", "PTQFLOW_TEST_NEW": "during"}):
        assert os.environ["PTQFLOW_TEST_KEPT"] == os.environ["PTQFLOW_TEST_NEW"] == "during"
        os.environ["PTQFLOW_TEST_NEW"] = "changed inside"
        raise RuntimeError("the run failed")
    assert os.environ["PTQFLOW_TEST_KEPT"] == "before" and "PTQFLOW_TEST_NEW" not in os.environ
