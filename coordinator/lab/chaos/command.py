"""``python -m coordinator chaos``."""

from __future__ import annotations

import argparse

from ..cliargs import add_cluster_flag, add_server_flags, print_json
from ..servers import started_servers
from .table import SCENARIOS, format_rows, run_table


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "chaos",
        help="run the fault table (docs/design.md, Faults) against real servers and pods",
        description=(
            "Inject each fault of the survival table into real redis-server and PostgreSQL "
            "processes while pods (spawned processes, each with its own coordinator) read and "
            "increment counters, and print one row per fault. Servers not given by URL are "
            "started embedded; faults that kill, pause or restart a server run only on "
            "embedded ones. Writes rows to the table reseed_chaos and keys under chaos:*, "
            "and removes them at the end. Exit status 1 if any row fails."
        ),
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(SCENARIOS),
        metavar="FAULT",
        help=f"run only this fault (repeatable): {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    add_cluster_flag(parser)
    add_server_flags(parser)
    parser.set_defaults(run=_chaos)


def _chaos(args: argparse.Namespace) -> int:
    with started_servers(args.redis_url, args.lock_url, args.pg_dsn, cluster=args.cluster) as env:
        rows = run_table(env, args.only)
    if args.json:
        print_json([row.as_dict() for row in rows])
    else:
        print(format_rows(rows))
    return 1 if any(row.status == "FAIL" for row in rows) else 0
