"""The doctor on a real counter store and a real PostgreSQL: one counter of every kind, the
report checked row by row, through the Python API, the command line and ``--fix``."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis, RedisCluster

from coordinator import ReseedCoordinator
from coordinator.budget import EntityId, spend_key
from coordinator.budget.doctor import FIXABLE, Doctor, Report, classify, parse_key
from coordinator.budget.spend_source import OutboxLag, schema_sql
from coordinator.lab import cli
from coordinator.lab.embedded import EmbeddedServers

ROOT = Path(__file__).resolve().parent.parent
NS = "litellm"

Entity = tuple[str, EntityId]

# (scope, id) -> the DB value, in the shipped schema.
ROWS: dict[Entity, float] = {
    ("key", "healthy"): 100.0,
    ("key", "drift"): 100.0,
    ("key", "zero"): 0.0,
    ("key", "inflated"): 100.0,
    ("team_member", ("t1", "u:1")): 15.0,
    ("end_user", "a b/c"): 3.0,
    ("team", "low"): 40.0,
    ("team", "nottl"): 40.0,
    ("user", "garbage"): 7.0,
    ("user", "hash"): 9.0,
}


@dataclass(frozen=True)
class Seeded:
    stored: str | None  # None: a hash at the key
    expires: bool
    status: str


COUNTERS: dict[Entity, Seeded] = {
    ("key", "healthy"): Seeded("100", True, "healthy"),
    ("key", "drift"): Seeded("100.5", True, "healthy"),  # within the tolerance, no multiple
    ("key", "zero"): Seeded("0", True, "healthy"),
    ("key", "inflated"): Seeded("800", True, "inflated"),  # 8 pods each added the DB value
    ("team_member", ("t1", "u:1")): Seeded("30.0", True, "inflated"),
    ("end_user", "a b/c"): Seeded("3", True, "healthy"),  # the id is decoded for the query
    ("team", "low"): Seeded("0.25", True, "low"),  # an increment created it; the seed lost
    ("team", "nottl"): Seeded("40", False, "no_ttl"),
    ("user", "garbage"): Seeded("abc", True, "garbage"),
    ("user", "hash"): Seeded(None, True, "garbage"),
    ("user", "orphan"): Seeded("5", True, "missing_row"),
}
STATUS = {spend_key(*entity): seeded.status for entity, seeded in COUNTERS.items()}
FLAGGED = {key: status for key, status in STATUS.items() if status != "healthy"}
TO_FIX = [entity for entity in COUNTERS if STATUS[spend_key(*entity)] in FIXABLE]


@dataclass(frozen=True)
class Deployment:
    redis_url: str
    dsn: str  # search_path set to a fresh schema holding the shipped tables

    def cli_args(self, *extra: str) -> list[str]:
        return ["doctor", "--redis-url", self.redis_url, "--pg-dsn", self.dsn, *extra]


@contextlib.asynccontextmanager
async def shipped_schema(servers: EmbeddedServers) -> AsyncIterator[str]:
    """A DSN whose search_path is a fresh PostgreSQL schema with the shipped tables."""
    assert servers.postgres is not None
    schema = f"doctor_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(servers.postgres.dsn)
    await admin.execute(f"CREATE SCHEMA {schema}")
    dsn = f"{servers.postgres.dsn}?search_path={schema}"
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(schema_sql())
        finally:
            await conn.close()
        yield dsn
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


@pytest.fixture
async def deployment(servers: EmbeddedServers, store: Redis) -> AsyncIterator[Deployment]:
    async with shipped_schema(servers) as dsn:
        await insert_rows(dsn)
        await seed_counters(store)
        yield Deployment(servers.redis[0].url, dsn)


async def insert_rows(dsn: str) -> None:
    """The DB values of :data:`ROWS`."""
    conn = await asyncpg.connect(dsn)
    try:
        for (scope, ident), value in ROWS.items():
            if isinstance(ident, tuple):
                await conn.execute("INSERT INTO team_member VALUES ($1, $2, $3)", *ident, value)
            else:
                await conn.execute(
                    "INSERT INTO budget_entity VALUES ($1, $2, $3)", scope, ident, value
                )
    finally:
        await conn.close()


async def seed_counters(store: Redis | RedisCluster) -> None:
    for entity, seeded in COUNTERS.items():
        key = spend_key(*entity)
        if seeded.stored is None:
            await store.hset(key, mapping={"spend": "9"})
        else:
            await store.set(key, seeded.stored)
        if seeded.expires:
            await store.expire(key, 600)
    # Never reported: the coordinator's own aux key, keys that are no spend counter, another
    # namespace.
    await store.hset(spend_key("key", "healthy") + "\x1ffence", mapping={"t": "1", "g": "1"})
    await store.set(f"{NS}:spend:noscope", "1")
    await store.set(f"{NS}:spend:nosuchscope:x", "1")
    await store.set(spend_key("key", "inflated", namespace="other"), "800")


async def scan(deployment: Deployment, store: Redis, **options: Any) -> Report:
    conn = await asyncpg.connect(deployment.dsn)
    try:
        return await Doctor(store, conn, namespace=NS, **options).scan(include_healthy=True)
    finally:
        await conn.close()


async def test_report_row_by_row(deployment: Deployment, store: Redis) -> None:
    report = await scan(deployment, store, batch=3)
    rows = {finding.key: finding for finding in report.findings}
    assert {key: finding.status for key, finding in rows.items()} == STATUS
    inflated = rows[spend_key("key", "inflated")]
    assert (inflated.counter, inflated.db, inflated.ratio) == (800.0, 100.0, 8.0)
    member = rows[spend_key("team_member", ("t1", "u:1"))]
    assert (member.scope, member.id, member.ratio) == ("team_member", ("t1", "u:1"), 2.0)
    assert rows[spend_key("end_user", "a b/c")].db == 3.0
    low = rows[spend_key("team", "low")]
    assert (low.counter, low.db) == (0.25, 40.0)
    assert rows[spend_key("team", "nottl")].ttl is None
    assert 0 < (rows[spend_key("key", "healthy")].ttl or 0) <= 600
    garbage = rows[spend_key("user", "garbage")], rows[spend_key("user", "hash")]
    assert [(f.raw, f.db) for f in garbage] == [("abc", 7.0), ("<hash>", 9.0)]
    assert rows[spend_key("user", "orphan")].db is None
    assert {f.key for f in report.findings if f.fixable} == {spend_key(*e) for e in TO_FIX}
    assert report.summary() == {
        "scanned": 11,
        "inflated": 2,
        "low": 1,
        "no_ttl": 1,
        "garbage": 2,
        "missing_row": 1,
        "healthy": 4,
        "skipped": 2,  # litellm:spend:noscope, litellm:spend:nosuchscope:x
        "fixed": 0,
        "fix_failed": 0,
    }
    assert report.outbox == OutboxLag(0, None)
    assert report.summary_line().endswith("; outbox: 0 unapplied")


async def test_given_queries_check_only_their_scopes(
    deployment: Deployment, store: Redis
) -> None:
    conn = await asyncpg.connect(deployment.dsn)
    try:
        # A schema of one's own, where the 8x counter is right: the query given is the one used.
        await conn.execute("CREATE TABLE my_keys (token text, spend numeric)")
        await conn.executemany(
            "INSERT INTO my_keys VALUES ($1, $2)",
            [("healthy", 100), ("drift", 100), ("zero", 0), ("inflated", 800)],
        )
    finally:
        await conn.close()
    query = "SELECT token, spend FROM my_keys WHERE token = ANY($1)"
    report = await scan(deployment, store, queries={"key": query})
    keys = [spend_key(*entity) for entity in COUNTERS if entity[0] == "key"]
    assert {f.key: f.status for f in report.findings} == dict.fromkeys(keys, "healthy")
    assert report.counts["skipped"] == 2 + len(COUNTERS) - len(keys)


async def test_command_line_json(deployment: Deployment) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "coordinator",
        *deployment.cli_args("--json", "--batch", "2"),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1, err.decode()
    assert err == b""  # no progress line when stderr is not a terminal
    document = json.loads(out)
    assert {row["key"]: row["status"] for row in document["counters"]} == FLAGGED
    assert document["summary"]["scanned"] == len(COUNTERS)
    assert document["summary"]["healthy"] == len(COUNTERS) - len(FLAGGED)
    assert document["outbox"] == {"count": 0, "oldest_age": None}


async def test_fix_rebuilds_every_flagged_counter_from_the_db(
    deployment: Deployment, store: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await asyncio.to_thread(
        cli.main, deployment.cli_args("--fix", "--yes", "--ttl", "30", "--json")
    )
    assert code == 1  # the counter without a DB row stays flagged
    fixes = {row["key"]: row["fixed"] for row in json.loads(capsys.readouterr().out)["counters"]}
    for entity in TO_FIX:
        key = spend_key(*entity)
        assert fixes[key] == ROWS[entity]
        assert float(await store.get(key) or "nan") == ROWS[entity]
        assert 0 < await store.ttl(key) <= 30
    assert await store.get(spend_key("user", "orphan")) == b"5"
    assert await store.get(spend_key("key", "drift")) == b"100.5"  # healthy: left alone
    after = await scan(deployment, store)
    assert [(f.key, f.status) for f in after.findings if f.status != "healthy"] == [
        (spend_key("user", "orphan"), "missing_row")
    ]


async def test_outbox_lag_is_reported_and_fix_marks_its_rows_counted(
    deployment: Deployment, store: Redis
) -> None:
    # A pod committed two costs of team "low" (DB 40 includes them) and died before
    # applying them; the older is 30 s old.
    conn = await asyncpg.connect(deployment.dsn)
    try:
        await conn.execute(
            "INSERT INTO spend_outbox (entity, request_id, cost, created_at) VALUES "
            "('team:low', 'r1', 1.5, now() - interval '30 seconds'), ('team:low', 'r2', 2.5, now())"
        )
        doctor = Doctor(store, conn, namespace=NS)
        report = await doctor.scan()
        assert report.outbox is not None
        assert report.outbox.count == 2
        assert (report.outbox.oldest_age or 0) >= 30
        assert ", oldest 3" in report.summary_line()
        async with ReseedCoordinator.from_urls(deployment.redis_url) as coordinator:
            await doctor.fix(
                [f for f in report.findings if f.key == spend_key("team", "low")], coordinator
            )
            key = spend_key("team", "low")
            assert await store.get(key) == b"40.0"
            # The seed counted r1 and r2 (the DB has them): their late applies add nothing.
            for request_id in ("r1", "r2"):
                late = await coordinator.apply_once(key, 1.0, request_id, window=600.0)
                assert late.result == "duplicate"
            assert await store.get(key) == b"40.0"
    finally:
        await conn.close()


async def test_fix_without_yes_refuses_when_stdin_is_not_a_terminal(
    deployment: Deployment,
    store: Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    assert await asyncio.to_thread(cli.main, deployment.cli_args("--fix")) == 2
    assert "--yes" in capsys.readouterr().err
    assert await store.get(spend_key("key", "inflated")) == b"800"


async def test_scan_batches_db_lookups(servers: EmbeddedServers, store: Redis) -> None:
    """One pipelined read and one DB query per batch, however many counters."""
    count, batch = 5000, 1000
    async with shipped_schema(servers) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.copy_records_to_table(
                "budget_entity",
                columns=["scope", "entity_id", "spend"],
                records=[("key", str(i), float(i)) for i in range(count)],
            )
            pipe = store.pipeline(transaction=False)
            for i in range(count):
                pipe.set(spend_key("key", str(i)), str(i * (3 if i % 100 == 7 else 1)), ex=600)
            await pipe.execute()
            db = CountingDB(conn)
            report = await Doctor(store, db, namespace=NS, batch=batch).scan()
        finally:
            await conn.close()
    assert db.queries == math.ceil(count / batch)
    assert report.summary()["scanned"] == count
    assert sorted(f.key for f in report.findings) == sorted(
        spend_key("key", str(i)) for i in range(count) if i % 100 == 7
    )
    assert {f.status for f in report.findings} == {"inflated"}


class CountingDB:
    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.queries = 0

    async def fetch(self, sql: str, *args: Any) -> Any:
        self.queries += 1
        return await self.conn.fetch(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)  # the outbox lag, once per scan


@pytest.mark.parametrize(
    ("value", "db", "ttl", "status"),
    [
        (None, 5.0, 60.0, "garbage"),
        (None, None, 60.0, "garbage"),
        (5.0, None, 60.0, "missing_row"),
        (300.0, 100.0, 60.0, "inflated"),
        (200.5, 100.0, None, "inflated"),  # a multiple within the 1% tolerance
        (150.0, 100.0, 60.0, "healthy"),  # above but no multiple: a lagging source
        (100.0, 100.0, None, "no_ttl"),
        (99.5, 100.0, 60.0, "healthy"),
        (98.0, 100.0, 60.0, "low"),
        (5.0, 0.0, 60.0, "healthy"),  # no multiple of zero
        (5.0, 1e-320, 60.0, "healthy"),  # a ratio beyond floats is no multiple either
        (-1.0, 0.0, 60.0, "low"),
        (0.1 + 0.2 - 0.3, 0.0, 60.0, "healthy"),  # float noise is not lost spend
    ],
)
def test_classify(value: float | None, db: float | None, ttl: float | None, status: str) -> None:
    assert classify(value, db, ttl, 0.01) == status


@pytest.mark.parametrize(
    ("key", "parsed"),
    [
        ("litellm:spend:key:sk-1", ("key", "sk-1")),
        ("litellm:spend:team_member:t1:u%3A1", ("team_member", ("t1", "u:1"))),
        ("litellm:spend:end_user:a%20b", ("end_user", "a b")),
        ("litellm:spend:noscope", None),
        ("litellm:spend:nosuchscope:x", None),
        ("litellm:spend:key:", None),
        ("litellm:spend:key:a%3a", None),  # not the canonical encoding: no key of ours
        ("other:spend:key:x", None),
        ("x:litellm:spend:key:x", None),  # namespace x:litellm
    ],
)
def test_parse_key(key: str, parsed: tuple[str, EntityId] | None) -> None:
    assert parse_key("litellm", key) == parsed
