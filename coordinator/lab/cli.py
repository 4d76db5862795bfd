"""Command line: ``python -m coordinator <command>``.

Each command lives in its own module, which declares its flags in ``register`` and sets the
``run`` default that :func:`main` calls.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import chaos, doctor, proxy, race
from .bench import command as bench
from .cliargs import CommandError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m coordinator",
        description="reseed-coordinator: rebuild a Redis counter from its database once, "
        "fleet-wide.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (race, doctor, chaos, bench, proxy):
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except CommandError as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args.command}: interrupted", file=sys.stderr)
        return 130
    return code
