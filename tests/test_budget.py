"""BudgetGuard and PostgresSpendSource on the session's real redis-servers and PostgreSQL.

Each test that races a rebuild against a spend write or a reset gates the rebuild's DB read
with events, so the interleaving is forced, not hoped for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Connection, Redis

from coordinator import (
    CorruptCounterError,
    InvalidKeyError,
    MissingRowError,
    ReseedCoordinator,
    WrongTypeError,
)
from coordinator.budget import (
    MAX_ID_BYTES,
    SCOPES,
    BudgetExceededError,
    BudgetGuard,
    BudgetUnavailableError,
    Entity,
    EntityId,
    OutagePolicy,
    Scope,
    WriteMode,
    parse_spend_key,
    spend_key,
)
from coordinator.budget.spend_source import PostgresSpendSource
from coordinator.errors import ConfigurationError, InvalidValueError
from coordinator.keys import MAX_KEY_BYTES
from coordinator.lab.embedded import EmbeddedServers

CoordFactory = Callable[..., ReseedCoordinator]

# One entity of every scope; team_member is (team, user).
ENTITIES: list[tuple[Scope, EntityId]] = [
    ("key", "sk-hash-1"),
    ("team", "team:1"),
    ("team_member", ("team:1", "user 1")),
    ("user", "user 1"),
    ("org", "org%1"),
    ("end_user", "customer@example.com"),
    ("tag", "prod/eu"),
]


class Gate(PostgresSpendSource):
    """The shipped source, whose rebuild reads (snapshots) can be held after they read."""

    def __init__(self, inner: PostgresSpendSource) -> None:
        super().__init__(inner.pool)
        self.reads = 0
        self.read_done = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    def hold(self) -> None:
        self.release.clear()

    async def snapshot(self, scope: Scope, entity_id: EntityId) -> tuple[float, list[str]]:
        self.reads += 1
        value = await super().snapshot(scope, entity_id)
        self.read_done.set()
        await asyncio.wait_for(self.release.wait(), 10)
        return value


class FetchOnly:
    async def fetch(self, scope: Scope, entity_id: EntityId) -> float:
        return 0.0


class Recorder:
    def __init__(self) -> None:
        self.refusals: list[str] = []
        self.outages: list[str] = []

    def on_refusal(self, scope: str) -> None:
        self.refusals.append(scope)

    def on_outage(self, policy: str) -> None:
        self.outages.append(policy)


async def _seed_rows(source: PostgresSpendSource, spend: float) -> None:
    for scope, entity_id in ENTITIES:
        await source.set_budget(scope, entity_id, 1000.0)
    await source.pool.execute("UPDATE budget_entity SET spend = $1", spend)
    await source.pool.execute("UPDATE team_member SET spend = $1", spend)


async def _counter(store: Redis, key: str) -> float | None:
    raw = await store.get(key)
    return None if raw is None else float(raw)


async def _db_spend(source: PostgresSpendSource, scope: Scope, entity_id: EntityId) -> float:
    return await source.fetch(scope, entity_id)


def _guard(
    coordinator: ReseedCoordinator,
    source: Any,
    write_mode: WriteMode = "ledger",
    **options: Any,
) -> BudgetGuard:
    return BudgetGuard(coordinator, source, write_mode=write_mode, **options)


# -- keys ---------------------------------------------------------------------------------


def test_ids_are_encoded_so_separators_are_unambiguous() -> None:
    assert spend_key("team", "a:b") == "litellm:spend:team:a%3Ab"
    assert spend_key("org", "100%") == "litellm:spend:org:100%25"
    assert spend_key("user", "ana@example.com") == "litellm:spend:user:ana@example.com"
    assert spend_key("tag", "a b", "prod:litellm") == "prod:litellm:spend:tag:a%20b"
    assert spend_key("team_member", ("t", "u")) == "litellm:spend:team_member:t:u"
    # The member of team "a:b" and the member "b:c" of team "a" are different counters.
    assert spend_key("team_member", ("a:b", "c")) != spend_key("team_member", ("a", "b:c"))
    assert spend_key("team", "a%3Ab") != spend_key("team", "a:b")


_ids = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40).filter(
    lambda text: len(text.encode()) <= MAX_ID_BYTES
)


@given(
    scope=st.sampled_from(SCOPES),
    first=_ids,
    second=_ids,
    namespace=st.sampled_from(["litellm", "prod:litellm", "{tenant-7}", "a.b_c"]),
)
def test_spend_keys_parse_back_to_exactly_their_entity(
    scope: Scope, first: str, second: str, namespace: str
) -> None:
    entity_id: EntityId = (first, second) if scope == "team_member" else first
    key = spend_key(scope, entity_id, namespace)  # validate_key passed inside
    # A left inverse makes the scheme injective: no two entities share a counter.
    assert parse_spend_key(key) == (namespace, scope, entity_id)


@pytest.mark.parametrize(
    ("scope", "entity_id"),
    [
        ("team", ""),
        ("team", "x" * (MAX_ID_BYTES + 1)),
        ("team", "é" * (MAX_ID_BYTES // 2 + 1)),
        ("team", 42),
        ("team", ("a", "b")),
        ("team_member", "a"),
        ("team_member", ("a",)),
        ("team_member", ("a", "")),
        ("team_member", ["a", "b"]),
        ("team", "\ud800"),
        ("project", "a"),
    ],
)
def test_invalid_ids_are_refused(scope: Any, entity_id: Any) -> None:
    with pytest.raises(InvalidKeyError):
        spend_key(scope, entity_id)


def test_the_longest_ids_fit_the_key_limit() -> None:
    widest = "\U0001f600" * (MAX_ID_BYTES // 4)  # every byte percent-encoded
    key = spend_key("team_member", (widest, widest), "n" * 64)
    assert len(key.encode()) <= MAX_KEY_BYTES
    for namespace in ["", "a b", "x" * 65, "a%b"]:
        with pytest.raises(InvalidKeyError):
            spend_key("team", "t", namespace)


# -- check --------------------------------------------------------------------------------


class CountingConnection(Connection):
    """Counts the packets sent to the server: one per round trip (pipelines included)."""

    sent = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sent += 1
        await super().send_packed_command(command, check_health)


async def test_five_scope_check_is_one_round_trip(
    servers: EmbeddedServers, store: Redis, source: PostgresSpendSource
) -> None:
    client = Redis.from_url(servers.redis[0].url, connection_class=CountingConnection)
    coordinator = ReseedCoordinator(client, lock_masters=[client])
    guard = _guard(coordinator, source)
    entities = [(scope, entity_id, 100.0) for scope, entity_id in ENTITIES[:5]]
    try:
        for scope, entity_id, _ in entities:
            await store.set(guard.key(scope, entity_id), "7.5")
        await guard.check(entities)  # connects (HELLO and friends) outside the count
        before = await store.info("commandstats")
        CountingConnection.sent = 0

        spends = await guard.check(entities)

        assert CountingConnection.sent == 1
        after = await store.info("commandstats")
        assert after["cmdstat_mget"]["calls"] == before["cmdstat_mget"]["calls"] + 1
        assert after.get("cmdstat_get", {}).get("calls", 0) == before.get("cmdstat_get", {}).get(
            "calls", 0
        )
        assert spends == [7.5] * 5
    finally:
        await coordinator.aclose()
        await client.aclose()


async def test_spend_at_budget_refuses_naming_the_first_over_entity(
    make_coordinator: CoordFactory, store: Redis, source: PostgresSpendSource
) -> None:
    observer = Recorder()
    guard = _guard(make_coordinator(), source, observer=observer)
    for (scope, entity_id), spend in zip(ENTITIES[:4], ["5", "10", "9.99", "20"], strict=True):
        await store.set(guard.key(scope, entity_id), spend)
    request = [
        ("key", "sk-hash-1", 10.0),  # 5 < 10: under
        ("team", "team:1", 10.0),  # 10 >= 10: over (the rule is >=)
        ("team_member", ("team:1", "user 1"), 10.0),  # 9.99: under
        ("user", "user 1", 15.0),  # over too
    ]

    with pytest.raises(BudgetExceededError) as refused:
        await guard.check(request)

    error = refused.value
    assert (error.scope, error.id, error.spend, error.max_budget) == ("team", "team:1", 10, 10)
    assert error.key == guard.key("team", "team:1")
    assert [(o.scope, o.spend) for o in error.exceeded] == [("team", 10.0), ("user", 20.0)]
    assert observer.refusals == ["team"]
    assert guard.stats.refusals == {"team": 1}
    assert await guard.check([*request[:1], ("team", "team:1", 10.01)]) == [5.0, 10.0]


async def test_entities_without_budget_are_not_read(
    make_coordinator: CoordFactory, store: Redis, source: PostgresSpendSource
) -> None:
    gate = Gate(source)
    guard = _guard(make_coordinator(), gate)
    await store.set(guard.key("key", "k"), "1")

    # No row exists for the team: reading it would raise MissingRowError.
    assert await guard.check([("key", "k", 5.0), ("team", "ghost", None)]) == [1.0, None]
    assert await guard.check([("team", "ghost", None)]) == [None]
    assert gate.reads == 0
    assert not await store.exists(guard.key("team", "ghost"))


async def test_cold_counters_of_every_scope_are_rebuilt_once_across_pods(
    make_coordinator: CoordFactory, store: Redis, source: PostgresSpendSource
) -> None:
    await _seed_rows(source, 12.5)
    gate = Gate(source)
    pods = [_guard(make_coordinator(), gate) for _ in range(3)]
    request = [(scope, entity_id, 1000.0) for scope, entity_id in ENTITIES]

    results = await asyncio.gather(*(pod.check(request) for pod in pods for _ in range(5)))

    assert results == [[12.5] * len(ENTITIES)] * 15
    assert gate.reads == len(ENTITIES)
    keys = [pods[0].key(scope, entity_id) for scope, entity_id in ENTITIES]
    assert [await _counter(store, key) for key in keys] == [12.5] * len(ENTITIES)


async def test_a_missing_row_is_a_clear_error(
    make_coordinator: CoordFactory, store: Redis, source: PostgresSpendSource
) -> None:
    guard = _guard(make_coordinator(), source)

    with pytest.raises(MissingRowError, match="no team_member row for"):
        await guard.check([("team_member", ("t", "nobody"), 5.0)])
    assert not await store.exists(guard.key("team_member", ("t", "nobody")))


# -- record -------------------------------------------------------------------------------


async def test_ledger_record_adds_to_present_counters_only_and_once(
    make_coordinator: CoordFactory, store: Redis, source: PostgresSpendSource
) -> None:
    guard = _guard(make_coordinator(ttl=60.0), source)
    present, absent = guard.key("key", "k"), guard.key("team", "t")
    await store.set(present, "1.5", px=5000)
    request = [("key", "k"), ("team", "t", 9.0)]

    first = await guard.record("req-1", request, 0.25)
    again = await guard.record("req-1", request, 0.25)

    assert (first.duplicate, first.spends, first.pending) == (False, (1.75, None), 0)
    assert (again.duplicate, again.spends) == (True, (None, None))
    assert await store.get(present) == b"1.75"
    assert await store.pttl(present) > 5000  # refreshed to the coordinator's 60 s TTL
    assert not await store.exists(absent)
    assert guard.stats.duplicates == 1
    assert (await guard.record("req-2", request, 0.25)).spends == (2.0, None)
    assert await _db_spend(source, "team", "t") == 0.5
    assert await source.pending("req-1") == []  # applied: the outbox row is gone


async def test_lagging_record_rebuilds_a_missing_counter_then_adds(
    make_coordinator: CoordFactory, store: Redis, source: PostgresSpendSource
) -> None:
    await source.set_budget("team", "t", 50.0)
    await source.pool.execute("UPDATE budget_entity SET spend = 10 WHERE entity_id = 't'")
    guard = _guard(make_coordinator(), source, write_mode="lagging")

    first = await guard.record("r", [("team", "t")], 2.0)
    again = await guard.record("r", [("team", "t")], 2.0)

    assert first.spends == (12.0,)
    assert again.duplicate
    assert await _counter(store, guard.key("team", "t")) == 12.0
    assert await _db_spend(source, "team", "t") == 10.0  # the batched writer's job


@pytest.mark.parametrize(
    ("setup", "error"),
    [
        (lambda store, key: store.set(key, "12abc"), CorruptCounterError),
        (lambda store, key: store.hset(key, "f", "1"), WrongTypeError),
    ],
)
async def test_record_with_a_bad_counter_serves_the_others_and_leaves_it_pending(
    make_coordinator: CoordFactory,
    store: Redis,
    source: PostgresSpendSource,
    setup: Callable[[Redis, str], Awaitable[Any]],
    error: type[Exception],
) -> None:
    guard = _guard(make_coordinator(), source)
    good, bad = guard.key("key", "k"), guard.key("team", "t")
    await store.set(good, "1")
    await setup(store, bad)

    with pytest.raises(error) as raised:
        await guard.record("r", [("key", "k"), ("team", "t")], 1.0)

    assert raised.value.key == bad  # type: ignore[attr-defined]
    assert await store.get(good) == b"2"
    assert [row.entity for row in await source.pending("r")] == ["team:t"]  # committed
    await store.delete(bad)  # fixed: the retry settles the row, adding nothing twice
    again = await guard.record("r", [("key", "k"), ("team", "t")], 1.0)
    assert (again.duplicate, again.pending) == (True, 0)
    assert await source.pending("r") == []
    assert await store.get(good) == b"2"


@pytest.mark.parametrize(
    "stored", ["5", "-.5", "1e3", "+2.", "0x10", "1e400", " 5", "nan", "inf", "1_0", "", "5e"]
)
async def test_record_accepts_exactly_the_counters_increment_accepts(
    make_coordinator: CoordFactory, store: Redis, source: PostgresSpendSource, stored: str
) -> None:
    coordinator = make_coordinator()
    guard = _guard(coordinator, source)
    key = guard.key("key", "k")

    async def outcome(call: Awaitable[Any]) -> str:
        await store.set(key, stored)
        try:
            await call
        except CorruptCounterError:
            return "corrupt"
        return "ok"

    by_increment = await outcome(coordinator.increment(key, 1.0))
    by_record = await outcome(guard.record("r", [("key", "k")], 1.0))
    assert by_record == by_increment


async def test_record_refuses_a_bad_cost_or_request_id(
    make_coordinator: CoordFactory, store: Redis, source: PostgresSpendSource
) -> None:
    guard = _guard(make_coordinator(), source)
    with pytest.raises(InvalidValueError):
        await guard.record("r", [("key", "k")], float("nan"))
    with pytest.raises(InvalidKeyError):
        await guard.record("", [("key", "k")], 1.0)
    assert await store.dbsize() == 0
    assert await source.pool.fetchval("SELECT count(*) FROM spend_ledger") == 0


# -- the ledger contract: a spend write racing a rebuild ----------------------------------


async def _rebuild_held_after_its_read(
    make_coordinator: CoordFactory,
    source: PostgresSpendSource,
    scope: Scope,
    entity_id: EntityId,
    *,
    spend: float,
) -> tuple[Gate, BudgetGuard, asyncio.Task[list[float | None]]]:
    """Start a rebuild of a 100-budget entity with ``spend`` in the DB and hold it after
    its read, before its seed: release it with ``gate.release.set()``."""
    await source.set_budget(scope, entity_id, 100.0)
    await source.pool.execute("UPDATE budget_entity SET spend = $1", spend)
    gate = Gate(source)
    reader = _guard(make_coordinator(), gate)
    gate.hold()
    rebuild = asyncio.create_task(reader.check([(scope, entity_id, 100.0)]))
    await asyncio.wait_for(gate.read_done.wait(), 10)
    return gate, reader, rebuild


async def test_a_spend_committed_after_a_rebuilds_read_fences_its_seed(
    make_coordinator: CoordFactory, store: Redis, source: PostgresSpendSource
) -> None:
    gate, reader, rebuild = await _rebuild_held_after_its_read(
        make_coordinator, source, "team", "t", spend=10.0
    )
    writer = _guard(make_coordinator(), source)

    assert (await writer.record("r1", [("team", "t")], 5.0)).spends == (None,)
    gate.release.set()

    assert await rebuild == [10.0]  # its own read: the request was checked before the spend
    assert not await store.exists(reader.key("team", "t"))  # the stale seed was refused
    assert await writer.check([("team", "t", 100.0)]) == [15.0]
    assert await _counter(store, reader.key("team", "t")) == 15.0


class Uncommitted(PostgresSpendSource):
    """The shipped source whose ``record`` holds its transaction open, after the spend and
    outbox writes, until ``commit`` is set."""

    def __init__(self, inner: PostgresSpendSource) -> None:
        super().__init__(inner.pool, write_spend=self._write_and_wait)
        self.written, self.commit = asyncio.Event(), asyncio.Event()

    async def _write_and_wait(self, conn: Any, entities: Sequence[Entity], cost: float) -> None:
        await conn.execute("UPDATE budget_entity SET spend = spend + $1", cost)
        self.written.set()
        await asyncio.wait_for(self.commit.wait(), 10)


async def test_a_rebuild_during_an_uncommitted_write_reads_before_it_and_the_apply_adds(
    make_coordinator: CoordFactory, store: Redis, source: PostgresSpendSource
) -> None:
    await source.set_budget("team", "t", 100.0)
    await source.pool.execute("UPDATE budget_entity SET spend = 10")
    reader = _guard(make_coordinator(), source)
    holding = Uncommitted(source)
    writer = _guard(make_coordinator(), holding)

    write = asyncio.create_task(writer.record("r1", [("team", "t")], 5.0))
    await asyncio.wait_for(holding.written.wait(), 10)
    assert await reader.check([("team", "t", 100.0)]) == [10.0]  # no lock wait: a snapshot
    holding.commit.set()

    assert (await write).spends == (15.0,)
    assert await _counter(store, reader.key("team", "t")) == 15.0 == await source.fetch("team", "t")


async def test_a_seed_from_a_snapshot_marks_its_outbox_rows_counted(
    make_coordinator: CoordFactory, store: Redis, source: PostgresSpendSource
) -> None:
    # A pod committed r1 and died before its counter write: the outbox still holds it.
    await source.record("r1", [("team", "t", 100.0)], 5.0)
    guard = _guard(make_coordinator(), source, drain_after=0.001)

    assert await guard.check([("team", "t", 100.0)]) == [5.0]  # r1 counted by the seed
    assert await guard.drain() == 1  # settled: a duplicate, nothing added

    assert await _counter(store, guard.key("team", "t")) == 5.0
    assert await source.pending("r1") == []


async def test_a_reset_during_a_rebuild_keeps_pre_reset_spend_out(
    make_coordinator: CoordFactory, store: Redis, source: PostgresSpendSource
) -> None:
    gate, _, rebuild = await _rebuild_held_after_its_read(
        make_coordinator, source, "key", "k", spend=80.0
    )
    admin = _guard(make_coordinator(), source)

    await admin.reset_spend("key", "k")
    gate.release.set()

    # The rebuild read 80 before the reset; its write is fenced out and, rather than
    # hand back a pre-reset read after the reset, it rebuilds in the new generation.
    assert await rebuild == [0.0]
    assert await admin.current_spend("key", "k") == 0.0
    assert await _counter(store, admin.key("key", "k")) == 0.0


# -- outages ------------------------------------------------------------------------------


async def test_outage_policies_when_the_counter_store_is_down(
    own_servers: EmbeddedServers, make_own_coordinator: CoordFactory, source: PostgresSpendSource
) -> None:
    await source.set_budget("team", "t", 10.0)
    await source.set_budget("user", "u", 100.0)
    await source.pool.execute("UPDATE budget_entity SET spend = 12 WHERE entity_id = 't'")
    coordinator = make_own_coordinator()
    observer = Recorder()
    policies: list[OutagePolicy] = ["fail-closed", "fail-open", "read-through"]
    guards = {
        policy: _guard(coordinator, source, outage_policy=policy, observer=observer)
        for policy in policies
    }
    own_servers.redis[0].stop()
    under = [("user", "u", 100.0), ("key", "k", None)]

    with pytest.raises(BudgetUnavailableError) as closed:
        await guards["fail-closed"].check(under)
    assert closed.value.policy == "fail-closed"
    assert await guards["fail-open"].check([("team", "t", 10.0)]) == [None]
    with pytest.raises(BudgetExceededError, match="team 't'"):
        await guards["read-through"].check([("team", "t", 10.0), *under])
    assert await guards["read-through"].check(under) == [0.0, None]
    recorded = await guards["fail-open"].record("r", under, 1.0)  # committed, left to drain
    assert (recorded.duplicate, recorded.pending) == (False, 2)
    with pytest.raises(BudgetUnavailableError):
        await _guard(coordinator, source, "lagging", observer=observer).record("r", under, 1.0)

    assert observer.outages == [*policies, "read-through", "fail-open", "read-through"]
    assert guards["fail-open"].stats.left_to_drain == 2
    assert guards["fail-open"].stats.allowed_blind == 1
    assert guards["read-through"].stats.read_through == 2
    assert guards["read-through"].stats.refusals == {"team": 1}


# -- configuration and the source ---------------------------------------------------------


async def test_bad_configuration_is_refused(
    make_coordinator: CoordFactory, source: PostgresSpendSource
) -> None:
    coordinator = make_coordinator()
    bad: list[dict[str, Any]] = [
        {"write_mode": "eventual"},
        {"outage_policy": "maybe"},
        {"idempotency_window": 0},
        {"read_through_timeout": float("inf")},
        {"drain_after": 300.0},  # must be below half the 600 s window
        {"drain_interval": -1},
    ]
    for options in bad:
        with pytest.raises(ConfigurationError):
            _guard(coordinator, source, **{"write_mode": "ledger", **options})
    with pytest.raises(ConfigurationError, match="LedgerSource"):
        _guard(coordinator, FetchOnly(), write_mode="ledger")  # a lagging source's shape
    with pytest.raises(InvalidKeyError):
        _guard(coordinator, source, namespace="has space")
    guard = _guard(coordinator, source)
    for entity in [("key", "k", -1.0), ("key", "k", float("nan")), ("key", "k", True), ("key",)]:
        with pytest.raises(InvalidValueError):
            await guard.check([entity])  # type: ignore[list-item]
    assert await guard.check([Entity("key", "k")]) == [None]


async def test_source_records_once_per_request_and_creates_missing_rows(
    source: PostgresSpendSource,
) -> None:
    request = [("end_user", "new customer"), ("team_member", ("t", "u")), ("tag", "a")]
    assert await source.record("r1", request, 1.5)
    assert not await source.record("r1", request, 1.5)
    assert await source.record("r2", request[:1], 1.0)

    assert await source.fetch("end_user", "new customer") == 2.5
    assert await source.fetch("team_member", ("t", "u")) == 1.5
    ledger = await source.pool.fetchval("SELECT entities FROM spend_ledger WHERE request_id='r1'")
    assert ledger == ["end_user:new%20customer", "team_member:t:u", "tag:a"]
    assert sorted((row.entity, row.cost) for row in await source.pending("r1")) == [
        ("end_user:new%20customer", 1.5),
        ("tag:a", 1.5),
        ("team_member:t:u", 1.5),
    ]
    spend, unapplied = await source.snapshot("end_user", "new customer")
    assert (spend, sorted(unapplied)) == (2.5, ["r1", "r2"])
    await source.reset_spend("end_user", "new customer")  # the reset wipes its outbox rows
    assert await source.snapshot("end_user", "new customer") == (0.0, [])


async def test_source_commits_nothing_when_the_spend_write_fails(
    source: PostgresSpendSource,
) -> None:
    async def fail(conn: Any, entities: Sequence[Entity], cost: float) -> None:
        raise RuntimeError("spend write failed")

    failing = PostgresSpendSource(source.pool, write_spend=fail)
    with pytest.raises(RuntimeError):
        await failing.record("r1", [("team", "t")], 1.0)
    assert await source.pool.fetchval("SELECT count(*) FROM spend_ledger") == 0
    assert await source.pending("r1") == []
    assert await source.record("r1", [("team", "t")], 1.0)


async def test_source_with_queries_for_its_own_schema(servers: EmbeddedServers) -> None:
    assert servers.postgres is not None
    queries = {"team": "SELECT cents / 100.0 FROM own_team WHERE name = $1"}

    async def write_spend(conn: Any, entities: Sequence[Entity], cost: float) -> None:
        names = [entity.id for entity in entities]
        await conn.execute(
            "UPDATE own_team SET cents = cents + $1 WHERE name = ANY($2::text[])",
            round(cost * 100),
            names,
        )

    with pytest.raises(ConfigurationError):
        PostgresSpendSource(None, {"project": "SELECT 1"})
    async with await PostgresSpendSource.connect(
        servers.postgres.dsn, queries, write_spend=write_spend
    ) as own:
        await own.install_schema()  # spend_ledger and spend_outbox, beside your tables
        await own.pool.execute(
            "DROP TABLE IF EXISTS own_team; CREATE TABLE own_team (name text, cents bigint);"
            "INSERT INTO own_team VALUES ('t', 1234);"
            "TRUNCATE spend_ledger, spend_outbox"
        )
        assert await own.loader("team", "t")() == 12.34
        assert await own.snapshot("team", "t") == (12.34, [])
        assert await own.record("own-1", [("team", "t")], 1.0)
        assert await own.snapshot("team", "t") == (13.34, ["own-1"])
        with pytest.raises(MissingRowError, match="no team row for 'x'"):
            await own.fetch("team", "x")
        with pytest.raises(ConfigurationError, match="no spend query for scope 'user'"):
            await own.fetch("user", "u")
