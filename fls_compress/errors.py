"""Error types raised by fls-compress.

Every failure a user can cause (bad file, bad data, bad option, unsupported graph) is raised as a
subclass of :class:`FlsError`. The CLI turns these into a single ``error: ...`` line on stderr and a
non-zero exit code; anything else is a bug and is reported as such.
"""

from __future__ import annotations


class FlsError(Exception):
    """Base class of user-facing errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class InvalidModelError(FlsError):
    """The model file is missing, unreadable, corrupt or fails the ONNX checker."""

    exit_code = 3


class UnsupportedModelError(FlsError):
    """The graph uses operators or structures that cannot be converted or compressed."""

    exit_code = 4


class InvalidDataError(FlsError):
    """Calibration/verification data has the wrong names, shapes or dtypes, or holds NaN/Inf."""

    exit_code = 5


class InvalidOptionError(FlsError):
    """A command-line or API option is out of range or inconsistent with the model."""

    exit_code = 2


class OutputError(FlsError):
    """An output or report cannot be written (permissions, full disk, path is a directory)."""

    exit_code = 7


class Interrupted(BaseException):
    """SIGINT (exit 130) or SIGTERM (exit 143) arrived; partial outputs were removed.

    Deliberately a ``BaseException``, neither an :class:`FlsError` nor an ``Exception`` (so the
    ``except Exception`` blocks that turn library errors into user errors cannot report an interruption
    as a bad model or bad data) nor a ``KeyboardInterrupt`` (which Typer turns into a bare exit code,
    losing the failure report). ``exit_code`` is ``128 + signal number``.
    """

    def __init__(self, signum: int):
        import signal

        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}; no partial outputs were left")
        self.signum = int(signum)
        self.exit_code = 128 + int(signum)


class VerificationError(FlsError):
    """The compressed model failed verification against the original (see the report)."""

    exit_code = 6


def first_line(exc: BaseException) -> str:
    """First non-empty line of an exception's message (checker and runtime messages span many lines),
    or the exception's type name when the message is empty: the text of a one-line ``error:``."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
