"""One exception type for user-facing errors: the CLI prints its message, never a traceback."""


class MinichatError(Exception):
    """A problem with the user's input, files or configuration, explained in the message."""


class ConfigError(MinichatError):
    """An unknown or invalid configuration field; the message names the field."""
