"""Errors a user can act on. Each message names the problem and the fix; the CLI prints it on one line."""


class PtqflowError(Exception):
    """Base class for problems with the user's input, data or model (not bugs)."""


class InvalidDataset(PtqflowError):
    pass


class InvalidModel(PtqflowError):
    pass


class ConversionFailed(PtqflowError):
    pass


class AccuracyGateFailed(PtqflowError):
    """The quantized model lost more accuracy than allowed; ``summary`` holds the run's results."""

    def __init__(self, message: str, summary: object | None = None) -> None:
        super().__init__(message)
        self.summary = summary


class StageTimedOut(RuntimeError):
    """A stage ran past its time limit (a hung or runaway stage); never retried."""
