"""reseed-coordinator: rebuild a Redis counter from its database once, fleet-wide."""

from .coordinator import Loader, OnTimeout, ReseedCoordinator
from .errors import (
    ConfigurationError,
    CoordinatorClosedError,
    CorruptCounterError,
    InvalidKeyError,
    InvalidValueError,
    LoaderError,
    MissingRowError,
    ReseedError,
    ReseedTimeoutError,
    SourceError,
    StoreError,
    WrongTypeError,
)
from .stats import Stats

__all__ = [
    "ConfigurationError",
    "CoordinatorClosedError",
    "CorruptCounterError",
    "InvalidKeyError",
    "InvalidValueError",
    "Loader",
    "LoaderError",
    "MissingRowError",
    "OnTimeout",
    "ReseedCoordinator",
    "ReseedError",
    "ReseedTimeoutError",
    "SourceError",
    "Stats",
    "StoreError",
    "WrongTypeError",
]
