"""``python -m coordinator bench``: the coordinator against its peers, as numbers and a plot.

Sections, all in one run so that their ratios share the machine's load:

* **cold stampede**: P pods x C callers on one cold counter, every strategy of the race
  plus ``coordinated-nowake`` (no seed wake-up), alternating (the order rotated every
  repetition), at several DB delays: DB reads per cold miss, final counter / DB value, and
  cold-read latency of the winner pod's callers and of everyone else (the losers);
* **hot path**: ``get`` on a present counter against a raw ``GET`` on the same client;
* **lock cost**: lease acquire+release on 1 and 3 masters, and with 1 of 3 down.

Writes ``bench-<mode>-<UTC time>.json`` (one per run), ``bench[-quick].txt`` (the table)
and ``bench[-quick].png`` (the plot, if matplotlib is installed) under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg

from ..cliargs import (
    CommandError,
    add_cluster_flag,
    add_server_flags,
    list_flag,
    non_negative,
    positive_int,
    print_json,
)
from ..embedded import RedisBinary, RedisServer
from ..pods import FAIL_FAST, Timeouts
from ..race import PodReport, add_timeout_flags, percentile, timeouts_given
from ..servers import Servers, async_store_client, started_servers
from .micro import MicroPlan, alternating, hot_path, lock_cost
from .pool import PodPool, Round, Variant
from .recovery import FULL_RECOVERY, QUICK_RECOVERY, RecoveryPlan, mass_recovery, plot_recovery
from .report import format_report, plot, seed_wakeup, targets

VARIANTS = (
    Variant("naive", "naive"),
    Variant("per-process", "per-process"),
    Variant("coordinated", "coordinated"),
    Variant("coordinated-nowake", "coordinated", wake_on_seed=False),
)


@dataclass(frozen=True)
class Plan:
    mode: str
    pods: tuple[int, ...]
    db_delays_ms: tuple[float, ...]
    reps: int
    callers: int
    micro: MicroPlan
    recovery: RecoveryPlan


FULL = Plan(
    mode="full",
    pods=(1, 2, 4, 8, 16),
    db_delays_ms=(0.0, 20.0, 200.0),
    reps=16,
    callers=8,
    micro=MicroPlan(blocks=10, hot_calls=2000, concurrencies=(1, 8, 64), lock_ops=200),
    recovery=FULL_RECOVERY,
)
QUICK = Plan(
    mode="quick",
    pods=(2, 8),
    db_delays_ms=(20.0,),
    reps=3,
    callers=8,
    micro=MicroPlan(blocks=4, hot_calls=500, concurrencies=(1, 8, 64), lock_ops=50),
    recovery=QUICK_RECOVERY,
)

Progress = Callable[[str], None]


# -- cold stampede -------------------------------------------------------------------------


# Whose latency is summarised: the winners are the callers of a pod that read the DB (for
# coordinated, the one such pod; for per-process and naive, nearly every pod), the losers
# those of the pods that got the value another pod read.
GROUPS: dict[str, Callable[[PodReport], bool]] = {
    "all": lambda _: True,
    "winners": lambda report: report.loaded,
    "losers": lambda report: not report.loaded,
}


def _latency(reports: Sequence[PodReport], keep: Callable[[PodReport], bool]) -> dict[str, Any]:
    ordered = sorted(ms for report in reports if keep(report) for ms in report.latencies_ms)
    p50, p99 = percentile(ordered, 50), percentile(ordered, 99)
    return {
        "n": len(ordered),
        "p50_ms": None if p50 is None else round(p50, 2),
        "p99_ms": None if p99 is None else round(p99, 2),
    }


def _per_round(rounds: Sequence[Round], keep: Callable[[PodReport], bool]) -> dict[str, Any]:
    summaries = [_latency(done.reports, keep) for done in rounds]
    return {stat: [summary[stat] for summary in summaries] for stat in ("p50_ms", "p99_ms")}


def _mean(values: Sequence[float]) -> float:
    return round(sum(values) / len(values), 3)


def _cell(rounds: Sequence[Round], callers: int) -> dict[str, Any]:
    """The summary of one (strategy, pods, delay) over its repetitions."""
    first = rounds[0]
    reports = [report for done in rounds for report in done.reports]
    reads = [sum(report.db_reads for report in done.reports) for done in rounds]
    # A round whose counter is missing at the end has no ratio: min and max are then None.
    ratios = [
        done.final_counter / done.db_value for done in rounds if done.final_counter is not None
    ]
    complete = len(ratios) == len(rounds)
    errors = Counter(name for report in reports for name in report.errors)
    stats = [report.stats for report in reports if report.stats is not None]
    return {
        "strategy": first.variant,
        "pods": first.pods,
        "callers": callers,
        "db_delay_ms": first.db_delay_ms,
        "rounds": len(rounds),
        "db_reads_per_miss": _mean(reads),
        "db_reads_min": min(reads),
        "db_reads_max": max(reads),
        "final_over_db_min": min(ratios) if complete else None,
        "final_over_db_max": max(ratios) if complete else None,
        "latency": {group: _latency(reports, keep) for group, keep in GROUPS.items()},
        # Each repetition's own percentiles, in order, for ratios paired by repetition.
        "per_round": {group: _per_round(rounds, GROUPS[group]) for group in ("all", "losers")},
        # Load-independent costs of a miss: commands the servers ran (those inside Lua
        # scripts included), and the CPU time of all pods together.
        "store_commands_per_miss": _mean([done.commands["store"] for done in rounds]),
        "lock_commands_per_miss": _mean([done.commands["locks"] for done in rounds]),
        "pods_cpu_ms_per_miss": round(sum(report.cpu_ms for report in reports) / len(rounds), 2),
        "errors": sum(errors.values()),
        "error_types": dict(errors),
        "start_lag_ms_max": round(max(report.start_lag_ms for report in reports), 2),
        "stats": {name: sum(counts[name] for counts in stats) for name in stats[0]}
        if stats
        else None,
    }


def cold_stampede(
    servers: Servers, plan: Plan, progress: Progress, timeouts: Timeouts
) -> list[dict[str, Any]]:
    names = [variant.name for variant in VARIANTS]
    cells = []
    pool = PodPool(servers, VARIANTS, size=max(plan.pods), callers=plan.callers, timeouts=timeouts)
    with pool:
        for delay in plan.db_delays_ms:
            for pods in plan.pods:
                rounds: dict[str, list[Round]] = {name: [] for name in names}
                for order in alternating(plan.reps, names):
                    for name in order:
                        rounds[name].append(pool.race(name, pods, delay))
                cells += [_cell(rounds[name], plan.callers) for name in names]
                progress(f"cold stampede: {pods} pods, DB delay {delay:g} ms done")
    return cells


# -- environment ---------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


async def _server_versions(servers: Servers) -> dict[str, str]:
    client = async_store_client(servers.redis_url, socket_timeout=5.0)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    conn = await asyncpg.connect(servers.pg_dsn, timeout=10.0)
    try:
        pg = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return {"redis-server": str(info["redis_version"]), "postgresql": str(pg)}


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            models = (line.split(":", 1)[1] for line in cpuinfo if line.startswith("model name"))
            return next(models, "").strip() or None
    except OSError:
        return None


def _load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


# -- the run -------------------------------------------------------------------------------


def run_bench(
    plan: Plan,
    servers: Servers,
    victim: RedisServer | None,
    progress: Progress,
    redis_binary: RedisBinary | None = None,
    store: RedisServer | None = None,
    timeouts: Timeouts = FAIL_FAST,
) -> dict[str, Any]:
    """Every section in turn; the JSON document of the run."""
    started = time.time()
    load_before = _load()
    versions = {
        "python": platform.python_version(),
        "reseed-coordinator": _version("reseed-coordinator"),
        "redis-py": _version("redis"),
        "pottery": _version("pottery"),
        "tenacity": _version("tenacity"),
        "asyncpg": _version("asyncpg"),
        **asyncio.run(_server_versions(servers)),
    }
    cells = cold_stampede(servers, plan, progress, timeouts)
    hot = asyncio.run(hot_path(servers, plan.micro, timeouts))
    progress("hot path done")
    # It restarts the counter store (if embedded, else it is skipped).
    recovery = mass_recovery(servers, store, plan.recovery, progress)
    # Last: it kills (and restarts) a lock master.
    lock = asyncio.run(lock_cost(servers.lock_urls, victim, plan.micro, timeouts))
    progress("lock cost done")
    return {
        "bench": "reseed-coordinator",
        "mode": plan.mode,
        "started_at": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "duration_s": round(time.time() - started, 1),
        "plan": asdict(plan),
        "timeouts": timeouts.options(),
        "versions": versions,
        "machine": {
            "cores": os.cpu_count(),
            "cpu": _cpu_model(),
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_after": _load(),
        },
        "servers": {
            "embedded_lock_masters": victim is not None,
            "redis_server_binary": None if redis_binary is None else redis_binary.as_dict(),
        },
        "cold_stampede": cells,
        "seed_wakeup": seed_wakeup(cells, plan.pods, plan.db_delays_ms),
        "hot_path": hot,
        "lock_cost": lock,
        "mass_recovery": recovery,
        "targets": targets(cells, plan.pods, plan.db_delays_ms, hot),
    }


def write_outputs(document: dict[str, Any], out: Path) -> dict[str, str]:
    """The JSON of the run, the table and the plot under ``out``; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = document["started_at"].replace(":", "").replace("-", "").replace("+0000", "Z")
    suffix = "" if document["mode"] == "full" else f"-{document['mode']}"
    paths = {
        "json": out / f"bench-{document['mode']}-{stamp}.json",
        "table": out / f"bench{suffix}.txt",
        "plot": out / f"bench{suffix}.png",
        "recovery_plot": out / f"bench-recovery{suffix}.png",
    }
    files = {"json": str(paths["json"]), "table": str(paths["table"])}
    for name, skipped in (
        ("plot", plot(document, paths["plot"])),
        ("recovery_plot", plot_recovery(document["mass_recovery"], paths["recovery_plot"])),
    ):
        if skipped is None:
            files[name] = str(paths[name])
        else:
            document["notes"] = [*document.get("notes", []), skipped]
    document["files"] = files
    paths["table"].write_text(format_report(document) + "\n")
    # pottery replaces json.dumps' default encoder on import: name the standard one.
    paths["json"].write_text(json.dumps(document, indent=2, cls=json.JSONEncoder) + "\n")
    return files


