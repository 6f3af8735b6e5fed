"""Errors that are the user's to fix (bad config, missing file, malformed data).

They carry a message that names the thing and the fix; the CLI prints it without a traceback.
"""


class UserError(Exception):
    """A problem with the user's input, configuration or environment."""


class ConfigError(UserError):
    """A recipe or config that does not match its schema (unknown key, wrong type, bad value)."""


class DataError(UserError):
    """A sample or file that cannot be used; `sample_id` and `reason` say which and why."""

    def __init__(self, message: str, sample_id: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.sample_id = sample_id
        self.reason = reason or message
