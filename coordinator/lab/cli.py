"""Command line: ``python -m coordinator <command>`` (also installed as ``reseed-coordinator``).

Each command lives in its own module, which declares its flags in ``register`` and sets the
``run`` default that :func:`main` calls. Every command fails the same way: a setup failure
(a server unreachable, a binary missing, a bad URL) is one line on stderr naming what failed
and how to fix it, exit status 2; ``--debug`` adds the traceback. SIGTERM stops a command as
Ctrl-C does, so the same cleanup runs (servers stopped, temp dirs removed).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from types import FrameType

from . import chaos, doctor, proxy, race, serve
from .bench import command as bench
from .cliargs import CommandError, HelpFormatter
from .embedded import EmbeddedServerError

CONSOLE_SCRIPT = "reseed-coordinator"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds as it does on Ctrl-C."""


def _program() -> str:
    invoked = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return CONSOLE_SCRIPT if invoked == CONSOLE_SCRIPT else "python -m coordinator"


def _version() -> str:
    try:
        return metadata.version("reseed-coordinator")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_program(),
        description="reseed-coordinator: rebuild a Redis counter from its database once, "
        "fleet-wide.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (race, doctor, chaos, bench, proxy, serve):
        command.register(commands)
    for subparser in commands.choices.values():
        subparser.formatter_class = HelpFormatter
        subparser.add_argument(
            "--debug", action="store_true", help="show the traceback of a setup failure"
        )
    return parser


def _terminate(signum: int, frame: FrameType | None) -> None:
    # A second SIGTERM must not cut the cleanup the first one started short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may handle signals (main() called from a worker)
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _sigterm_as_interrupt():
            code: int = args.run(args)
    except (CommandError, EmbeddedServerError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"{args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    return code
