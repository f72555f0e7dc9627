"""The storage layer's base error, apart from ``storage.store`` so that what the store reads credentials from
(``storage.credentials``) can raise it without importing the store."""

from __future__ import annotations


class StoreError(Exception):
    """Base class for artifact store errors; the message says how to fix the problem."""
