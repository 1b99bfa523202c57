"""Errors raised for user mistakes.

Every error a user can cause derives from :class:`LpvitError`; its message names what was wrong and how to
fix it. Anything else escaping ``lpvit.compile`` is a bug in lpvit-compiler.
"""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class LpvitError(ValueError):
    """A problem with the user's model, data or options (message says what and how to fix it)."""


class ConfigError(LpvitError):
    """An option passed to ``lpvit.compile`` is out of range or inconsistent."""


class CaptureError(LpvitError):
    """The model could not be captured as a graph (neither torch.fx nor torch.export)."""


class CalibrationError(LpvitError):
    """The calibration data does not fit the model."""


class ModelFileError(LpvitError):
    """A saved compiled-model file is missing, corrupt or not an lpvit-compiler file."""
