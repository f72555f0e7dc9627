"""The storage layer's errors, apart from ``storage.store`` so that what the store reads credentials from
(``storage.credentials``) can raise them without importing the store; and the base of the errors a user acts on
(``PtqflowError``), here at the bottom layer because storage's readers raise them too (``storage.limits``)."""

from __future__ import annotations

import errno


class PtqflowError(Exception):
    """Base class for problems with the user's input, data or model (not bugs)."""


class InvalidDataset(PtqflowError):
    pass


class InvalidModel(PtqflowError):
    pass


class StoreError(Exception):
    """Base class for artifact store errors; the message says how to fix the problem."""


# Storage that answered, and said no: retrying does not help, and "unreachable" would send the user the wrong way.
STORAGE_REFUSALS = {
    errno.ENOSPC: "the storage is full",
    errno.EDQUOT: "the storage quota is used up",
    errno.EROFS: "the storage is read-only",
    errno.EACCES: "the storage refuses writes (permission denied)",
    errno.EPERM: "the storage refuses the operation (not permitted)",
}


def refused_by_storage(error: BaseException, option: str) -> str | None:
    """One line for an error where the storage refused (full, read-only, no permission), naming the location and
    the ``option`` that chooses it; None for any other error."""
    if not isinstance(error, OSError) or error.errno not in STORAGE_REFUSALS:
        return None
    where = f" at {error.filename}" if error.filename else ""
    return (
        f"{STORAGE_REFUSALS[error.errno]}{where} ({error.strerror}): free space or fix its permissions, or point "
        f"{option} elsewhere"
    )


class ExportRefused(StoreError):
    """The export's storage refused a write (full, read-only, no permission); nothing was published."""
