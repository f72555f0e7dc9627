"""How much a source or a model file may ask of this machine, checked from metadata before anything is read.

A data file and a model file can be written by someone else. A few kilobytes of Parquet can declare a billion
rows (run-length encoded) or a label of 10^10, and a model URL can name a file of any size; read as they are,
each ends in an out-of-memory kill instead of an error. Every limit has a default that fits a 24 GiB machine
and a setting that raises it, named in the error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa

from ptqflow.storage.errors import InvalidDataset, InvalidModel

GIB = 1 << 30


@dataclass(frozen=True)
class Limit:
    setting: str
    default: int
    what: str

    @property
    def value(self) -> int:
        raw = os.environ.get(self.setting, "").strip()
        if not raw:
            return self.default
        try:
            value = int(float(raw))
        except ValueError:
            raise InvalidDataset(f"{self.setting}={raw!r} is not a number: set it to {self.what}") from None
        if value < 1:
            raise InvalidDataset(f"{self.setting}={raw!r} must be at least 1: set it to {self.what}")
        return value

    def refusal(self, found: str) -> str:
        return f"{found}, above the limit of {self.value:,} {self.what}: raise {self.setting} if this is intended"


MAX_ROWS = Limit("PTQFLOW_MAX_ROWS", 50_000_000, "rows in a source")
MAX_SAMPLE_BYTES = Limit("PTQFLOW_MAX_SAMPLE_BYTES", 256 << 20, "bytes per sample")
MAX_DECODED_BYTES = Limit("PTQFLOW_MAX_DECODED_BYTES", 8 * GIB, "bytes of decoded samples held at once")
MAX_CLASSES = Limit("PTQFLOW_MAX_CLASSES", 100_000, "classes (largest label + 1)")
MAX_MODEL_BYTES = Limit("PTQFLOW_MAX_MODEL_BYTES", 4 * GIB, "bytes in a model file")


def declared_sample_bytes(field_type: pa.DataType) -> int | None:
    """Bytes one sample of a features column takes once decoded, from its type alone (fixed-size lists and
    tensors); None for types whose size only the data says (variable lists, binary)."""
    if isinstance(field_type, pa.BaseExtensionType):  # fixed_shape_tensor and user extension types
        field_type = field_type.storage_type
    width = 1
    while pa.types.is_fixed_size_list(field_type):
        width *= field_type.list_size
        field_type = field_type.value_type
    try:
        return width * max(1, field_type.bit_width // 8)
    except ValueError:  # no fixed width: variable lists, strings, binary
        return None


def check_source_size(where: str, rows: int, sample_bytes: int | None, held_rows: int | None = None) -> None:
    """Refuse a source whose footers declare more rows, or bigger samples, than the limits allow; ``held_rows``
    is how many samples will be decoded at once (all of them, unless a draw takes fewer)."""
    if rows > MAX_ROWS.value:
        raise InvalidDataset(MAX_ROWS.refusal(f"{where} declares {rows:,} rows"))
    if sample_bytes is None:
        return
    if sample_bytes > MAX_SAMPLE_BYTES.value:
        raise InvalidDataset(MAX_SAMPLE_BYTES.refusal(f"{where} has samples of {sample_bytes:,} bytes"))
    held = (rows if held_rows is None else held_rows) * sample_bytes
    if held > MAX_DECODED_BYTES.value:
        raise InvalidDataset(
            MAX_DECODED_BYTES.refusal(
                f"{where} would decode to {held:,} bytes ({rows if held_rows is None else held_rows:,} samples of "
                f"{sample_bytes:,} bytes); --sample-size draws fewer"
            )
        )


def check_label_range(where: str, largest: int) -> None:
    if largest >= MAX_CLASSES.value:
        raise InvalidDataset(MAX_CLASSES.refusal(f"{where} has a label of {largest:,}"))


def check_model_size(url: str, size: int) -> None:
    if size > MAX_MODEL_BYTES.value:
        raise InvalidModel(MAX_MODEL_BYTES.refusal(f"--model-url {url} is {size:,} bytes"))
