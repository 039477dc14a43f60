"""User-facing errors: one clear line, no traceback (the CLI prints `error: <message>` and exits 2)."""


class MotifVideoError(Exception):
    """A problem with the user's input, config or files, explained in one line."""


class CheckpointError(MotifVideoError):
    """A checkpoint is missing, corrupt, or does not match its config."""


class ConfigError(MotifVideoError):
    """A config value or preset name is invalid."""
