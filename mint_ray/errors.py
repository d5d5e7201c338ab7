"""User-facing errors: one clear line that names the problem and the fix."""


class MintError(Exception):
    """An error caused by input or configuration, shown to the user as one line.

    The CLI prints ``str(err)`` and exits with code 2; no traceback, since the
    message already says what to change.
    """


class ConfigError(MintError):
    """A recipe or override that does not fit the stage's typed config."""


class StorageError(MintError):
    """A URI that cannot be read or written (missing bucket, bad credentials...)."""
