"""``python -m coordinator doctor``: the command line of :mod:`coordinator.budget.doctor`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

import asyncpg
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from ..budget.doctor import DEFAULT_BATCH, DEFAULT_TOLERANCE, Doctor, Finding, Report
from ..budget.guard import SCOPES
from ..clients import is_cluster_url, redact
from ..coordinator import ReseedCoordinator
from ..errors import SourceError
from ..integrations.litellm_tables import LITELLM_BATCH_QUERIES
from .cliargs import (
    CommandError,
    describe,
    list_flag,
    non_negative,
    positive_int,
    print_json,
)
from .pods import PATIENT
from .serve import LOCK_URLS, PG_DSN, REDIS_URL
from .servers import async_store_client
from .table import format_table, number


def _scope_query(text: str) -> tuple[str, str]:
    scope, equals, sql = text.partition("=")
    if not (scope and equals and sql.strip()):
        raise argparse.ArgumentTypeError(f"expected SCOPE=SQL, got {text!r}")
    if scope not in SCOPES:
        raise argparse.ArgumentTypeError(f"unknown scope {scope!r}; scopes are {SCOPES}")
    return scope, sql


def _fraction(text: str) -> float:
    value = non_negative(text)
    if value >= 0.5:
        raise argparse.ArgumentTypeError(f"expected a tolerance below 0.5, got {text}")
    return value


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "doctor",
        help="find spend counters that disagree with the database (and --fix them)",
        description=(
            "Scan the counters <namespace>:spend:<scope>:<id> (SCAN, batched), compare each "
            "with its database value and report the inflated (an integer multiple >= 2x), "
            "low, TTL-less, non-numeric ones, and those without a row; then the outbox lag "
            "(spend_outbox rows not yet applied to their counters, and the oldest one's "
            "age). Exit status: 0 nothing flagged (or everything fixed), 1 counters flagged, "
            "2 setup error."
        ),
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get(REDIS_URL) or None,
        help=(
            f"the counter store, redis+cluster://host:port[,host:port...] for a Redis Cluster "
            f"(default: ${REDIS_URL}, as `servers` prints it)"
        ),
    )
    parser.add_argument(
        "--pg-dsn",
        default=os.environ.get(PG_DSN) or None,
        help=f"PostgreSQL DSN of the spend tables (default: ${PG_DSN})",
    )
    parser.add_argument("--namespace", default="litellm", help="counter key prefix")
    parser.add_argument(
        "--query",
        type=_scope_query,
        action="append",
        default=[],
        metavar="SCOPE=SQL",
        help=(
            "the batch query of one scope: $1 is a text[] of ids (team_member: $1 teams, $2 "
            "users), rows are the id column(s) then the value. Repeat for each scope; only "
            "the scopes given are checked. Default: the shipped schema (budget_entity, "
            "team_member), every scope."
        ),
    )
    parser.add_argument(
        "--litellm-schema",
        action="store_true",
        help="read LiteLLM's own spend tables (LiteLLM_VerificationToken, LiteLLM_TeamTable, "
        "...) instead of the shipped schema; --query still replaces a scope's query",
    )
    parser.add_argument(
        "--tolerance",
        type=_fraction,
        default=DEFAULT_TOLERANCE,
        help="relative slack of every comparison",
    )
    parser.add_argument(
        "--batch",
        type=positive_int,
        default=DEFAULT_BATCH,
        help="counters per round trip and per DB query",
    )
    parser.add_argument("--all", action="store_true", help="list healthy counters too")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--fix",
        action="store_true",
        help="rebuild inflated, low, TTL-less and garbage counters that have a row "
        "(fenced reset, then one DB read each)",
    )
    parser.add_argument("--yes", action="store_true", help="fix without asking")
    list_flag(
        parser,
        "--lock-url",
        str,
        default=[url for url in os.environ.get(LOCK_URLS, "").split(",") if url],
        metavar="URL",
        help=f"the deployment's Redlock masters, for --fix (default: ${LOCK_URLS}, else the "
        "counter store alone)",
    )
    parser.add_argument(
        "--ttl",
        type=positive_int,
        default=60,
        help="expiry of the rebuilt counters, seconds (default: 60, LiteLLM's)",
    )
    parser.add_argument(
        "--idempotency-window",
        type=positive_int,
        default=600,
        help="the guards' idempotency_window, seconds: how long --fix's rebuilds mark the "
        "outbox rows they count",
    )
    parser.set_defaults(run=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    for flag, name, value in (
        ("--redis-url", REDIS_URL, args.redis_url),
        ("--pg-dsn", PG_DSN, args.pg_dsn),
    ):
        if not value:
            raise CommandError(
                f"no {flag}: give it, or set {name} (`python -m coordinator servers` prints it)"
            )
    if args.fix and is_cluster_url(args.redis_url) and not args.lock_url:
        raise CommandError(
            f"--fix on a Redis Cluster needs --lock-url (or ${LOCK_URLS}): independent lock "
            "masters, not the cluster's shards"
        )
    if args.fix and not args.yes and not sys.stdin.isatty():
        raise CommandError("--fix needs --yes when stdin is not a terminal (no one to ask)")
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    try:
        store = async_store_client(
            args.redis_url, socket_timeout=10.0, socket_connect_timeout=5.0
        )
    except ValueError as exc:
        raise CommandError(f"invalid --redis-url {args.redis_url!r}: {exc}") from exc
    try:
        try:
            await store.ping()
        except RedisError as exc:
            raise CommandError(
                f"cannot reach the counter store at {redact(args.redis_url)}: {describe(exc)} "
                f"(check --redis-url or ${REDIS_URL})"
            ) from exc
        try:
            db = await asyncpg.connect(args.pg_dsn, timeout=10.0)
        except Exception as exc:
            raise CommandError(
                f"cannot connect to PostgreSQL at {redact(args.pg_dsn)}: {describe(exc)} "
                f"(check --pg-dsn or ${PG_DSN})"
            ) from exc
        try:
            return await _examine_and_fix(args, store, db)
        finally:
            await db.close()
    finally:
        await store.aclose()


async def _examine_and_fix(
    args: argparse.Namespace, store: Redis | RedisCluster, db: Any
) -> int:
    doctor = Doctor(
        store,
        db,
        namespace=args.namespace,
        queries=_queries(args),
        tolerance=args.tolerance,
        batch=args.batch,
        idempotency_window=float(args.idempotency_window),
    )
    meter = _ProgressLine() if sys.stderr.isatty() else None
    try:
        report = await doctor.scan(include_healthy=args.all, progress=meter)
    except SourceError as exc:
        raise CommandError(str(exc)) from exc
    finally:
        if meter is not None:
            meter.finish()
    fixable = [finding for finding in report.findings if finding.fixable]
    if not args.json:
        print(format_report(report))
    if args.fix and fixable and (args.yes or _confirm(len(fixable))):
        # A repair, not a hot path: like the scan's client, patient rather than fail-fast, so
        # that a busy server fails no rebuild.
        async with ReseedCoordinator.from_urls(
            args.redis_url, lock_urls=args.lock_url, ttl=float(args.ttl), **PATIENT.options()
        ) as coordinator:
            await doctor.fix(fixable, coordinator)
        if not args.json:
            print(format_fixes(fixable))
            print(report.summary_line())
    if args.json:
        print_json(report.as_dict())
    unresolved = [f for f in report.flagged if f.fixed is None]
    return 1 if unresolved else 0


def _queries(args: argparse.Namespace) -> dict[str, str] | None:
    if args.litellm_schema:
        return {**LITELLM_BATCH_QUERIES, **dict(args.query)}
    return dict(args.query) if args.query else None


def _confirm(count: int) -> bool:
    sys.stderr.write(
        f"Rebuild {count} counter{'s' if count != 1 else ''} from the database "
        "(fenced reset, then one DB read each)? [y/N] "
    )
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


class _ProgressLine:
    """One self-overwriting line on a terminal's stderr."""

    def __init__(self) -> None:
        self._shown = False

    def __call__(self, scanned: int, flagged: int) -> None:
        sys.stderr.write(f"\rdoctor: scanned {scanned:,} counters, {flagged:,} flagged")
        sys.stderr.flush()
        self._shown = True

    def finish(self) -> None:
        if self._shown:
            sys.stderr.write("\n")


def _note(finding: Finding) -> str:
    if finding.status == "inflated" and finding.ratio is not None:
        return f"{finding.ratio:g}x the DB value"
    if finding.status == "low" and finding.db is not None and finding.counter is not None:
        return f"{number(finding.db - finding.counter)} of spend missing"
    if not finding.fixable and finding.status != "healthy":
        return "no DB row: not fixable"
    return ""


def format_report(report: Report) -> str:
    """The findings as a table, then the summary line."""
    rows = [
        (
            finding.status,
            finding.key,
            number(finding.counter) if finding.raw is None else repr(finding.raw),
            number(finding.db),
            "none" if finding.ttl is None else f"{finding.ttl:.0f}s",
            _note(finding),
        )
        for finding in report.findings
    ]
    header = ("status", "key", "counter", "db", "ttl", "note")
    lines = [format_table(header, rows, rule=False)] if rows else []
    return "\n".join([*lines, report.summary_line()])


def format_fixes(findings: Sequence[Finding]) -> str:
    rows = [
        (
            finding.key,
            number(finding.fixed) if finding.fix_error is None else f"failed: {finding.fix_error}",
        )
        for finding in findings
    ]
    return format_table(("fixed key", "counter now"), rows, rule=False)
