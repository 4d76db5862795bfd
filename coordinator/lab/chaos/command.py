"""``python -m coordinator chaos``."""

from __future__ import annotations

import argparse

from ..cliargs import (
    CommandError,
    add_cluster_flag,
    add_server_flags,
    non_negative,
    positive_int,
    print_json,
)
from ..servers import started_servers
from .checker import format_verdict
from .randomized import Options, run_random
from .table import SCENARIOS, format_rows, run_table
from .workload import SABOTAGES


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
    parser.add_argument("--json", action="store_true", help="print the rows (or report) as JSON")
    random = parser.add_argument_group(
        "random mode",
        "--random: pods run a ledger-mode budget workload while a nemesis combines faults "
        "drawn from --seed (pods paused and killed, lock masters paused, killed and "
        "restarted, the store restarted empty, counters deleted, the store link stalled, "
        "PostgreSQL stopped or locked); then a checker judges the calls, the counters "
        "sampled against the DB, and what the servers hold once every fault is healed. "
        "Exit status 1 if a check fails.",
    )
    random.add_argument("--random", action="store_true", help="random combined faults")
    random.add_argument(
        "--seconds", type=non_negative, default=60.0, help="how long faults run"
    )
    random.add_argument("--seed", type=int, default=1, help="the fault schedule's seed")
    random.add_argument("--pods", type=positive_int, default=4, help="pods")
    random.add_argument(
        "--no-resets",
        dest="resets",
        action="store_false",
        help="never reset spend (otherwise 2%% of requests reset a key's or a user's)",
    )
    random.add_argument(
        "--sabotage",
        choices=SABOTAGES,
        help="a deliberate bug in the pods, to see the checker fail: double-apply (a retry's "
        "cost added twice), broken-fence (seeds skip the fencing-token check; resets and "
        "slow snapshots make stale seeds likely)",
    )
    add_cluster_flag(parser)
    add_server_flags(parser)
    parser.set_defaults(run=_chaos)


def _chaos(args: argparse.Namespace) -> int:
    if args.random:
        return _random(args)
    with started_servers(
        args.redis_url, args.lock_url, args.pg_dsn, cluster=args.cluster
    ) as env:
        rows = run_table(env, args.only)
    if args.json:
        print_json([row.as_dict() for row in rows])
    else:
        print(format_rows(rows))
    return 1 if any(row.status == "FAIL" for row in rows) else 0


def _random(args: argparse.Namespace) -> int:
    if args.only:
        raise CommandError("--only picks rows of the table; --random runs no table")
    if args.cluster:
        raise CommandError("--random restarts the counter store: it needs a single store")
    options = Options(
        seconds=args.seconds,
        seed=args.seed,
        pods=args.pods,
        resets=args.resets,
        sabotage=args.sabotage,
    )
    with started_servers(args.redis_url, args.lock_url, args.pg_dsn) as env:
        verdict = run_random(env, options)
    if args.json:
        print_json(verdict.as_dict())
    else:
        print(format_verdict(verdict))
    return 0 if verdict.passed else 1
