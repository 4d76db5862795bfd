"""What every command of ``python -m coordinator`` shares: argument types, the server
flags, the error a command raises when it cannot run, and JSON output."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any


class CommandError(RuntimeError):
    """A command could not run (a server unreachable, bad setup); exit status 2."""


def describe(exc: BaseException) -> str:
    """An error for a message: its class, and what it says if anything."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """--redis-url, --lock-url (repeatable) and --pg-dsn; embedded servers when absent."""
    parser.add_argument("--redis-url", help="counter store (default: an embedded redis-server)")
    parser.add_argument(
        "--lock-url",
        action="append",
        default=[],
        metavar="URL",
        help="a Redlock master; repeat for each (default: 3 embedded redis-servers)",
    )
    parser.add_argument("--pg-dsn", help="PostgreSQL DSN (default: an embedded PostgreSQL)")


def print_json(document: Any) -> None:
    # pottery replaces json.dumps' default encoder on import: name the standard one.
    print(json.dumps(document, indent=2, cls=json.JSONEncoder))
