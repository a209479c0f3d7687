"""Errors a user can cause. The CLI prints them as one line; anything else is a bug."""


class SfumatoError(Exception):
    """A failure the user can act on (exit code 1)."""

    exit_code = 1


class UsageError(SfumatoError):
    """A bad argument, option or value (exit code 2)."""

    exit_code = 2
