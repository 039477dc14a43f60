"""User-facing errors: one clear line, no traceback (the CLI prints `error: <message>` and exits 2)."""


class MotifVideoError(Exception):
    """A problem with the user's input, config or files, explained in one line."""


class CheckpointError(MotifVideoError):
    """A checkpoint is missing, corrupt, or does not match its config."""


class ConfigError(MotifVideoError):
    """A config value or preset name is invalid."""


class GenerationInterrupted(Exception):
    """Generation was stopped between two steps (a step callback returned True, or the interrupt event was set).
    `step`: how many steps had completed. Not a user error: the CLI exits 130 and writes no file."""

    def __init__(self, step: int):
        super().__init__(f"generation interrupted after step {step}")
        self.step = step


class MotifVideoWarning(UserWarning):
    """Something the user should know that does not stop the work (a prompt cut to the encoder's length, a dtype
    that runs slowly on this device). The CLI prints it as one `warning: ...` line."""


def warn(message: str) -> None:
    import warnings

    warnings.warn(message, MotifVideoWarning, stacklevel=2)
