"""A pickle payload that proves it ran (it creates a file), planted as a Prefect result record."""

from __future__ import annotations

import base64
import json
import pickle


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def planted_pickle_record(marker_path: str) -> bytes:
    payload = base64.b64encode(pickle.dumps(_Marker(marker_path))).decode()
    return json.dumps(
        {
            "metadata": {
                "storage_key": "x",
                "expiration": None,
                "serializer": {"type": "pickle", "picklelib": "cloudpickle"},
                "prefect_version": "3",
                "storage_block_id": None,
            },
            "result": payload,
        }
    ).encode()