# -- command line --------------------------------------------------------------------------


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "bench",
        help="benchmark the strategies (cold stampede, hot path, lock cost)",
        description=(
            "Benchmark the coordinator against the per-process and naive rebuilds: a cold "
            "stampede of P pods x C callers at several DB delays, the hot path against a raw "
            "GET, and the lease cost. Servers not given by URL are started embedded."
        ),
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 2 and 8 pods, 20 ms, 3 reps"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON document")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("docs/bench"),
        help="directory for the JSON, table and plot",
    )
    list_flag(
        parser,
        "--pods",
        positive_int,
        metavar="N",
        help="pod counts (default: the mode's, 1,2,4,8,16 or --quick's 2,8)",
    )
    list_flag(
        parser,
        "--db-delay-ms",
        non_negative,
        metavar="MS",
        help="DB delays (default: the mode's, 0,20,200 or --quick's 20)",
    )
    parser.add_argument(
        "--reps", type=positive_int, help="repetitions per cell (default: 16, --quick 3)"
    )
    parser.add_argument("--callers", type=positive_int, help="callers per pod (default: 8)")
    add_cluster_flag(parser)
    add_timeout_flags(parser)
    add_server_flags(parser)
    parser.set_defaults(run=_bench)


def _plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    delays = args.db_delay_ms
    return replace(
        plan,
        pods=tuple(sorted(set(args.pods))) if args.pods else plan.pods,
        db_delays_ms=tuple(sorted(set(delays))) if delays else plan.db_delays_ms,
        reps=args.reps or plan.reps,
        callers=args.callers or plan.callers,
    )


def _bench(args: argparse.Namespace) -> int:
    plan = _plan(args)

    def progress(line: str) -> None:
        print(f"bench: {line}", file=sys.stderr, flush=True)

    with started_servers(
        args.redis_url, args.lock_url, args.pg_dsn, cluster=args.cluster
    ) as deployment:
        masters = deployment.masters
        victim = masters[-1] if len(masters) == 3 else None
        document = run_bench(
            plan,
            deployment.servers,
            victim,
            progress,
            deployment.redis_binary,
            deployment.store,
            timeouts_given(args),
        )
    try:
        files = write_outputs(document, args.out)
    except OSError as exc:
        raise CommandError(f"cannot write the results under {args.out}: {exc}") from exc
    if args.json:
        print_json(document)
    else:
        print(format_report(document))
    progress(f"wrote {', '.join(files.values())}")
    return 0
