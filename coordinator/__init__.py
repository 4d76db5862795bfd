"""reseed-coordinator: rebuild a Redis counter from its database once, fleet-wide."""

from .coordinator import Loader, OnTimeout, ReseedCoordinator
from .errors import (
    ConfigurationError,
    CoordinatorClosedError,
    CorruptCounterError,
    InvalidKeyError,
    InvalidValueError,
    LoaderError,
    ReseedError,
    ReseedTimeoutError,
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
    "OnTimeout",
    "ReseedCoordinator",
    "ReseedError",
    "ReseedTimeoutError",
    "Stats",
    "StoreError",
    "WrongTypeError",
]
