"""The error every command reports as one line: its subclasses carry the exit status.

The CLI catches :class:`QformerError` once, prints ``error: <message>`` and exits with the
error's ``exit_status``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_FAILED = 1
"""A job failed while running."""
EXIT_USAGE = 2
"""A bad spec, bad arguments or missing inputs, reported before any cluster work starts."""


class QformerError(Exception):
    """An error a user can act on, reported in one line.

    Args:
        message: What went wrong and, where it helps, what to do.
        exit_status: Overrides the class's exit status for this error.
    """

    exit_status: int = EXIT_FAILED
    permanent: bool = False
    """Whether doing the same work again fails the same way (bad data, unusable weights, a bad
    spec): training then stops at once instead of restarting its workers from a checkpoint."""

    def __init__(self, message: str = "", *, exit_status: int | None = None):
        super().__init__(message)
        if exit_status is not None:
            self.exit_status = exit_status


class UsageError(QformerError):
    """The command cannot run as asked (a bad spec, argument or input); nothing has started."""

    exit_status = EXIT_USAGE
    permanent = True
