"""Errors a user can fix. The CLI prints their one line and exits with `exit_code`."""


class UserError(Exception):
    """Bad input: printed as one line, exit code 2, no traceback."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config file, key or value that cannot be used; the message names file, key and value.
    A ValueError too, for callers of the Python API (`projected_optimizer`)."""


class CheckpointError(UserError):
    """A checkpoint that is damaged or does not match the run."""


class NonFiniteLossError(Exception):
    """Training stopped on a NaN/inf loss; the last good checkpoint is kept."""

    exit_code = 3


class OutOfMemory(Exception):
    """The device ran out of memory; one line with the planner's breakdown and suggestions. The
    last good checkpoint is kept (nothing is saved after the failure)."""

    exit_code = 4
