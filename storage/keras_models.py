"""Keras models as bytes: the one place that knows how a ``.keras`` archive is written and read."""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

_EPOCH = (1980, 1, 1, 0, 0, 0)


def _normalised_archive(data: bytes) -> bytes:
    """Rewrite a ``.keras`` zip without its save time, so the same weights always give the same bytes
    (and so one content-addressed blob, whatever the clock said)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in sorted(src.infolist(), key=lambda i: i.filename):
            payload = src.read(info.filename)
            if info.filename == "metadata.json":
                meta = json.loads(payload)
                meta.pop("date_saved", None)
                payload = json.dumps(meta, sort_keys=True).encode()
            elif info.filename == "config.json":
                payload = json.dumps(_renumber_shared_objects(json.loads(payload))).encode()
            dst.writestr(zipfile.ZipInfo(info.filename, date_time=_EPOCH), payload, zipfile.ZIP_DEFLATED)
    return out.getvalue()


def _renumber_shared_objects(config: Any) -> Any:
    """Keras writes ``shared_object_id`` as Python ``id()`` of the shared object (a memory address); renumber them
    in order of first appearance, which keeps the links between shared objects and drops the address."""
    numbers: dict[int, int] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                key: numbers.setdefault(value, len(numbers) + 1) if key == "shared_object_id" else walk(value)
                for key, value in node.items()
            }
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    return walk(config)


def keras_model_to_bytes(model: keras.Model) -> bytes:
    """Serialise a model to the native ``.keras`` format (architecture and weights, no optimizer state)."""
    with tempfile.TemporaryDirectory(prefix="ptqflow-") as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path, include_optimizer=False)
        with open(path, "rb") as f:
            return _normalised_archive(f.read())


def keras_model_from_bytes(data: bytes) -> keras.Model:
    """Load a ``.keras`` archive with Keras safe mode on: no arbitrary code (lambdas) is deserialised."""
    import keras

    with tempfile.TemporaryDirectory(prefix="ptqflow-") as tmp:
        path = os.path.join(tmp, "model.keras")
        with open(path, "wb") as f:
            f.write(data)
        return keras.models.load_model(path, compile=False, safe_mode=True)
