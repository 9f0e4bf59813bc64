"""The error every user mistake becomes: one line naming the field (or flag, or file) and
what is allowed. The CLI prints it as `raypar: error: ...` and exits with code 2."""


class ConfigError(ValueError):
    """A user error in the run configuration: one line, names the field."""
