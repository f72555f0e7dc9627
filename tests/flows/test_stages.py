"""Which failures a stage retries: transient storage and network errors only."""

from __future__ import annotations

import pytest

from flows.stages import is_transient_error
from storage.store import ArtifactCorrupted, UnsafeKey
from storage.tables import TensorTableError
from tasks.errors import ConversionFailed, InvalidDataset


class EndpointConnectionError(Exception):
    """Named like botocore's, which does not derive from OSError."""


@pytest.mark.parametrize("error", [ConnectionResetError(), TimeoutError(), OSError(5, "I/O error"),
                                   EndpointConnectionError("could not connect")])
def test_network_and_storage_io_errors_are_retried(error):
    assert is_transient_error(error)


@pytest.mark.parametrize("error", [InvalidDataset("x"), ConversionFailed("x"), ArtifactCorrupted("x"),
                                   UnsafeKey("x"), TensorTableError("x"), FileNotFoundError("x"), ValueError("x"),
                                   KeyError("x")])
def test_input_and_code_errors_are_not(error):
    assert not is_transient_error(error)
