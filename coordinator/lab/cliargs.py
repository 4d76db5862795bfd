"""What every command of ``python -m coordinator`` shares: argument types, the server
flags, the error a command raises when it cannot run, and JSON output."""

from __future__ import annotations

import argparse
import json
import math
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# A password given as a parameter: ``?password=`` in a URL, ``password=`` in a key=value DSN.
_PASSWORD_PARAM = re.compile(r"(password=)[^&\s]*", re.IGNORECASE)


class CommandError(RuntimeError):
    """A command could not run (a server unreachable, bad setup); exit status 2."""


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


def redact(address: str) -> str:
    """A redis URL or PostgreSQL DSN as messages may show it: its password replaced by ``***``
    (operators pass credentials in these flags; errors and reports must not echo them)."""
    address = _PASSWORD_PARAM.sub(r"\1***", address)
    parts = urlsplit(address)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return address
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


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
