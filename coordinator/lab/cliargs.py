"""What every command of ``python -m coordinator`` shares: argument types, list flags, the
help format, the server flags, the error a command raises when it cannot run, and JSON
output."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


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


def positive(text: str) -> float:
    value = non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


class HelpFormatter(argparse.HelpFormatter):
    """Every default written one way, ``(default: X)``: added to each help that has a
    default and does not say it already (a default of None is said in the help itself)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "(default: " in text
            or action.default is True  # a switch that is on unless turned off: its help says so
            or action.default in (None, False, [], argparse.SUPPRESS)
        ):
            return text
        values = action.default if isinstance(action.default, list) else [action.default]
        shown = ",".join(
            f"{value:g}" if isinstance(value, float) else str(value) for value in values
        )
        return f"{text} (default: {shown})"


def list_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    item: Callable[[str], T],
    *,
    default: Sequence[T] | None = None,
    metavar: str,
    help: str,
) -> None:
    """A list-valued flag, the same on every command: give it once with several values
    separated by commas (or spaces), or repeat it; the values add up, in order."""
    head, said, default_text = help.partition(" (default: ")
    parser.add_argument(
        flag,
        type=lambda text: [item(part) for part in text.split(",") if part],
        nargs="+",
        action=_Extend,
        default=list(default) if default is not None else [],
        metavar=metavar,
        help=f"{head}; several: {metavar},{metavar} or repeat the flag{said}{default_text}",
    )


class _Extend(argparse.Action):
    """Flattens ``--flag a,b c --flag d`` into [a, b, c, d], replacing the default."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        given = getattr(namespace, self.dest)
        so_far = [] if given is self.default else list(given)
        setattr(namespace, self.dest, so_far + [value for part in values for value in part])


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """--redis-url, --lock-url (a list) and --pg-dsn; embedded servers when absent."""
    parser.add_argument("--redis-url", help="counter store (default: an embedded redis-server)")
    list_flag(
        parser,
        "--lock-url",
        str,
        metavar="URL",
        help="the Redlock masters (default: 3 embedded redis-servers)",
    )
    parser.add_argument(
        "--pg-dsn",
        help="PostgreSQL DSN (default: $RESEED_PG_DSN if set, else an embedded PostgreSQL)",
    )


def add_cluster_flag(parser: argparse.ArgumentParser) -> None:
    """--cluster: the embedded counter store is a Redis Cluster."""
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="an embedded Redis Cluster (3 masters, 3 replicas) as the counter store",
    )


def print_json(document: Any) -> None:
    # pottery replaces json.dumps' default encoder on import: name the standard one.
    print(json.dumps(document, indent=2, cls=json.JSONEncoder))
