"""Command line: ``python -m coordinator <command>``.

Each command has a ``_<command>_parser`` that declares its flags here and a module that
holds its logic; the parser's ``run`` default is what :func:`main` calls.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from . import race


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _race_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "race",
        help="race P processes on one cold counter and compare rebuild strategies",
        description=(
            "Race P OS processes (C concurrent callers each), released together by a barrier, "
            "onto one cold counter whose value is a PostgreSQL row. Servers not given by URL "
            "are started embedded (counter store, 3 lock masters, PostgreSQL) and stopped "
            "at the end."
        ),
    )
    parser.add_argument("--pods", type=_positive_int, default=8, help="processes (default 8)")
    parser.add_argument(
        "--callers", type=_positive_int, default=16, help="concurrent callers per pod (default 16)"
    )
    parser.add_argument(
        "--strategy",
        choices=[*race.STRATEGIES, "all"],
        default="all",
        help=(
            "coordinated: ReseedCoordinator; per-process: LiteLLM 1.84.10 (SET NX, "
            "per-process lock); naive: LiteLLM 1.83.14 (INCRBYFLOAT); all: the three in turn "
            "(default)"
        ),
    )
    parser.add_argument(
        "--db-delay-ms",
        type=_non_negative,
        default=50.0,
        help="pg_sleep added to every DB read (default 50)",
    )
    parser.add_argument(
        "--db-value", type=_non_negative, default=100.0, help="the row's spend (default 100)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print JSON (a list of objects with --strategy all)"
    )
    parser.add_argument("--redis-url", help="counter store (default: an embedded redis-server)")
    parser.add_argument(
        "--lock-url",
        action="append",
        default=[],
        metavar="URL",
        help="a Redlock master; repeat for each (default: 3 embedded redis-servers)",
    )
    parser.add_argument("--pg-dsn", help="PostgreSQL DSN (default: an embedded PostgreSQL)")
    parser.set_defaults(run=_race)


def _race(args: argparse.Namespace) -> int:
    strategies: list[race.Strategy] = (
        list(race.STRATEGIES) if args.strategy == "all" else [args.strategy]
    )
    with race.race_servers(args.redis_url, args.lock_url, args.pg_dsn) as servers:
        results = [
            race.run_race(
                strategy,
                servers,
                pods=args.pods,
                callers=args.callers,
                db_delay_ms=args.db_delay_ms,
                db_value=args.db_value,
            )
            for strategy in strategies
        ]
    if args.json:
        documents = [result.as_dict() for result in results]
        # pottery replaces json.dumps' default encoder on import: name the standard one.
        print(
            json.dumps(
                documents if args.strategy == "all" else documents[0],
                indent=2,
                cls=json.JSONEncoder,
            )
        )
    else:
        print(race.format_table(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m coordinator",
        description="reseed-coordinator: rebuild a Redis counter from its database once, "
        "fleet-wide.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _race_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except race.RaceError as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args.command}: interrupted", file=sys.stderr)
        return 130
    return code
