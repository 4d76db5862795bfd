"""Four processes race one cold spend counter; PostgreSQL is read once, fleet-wide.

Each process is a "pod" with its own ReseedCoordinator and clients. They start together
(a barrier) and each asks for the counter ten times at once. The counter is missing, so
it must be rebuilt from the spend column, which takes 50 ms to read.

    python examples/multiprocess_race.py

Servers (a counter store, three Redlock masters, PostgreSQL) are started embedded and
stopped at the end.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from multiprocessing.synchronize import Barrier
from typing import Any

import asyncpg
from redis.asyncio import Redis

from coordinator import ReseedCoordinator
from coordinator.lab.embedded import EmbeddedServers
from coordinator.sources import PostgresSource

PODS = 4
CALLERS = 10
KEY = "litellm:spend:team:team-a"
QUERY = "SELECT spend FROM team_spend, pg_sleep(0.05) WHERE team_id = $1"


async def pod(store_url: str, lock_urls: list[str], dsn: str, start: Barrier) -> dict[str, Any]:
    db_reads = 0
    async with await PostgresSource.connect(dsn, QUERY) as source:

        async def load_spend() -> float:
            nonlocal db_reads
            db_reads += 1
            return await source.fetch("team-a")

        async with ReseedCoordinator.from_urls(store_url, lock_urls=lock_urls) as coordinator:
            await asyncio.to_thread(start.wait, 60)  # every pod is ready: go
            values = await asyncio.gather(
                *(coordinator.get(KEY, load_spend) for _ in range(CALLERS))
            )
            stats = coordinator.stats
    return {"db_reads": db_reads, "values": sorted(set(values)), "leases_won": stats.leases_won}


def run_pod(store_url: str, lock_urls: list[str], dsn: str, start: Barrier, out: Any) -> None:
    out.put(asyncio.run(pod(store_url, lock_urls, dsn, start)))


async def create_row(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS team_spend (team_id text PRIMARY KEY, spend float8)"
        )
        await conn.execute(
            "INSERT INTO team_spend VALUES ('team-a', 123.45) "
            "ON CONFLICT (team_id) DO UPDATE SET spend = EXCLUDED.spend"
        )
    finally:
        await conn.close()


async def read_counter(url: str) -> bytes | str | None:
    store = Redis.from_url(url, decode_responses=True)
    try:
        return await store.get(KEY)
    finally:
        await store.aclose()


def main() -> None:
    with EmbeddedServers(redis_count=4, postgres=True) as servers:
        assert servers.postgres is not None
        store_url, *lock_urls = servers.redis_urls
        asyncio.run(create_row(servers.postgres.dsn))

        # spawn: each pod is a fresh interpreter with its own event loop and clients.
        context = multiprocessing.get_context("spawn")
        start = context.Barrier(PODS)
        out = context.Queue()
        pods = [
            context.Process(
                target=run_pod, args=(store_url, lock_urls, servers.postgres.dsn, start, out)
            )
            for _ in range(PODS)
        ]
        for process in pods:
            process.start()
        reports = [out.get(timeout=90) for _ in pods]
        for process in pods:
            process.join(timeout=10)

        for number, report in enumerate(reports, 1):
            print(f"pod {number}: {report}")
        print(f"DB reads, all pods: {sum(report['db_reads'] for report in reports)}")
        print(f"final counter: {asyncio.run(read_counter(store_url))!r} (DB value 123.45)")


if __name__ == "__main__":
    main()
