"""Typed errors of the public API.

Every error a user can cause by bad input derives from :class:`RLPrunerError`
(itself a ``ValueError``), so the CLI can turn it into one line and exit code 2
while real bugs still surface as tracebacks.
"""


class RLPrunerError(ValueError):
    """Bad input from the user: a wrong name, a value out of range, a bad file."""


class ConfigError(RLPrunerError):
    """A configuration value is out of range, of the wrong kind, or contradicts another."""


class ModelError(RLPrunerError):
    """Unknown model name, a factory that cannot be imported, or a mismatched architecture."""


class DataError(RLPrunerError):
    """Unknown dataset, missing folder, malformed arrays, empty split."""


class PlanError(RLPrunerError):
    """A pruning distribution or filter count that cannot be turned into a valid plan."""


class CheckpointError(RLPrunerError):
    """A checkpoint file that is truncated, corrupted, foreign or unsafe."""


class ResourceError(RLPrunerError):
    """The Ray cluster cannot provide the resources the configuration asks for."""


class StepFailed(Exception):
    """An unexpected error inside a pruning step (not bad input): the run stops with
    one line naming the step and the model; the traceback is in the run's log, and
    the steps finished before it stay resumable."""


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, for one-line errors and records of what was skipped."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
