"""The one exception type users can cause; the CLI prints it on one line and exits 2."""


class ChainforgetError(Exception):
    """A user-caused error (bad config, bad data row, unknown task, missing file).

    The message names the file/field/value and what is allowed.
    """


class DataError(ChainforgetError):
    """A data file or row does not match its release schema."""


class ConfigError(ChainforgetError):
    """A config value is unknown or out of range."""


class WriteError(ChainforgetError):
    """A result could not be written (disk full, permission denied); nothing half-written is left behind."""
