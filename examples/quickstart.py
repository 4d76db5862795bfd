"""Quickstart: one spend counter, rebuilt from PostgreSQL once fleet-wide, then a reset.

python -m coordinator servers    # shell 1: starts the servers, prints export lines
python examples/quickstart.py    # shell 2, after pasting those lines
"""

import asyncio
import os

import asyncpg

from coordinator import ReseedCoordinator
from coordinator.sources import PostgresSource

REDIS_URL = os.environ["RESEED_REDIS_URL"]  # the counter store
LOCK_URLS = os.environ["RESEED_LOCK_URLS"].split(",")  # 3 independent Redlock masters
PG_DSN = os.environ["RESEED_PG_DSN"]  # the source of truth


async def main() -> None:
    db = await asyncpg.connect(PG_DSN)  # your proxy's spend table, with one team in it
    await db.execute(
        "CREATE TABLE IF NOT EXISTS team_spend (team_id text PRIMARY KEY, spend float8 NOT NULL)"
    )
    await db.execute(
        "INSERT INTO team_spend VALUES ('t-42', 12.5) "
        "ON CONFLICT (team_id) DO UPDATE SET spend = 12.5"
    )
    source = await PostgresSource.connect(PG_DSN, "SELECT spend FROM team_spend WHERE team_id = $1")
    async with ReseedCoordinator.from_urls(REDIS_URL, lock_urls=LOCK_URLS, ttl=60.0) as coord:
        key = "litellm:spend:team:t-42"
        await coord.reset(key)  # start cold, as after a TTL expiry (and on every rerun)

        spend = await coord.get(key, source.loader("t-42"))  # missing: one DB read, fleet-wide
        print(f"spend {spend:g}")  # 12.5, the DB row
        spend = await coord.increment(key, 0.0123)  # None if the counter is absent
        print(f"after a request {spend:g}")  # 12.5123 (the DB is yours to write too)

        # A budget reset: the counter is deleted and every rebuild in flight fenced out,
        # but the DB is not touched. Zero the row first, or the next get rebuilds the old
        # spend from it.
        await db.execute("UPDATE team_spend SET spend = 0 WHERE team_id = 't-42'")
        await coord.reset(key)
        spend = await coord.get(key, source.loader("t-42"))
        print(f"after the reset {spend:g}")  # 0, rebuilt from the zeroed row
    await source.aclose()
    await db.close()


asyncio.run(main())
