"""The device targets as the parameters take them: names Vela and ptqflow use, in the user's order, once each."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ptqflow.tasks.core.parameters import DeviceTarget, ValidationParameters


def test_targets_are_read_from_a_comma_separated_list_in_order_once_each():
    chosen = ValidationParameters(targets="tflm, ethos-u55-128,TFLM")
    assert chosen.targets == (DeviceTarget.tflm, DeviceTarget.ethos_u55_128)
    assert chosen.npu_targets == (DeviceTarget.ethos_u55_128,)
    assert ValidationParameters().targets == (DeviceTarget.litert,)


def test_an_unknown_target_lists_the_known_ones():
    with pytest.raises(ValidationError, match=r"unknown target 'ethos-u99': choose from litert, tflm, ethos-u55-32"):
        ValidationParameters(targets=("tflm", "ethos-u99"))
    with pytest.raises(ValidationError):
        ValidationParameters(targets=())
