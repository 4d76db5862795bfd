"""The one error hierarchy of the library.

Every failure a caller can see is a :class:`ReseedError`. The subclasses also inherit the
builtin a caller would naturally catch (``ValueError`` for bad input, ``TimeoutError`` for a
missed deadline) so that generic handlers keep working.
"""

from __future__ import annotations


class ReseedError(Exception):
    """Base class of every error raised by reseed-coordinator."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class InvalidKeyError(ReseedError, ValueError):
    """The counter key is not acceptable (wrong type, empty, too long, control characters)."""


class InvalidValueError(ReseedError, ValueError):
    """A value given to the coordinator (a loader's result or an increment) is unusable."""


class CorruptCounterError(ReseedError):
    """The value stored at the counter key is not a finite number: a corrupt counter, not a zero."""


class WrongTypeError(ReseedError):
    """The counter key holds a Redis type other than a string."""


class StoreError(ReseedError):
    """The counter store (Redis) failed; the original redis-py error is ``__cause__``."""


class LoaderError(ReseedError):
    """The loader raised; the original exception is ``__cause__``. Nothing was written."""


class ReseedTimeoutError(ReseedError, TimeoutError):
    """No value could be obtained within the call's deadline."""


class CoordinatorClosedError(ReseedError):
    """The coordinator was used after :meth:`ReseedCoordinator.aclose`."""


class ConfigurationError(ReseedError, ValueError):
    """A coordinator setting is out of range."""


class SourceError(LoaderError):
    """The source of truth (e.g. PostgreSQL) failed or could not be reached."""


class MissingRowError(LoaderError):
    """The source has no row for the counter: a clear result, never a silent zero."""
