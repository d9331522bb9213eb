"""Errors that mean "the user gave us something wrong".

The CLI prints these as one line (no traceback) and exits non-zero. Everything else is a bug
and keeps its traceback.
"""


class SepnetError(Exception):
    """Base class of user-facing errors: bad input, bad config, missing files."""


class ConfigError(SepnetError, ValueError):
    """A study config key is unknown, missing or of the wrong type/value."""


class DataError(SepnetError, ValueError):
    """An input file is unreadable or inconsistent. The message names the file and the cause."""


class SubmissionError(SepnetError, RuntimeError):
    """A job cannot be submitted as asked (resources, missing store, ...)."""
