"""Properties about OS processes: pods in separate processes (spawned), each with its own
coordinator and clients, racing on one counter whose value is a real PostgreSQL row.

The pods run on the lab's harness (``coordinator.lab.pods``) with the workload of ``pods``;
the parent drives them through barriers and events (every wait bounded) and checks what
they report against the row and the stored counter.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
from patience import PATIENT
from pods import GATE_TIMEOUT, TABLE, Links, PodSpec, run
from redis import Redis

from coordinator.lab.embedded import EmbeddedServers
from coordinator.lab.pods import Barrier, Event, Fleet, Pod

Report = dict[str, Any]


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    pods = Fleet()
    try:
        yield pods
    finally:
        pods.close(grace=0.0)  # whatever is still alive has no more to say


def spawn(fleet: Fleet, spec: PodSpec, links: Links) -> Pod:
    return fleet.spawn(run, spec, links, name=spec.name)


def collect(fleet: Fleet, pods: Sequence[Pod]) -> list[Report]:
    """The next round report of each of ``pods``; a pod's failure fails the test."""
    return fleet.answers(pods, GATE_TIMEOUT)


class Rows:
    """The source of truth: rows of a real table, one per test."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def put(self, row: str, value: float) -> None:
        asyncio.run(
            self.execute(
                f"INSERT INTO {TABLE} (id, value) VALUES ($1, $2) "
                "ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value",
                row,
                value,
            )
        )

    async def execute(self, sql: str, *args: object) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(sql, *args)
        finally:
            await conn.close()


@pytest.fixture(scope="module")
def rows(servers: EmbeddedServers) -> Rows:
    assert servers.postgres is not None
    source = Rows(servers.postgres.dsn)
    asyncio.run(
        source.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, value numeric NOT NULL)"
        )
    )
    return source


def pod_spec(env: EmbeddedServers, dsn: str, name: str, key: str, **fields: Any) -> PodSpec:
    # No server is faulted while calls are in flight: PATIENT clients, as in conftest.
    fields["options"] = {**PATIENT, **fields.get("options", {})}
    return PodSpec(
        name=name,
        store_url=env.redis[0].url,
        lock_urls=tuple(server.url for server in env.redis[1:4]),
        dsn=dsn,
        key=key,
        row=key,
        **fields,
    )


def counter(env: EmbeddedServers, key: str) -> float | None:
    with Redis.from_url(env.redis[0].url) as client:
        raw = client.get(key)
    return None if raw is None else float(raw)


def lease_holders(env: EmbeddedServers, key: str) -> int:
    """How many lock masters hold a lease on ``key`` (any generation)."""
    pattern = f"redlock:{key}\x1flease\x1f*"
    holders = 0
    for server in env.redis[1:4]:
        with Redis.from_url(server.url) as client:
            holders += bool(client.keys(pattern))
    return holders


def values_of(reports: Sequence[Report]) -> list[float]:
    return [value for report in reports for value in report["values"]]


def errors_of(reports: Sequence[Report]) -> list[str]:
    return [error for report in reports for error in report["errors"]]


def loader_calls(reports: Sequence[Report]) -> int:
    return sum(report["loader_calls"] for report in reports)


def stat(reports: Sequence[Report], name: str) -> int:
    return sum(report["stats"][name] for report in reports)


def fresh_row(rows: Rows, value: float) -> str:
    """A new key whose row holds ``value``."""
    key = f"spend:proc:{uuid.uuid4().hex}"
    rows.put(key, value)
    return key


def hold_mid_load(ready: Barrier, go: Barrier, loading: Event) -> None:
    """Release the pods, let A through ``go``, and wait until A's loader has read the row."""
    ready.wait(GATE_TIMEOUT)
    go.wait(GATE_TIMEOUT)
    assert loading.wait(GATE_TIMEOUT)


def test_pods_racing_a_cold_key_read_the_db_once(
    fleet: Fleet, servers: EmbeddedServers, rows: Rows
) -> None:
    pods, callers, db_value = 6, 8, 100.25
    key = fresh_row(rows, db_value)
    ready, go = fleet.barrier(pods + 1), fleet.barrier(pods + 1)
    members = [
        spawn(
            fleet,
            pod_spec(servers, rows.dsn, f"pod{i}", key, callers=callers, db_delay=0.2),
            Links(ready, (go,)),
        )
        for i in range(pods)
    ]
    ready.wait(GATE_TIMEOUT)
    go.wait(GATE_TIMEOUT)

    reports = collect(fleet, members)
    assert errors_of(reports) == []
    assert values_of(reports) == [db_value] * (pods * callers)
    assert loader_calls(reports) == 1
    assert stat(reports, "seeds_won") == 1
    assert counter(servers, key) == db_value


