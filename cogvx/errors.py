"""Errors a user can act on.

Every failure the user can fix (a bad config, missing weights, a bad data set) is raised as a
:class:`CogvxError` subclass whose message says what is wrong and what to do. The CLI prints
the message without a traceback and exits with the class's exit code.
"""


class CogvxError(Exception):
    """Base of all user-facing errors; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class ConfigError(CogvxError):
    """The configuration (params file or overrides) is invalid."""

    exit_code = 2


class ModelNotAvailableError(CogvxError):
    """Model weights cannot be found locally nor downloaded."""

    exit_code = 3


class CogvxWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it as one line)."""