def test_holder_killed_mid_rebuild_is_overtaken_after_its_lease(
    fleet: Fleet, servers: EmbeddedServers, rows: Rows
) -> None:
    db_value, wait = 42.5, 10.0
    key = fresh_row(rows, db_value)
    options = {"lease": 1.0, "lease_extensions": 0, "wait": wait}
    base = pod_spec(servers, rows.dsn, "A", key, callers=4, options=options)
    ready, go_holder, go_rest = fleet.barrier(4), fleet.barrier(2), fleet.barrier(3)
    loading = fleet.event()
    # A's loader reads the row, says so, then never returns: it dies holding the lease.
    holder = spawn(fleet, base, Links(ready, (go_holder,), loading, fleet.event()))
    rest = [
        spawn(fleet, replace(base, name=name), Links(ready, (go_rest,))) for name in ("B", "C")
    ]
    hold_mid_load(ready, go_holder, loading)
    holder.kill()
    # Checked after the kill, so B and C certainly meet a dead holder's live lease.
    assert lease_holders(servers, key) >= 2
    go_rest.wait(GATE_TIMEOUT)

    reports = collect(fleet, rest)
    assert errors_of(reports) == []
    assert values_of(reports) == [db_value] * 8
    assert loader_calls(reports) == 1  # the one extra DB read, A's being the first
    assert stat(reports, "leases_lost") >= 1
    assert counter(servers, key) == db_value


def test_holder_paused_past_its_lease_is_fenced_out(
    fleet: Fleet, servers: EmbeddedServers, rows: Rows
) -> None:
    # A reads v1 under its lease and is SIGSTOPped before its seed; its lease keeper is
    # frozen with it, so the lease lapses. The row changes to v2. B then wins the lease,
    # takes a newer fencing token and reads v2, and holds there. Now A resumes: the counter
    # is still absent, so the seed script's "present" check passes and only the fence can
    # refuse A's stale v1. Then B seeds v2. (Had B seeded first, A would merely lose the
    # SET NX; had a reset come instead of B, it would test the reset, not the pause.)
    old, new = 10.0, 250.0
    key = fresh_row(rows, old)
    options = {"lease": 1.0, "lease_extensions": 3, "wait": GATE_TIMEOUT}
    base = pod_spec(servers, rows.dsn, "A", key, options=options)
    ready, go_a, go_b = fleet.barrier(3), fleet.barrier(2), fleet.barrier(2)
    a_loading, a_proceed, b_loading, b_proceed = (fleet.event() for _ in range(4))
    pod_a = spawn(fleet, base, Links(ready, (go_a,), a_loading, a_proceed))
    pod_b = spawn(fleet, replace(base, name="B"), Links(ready, (go_b,), b_loading, b_proceed))
    hold_mid_load(ready, go_a, a_loading)
    pod_a.pause()
    try:
        rows.put(key, new)
        go_b.wait(GATE_TIMEOUT)
        assert b_loading.wait(GATE_TIMEOUT)
    finally:
        pod_a.resume()
    # Only now: Event.set blocks until every sleeper on it has woken, and A's could not.
    a_proceed.set()

    (a,) = collect(fleet, [pod_a])
    assert a["pod"] == "A"
    assert a["errors"] == []
    assert a["stats"]["fenced_writes"] == 1
    assert a["stats"]["seeds_won"] == 0
    assert a["values"][0] in (old, new)
    assert counter(servers, key) is None  # A wrote nothing
    b_proceed.set()
    (b,) = collect(fleet, [pod_b])
    assert b["values"] == [new]
    assert b["stats"]["seeds_won"] == 1
    assert loader_calls([a, b]) == 2
    assert counter(servers, key) == new


def test_store_restart_rebuilds_once(
    fleet: Fleet, servers: EmbeddedServers, own_servers: EmbeddedServers, rows: Rows
) -> None:
    pods, callers, first, second = 4, 4, 30.0, 75.5
    key = fresh_row(rows, first)
    ready, round_one, round_two = (fleet.barrier(pods + 1) for _ in range(3))
    members = [
        spawn(
            fleet,
            pod_spec(
                own_servers,
                rows.dsn,
                f"pod{i}",
                key,
                callers=callers,
                ops=("get", "add"),
                db_delay=0.1,
            ),
            Links(ready, (round_one, round_two)),
        )
        for i in range(pods)
    ]
    ready.wait(GATE_TIMEOUT)
    round_one.wait(GATE_TIMEOUT)
    reports = collect(fleet, members)
    assert errors_of(reports) == []
    assert values_of(reports) == [first] * (pods * callers)
    assert loader_calls(reports) == 1

    # The pods keep their (now stale) connections across the restart, as live pods would.
    own_servers.redis[0].restart()
    assert counter(own_servers, key) is None
    rows.put(key, second)  # spend flushed to the DB meanwhile
    round_two.wait(GATE_TIMEOUT)
    reports = collect(fleet, members)
    assert errors_of(reports) == []
    assert loader_calls(reports) == 1
    total = pods * callers
    # Each increment lands once on the one rebuilt counter: no snapshot is added twice.
    assert sorted(values_of(reports)) == [second + n for n in range(1, total + 1)]
    assert counter(own_servers, key) == second + total
