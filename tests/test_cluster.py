"""The counter store on a real Redis Cluster (3 masters, 3 replicas, started once for the
module): the same guarantees as on one server, no CROSSSLOT anywhere."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from patience import PATIENT_TIMEOUTS
from redis.asyncio import Redis
from redis.crc import key_slot

from coordinator import ReseedCoordinator
from coordinator.budget import BudgetGuard
from coordinator.budget.spend_source import PostgresSpendSource
from coordinator.clients import _AskingOnSameConnection
from coordinator.errors import InvalidKeyError, ReseedError, StoreError
from coordinator.keys import applied_key, fence_key, same_slot_prefix, seed_channel
from coordinator.lab.embedded import EmbeddedServers
from coordinator.lab.embedded.cluster import EmbeddedCluster
from coordinator.lab.race import run_race
from coordinator.lab.servers import Servers

# -- the key rule (no server) -------------------------------------------------------------


@pytest.mark.parametrize("key", ["spend:k", "{team}:spend:k", "a{b}c", "a{b", "x{y}{}"])
def test_every_companion_shares_its_counters_slot(key: str) -> None:
    slot = key_slot(key.encode())
    for companion in (fence_key(key), seed_channel(key), applied_key(key, "r1")):
        assert key_slot(companion.encode()) == slot


def test_a_key_with_a_tag_keeps_it_one_without_braces_is_wrapped() -> None:
    assert same_slot_prefix("{team}:k") == "{team}:k"
    assert same_slot_prefix("spend:k") == "{spend:k}"
    assert fence_key("spend:k") == "{spend:k}\x1ffence"


@pytest.mark.parametrize("key", ["a}b", "a{}b", "}{", "x{}{y}"])
def test_a_key_whose_braces_would_change_its_slot_is_refused(key: str) -> None:
    with pytest.raises(InvalidKeyError, match="hash tag") as refused:
        fence_key(key)
    assert refused.value.key == key


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster() as running:
        yield running


@pytest.fixture
async def coordinators(
    cluster: EmbeddedCluster, servers: EmbeddedServers
) -> AsyncIterator[list[ReseedCoordinator]]:
    """Four pods on the cluster (a fresh cluster state: every node flushed)."""
    cluster.wait_ok()
    for node in cluster.nodes:
        client = Redis(host=node.host, port=node.port)
        if (await client.info("replication"))["role"] == "master":
            await client.flushall()
        await client.aclose()
    made = [
        ReseedCoordinator.from_urls(
            cluster.url, lock_urls=[server.url for server in servers.redis[1:4]]
        )
        for _ in range(4)
    ]
    yield made
    for coordinator in made:
        await coordinator.aclose()


# -- the race -----------------------------------------------------------------------------


def test_race_of_eight_pods_reads_the_db_once(
    cluster: EmbeddedCluster, servers: EmbeddedServers
) -> None:
    assert servers.postgres is not None
    cluster.wait_ok()
    urls = Servers(cluster.url, tuple(s.url for s in servers.redis[1:4]), servers.postgres.dsn)
    result = run_race(
        "coordinated", urls, pods=8, callers=8, db_value=100.0, timeouts=PATIENT_TIMEOUTS
    )
    assert (result.db_reads, result.final_counter, result.errors) == (1, 100.0, 0)


# -- budget checks and records across nodes -----------------------------------------------


async def test_a_seven_scope_check_sends_one_request_per_node(
    coordinators: list[ReseedCoordinator],
    cluster: EmbeddedCluster,
    source: PostgresSpendSource,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    guard = BudgetGuard(coordinators[0], source, write_mode="ledger")
    entities: list[Any] = [
        ("key", "k"), ("team", "t"), ("team_member", ("t", "u")), ("user", "u"),
        ("org", "o"), ("end_user", "e"), ("tag", "g"),
    ]  # fmt: skip
    keys = [guard.key(scope, entity_id) for scope, entity_id in entities]
    nodes = {cluster.master_of(key).port for key in keys}
    assert len(nodes) >= 2
    for key in keys:
        await coordinators[0].store.set(key, "1.5")
    await guard.check([(*entity, 10.0) for entity in entities])  # connections opened
    sent: list[int] = []
    original = _AskingOnSameConnection.send_packed_command

    async def counting(self: _AskingOnSameConnection, command: Any, check: bool = True) -> None:
        sent.append(int(self.port))
        await original(self, command, check)

    monkeypatch.setattr(_AskingOnSameConnection, "send_packed_command", counting)

    spends = await guard.check([(*entity, 10.0) for entity in entities])

    assert spends == [1.5] * 7
    assert sorted(sent) == sorted(nodes)  # one request per node touched


async def test_record_applies_each_entity_once_with_markers_in_its_slot(
    coordinators: list[ReseedCoordinator], source: PostgresSpendSource
) -> None:
    guards = [BudgetGuard(c, source, write_mode="ledger") for c in coordinators]
    entities: list[Any] = [("key", "k"), ("team", "t"), ("user", "u"), ("org", "o")]
    store = coordinators[0].store
    keys = [guards[0].key(scope, entity_id) for scope, entity_id in entities]
    for key in keys:
        await store.set(key, "0")

    outcomes = await asyncio.gather(*(g.record("req-1", entities, 2.0) for g in guards))

    assert sum(not outcome.duplicate for outcome in outcomes) == 1
    for key in keys:
        assert float(await store.get(key)) == 2.0
        marker = applied_key(key, "req-1")
        assert await store.exists(marker)
        assert key_slot(marker.encode()) == key_slot(key.encode())


# -- a timed-out increment is not resent --------------------------------------------------


async def test_a_timed_out_increment_is_applied_once(
    cluster: EmbeddedCluster, servers: EmbeddedServers
) -> None:
    cluster.wait_ok()
    coordinator = ReseedCoordinator.from_urls(
        cluster.url, lock_urls=[s.url for s in servers.redis[1:4]], socket_timeout=0.2
    )
    key = "timed-out"
    try:
        await coordinator.reset(key)
        assert await coordinator.get(key, _constant(10.0)) == 10.0
        # Loads the script: an EVALSHA the server never saw would meet NOSCRIPT on resume.
        assert await coordinator.increment(key, 1.0) == 11.0
        master = cluster.master_of(key)
        master.pause()
        try:
            with pytest.raises(StoreError):
                await coordinator.increment(key, 1.0)
            await asyncio.sleep(0.5)  # past the socket timeout, well within the node timeout
        finally:
            master.resume()
        # Run once when the master woke up, never resent by the client.
        assert await coordinator.get(key, _constant(999.0)) == 12.0
    finally:
        await coordinator.aclose()


def _constant(value: float) -> Any:
    async def load() -> float:
        return value

    return load


class Traffic:
    """Callers adding 1 and reading ``key`` in a loop on every coordinator, until
    ``finish``: ``added`` the adds acknowledged, ``errors`` the calls that raised."""

    def __init__(
        self, coordinators: list[ReseedCoordinator], key: str, load: Any, per_pod: int
    ) -> None:
        self.added: list[float] = []
        self.errors: list[ReseedError] = []
        self._stop = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._call(c, key, load))
            for c in coordinators
            for _ in range(per_pod)
        ]

    async def _call(self, coordinator: ReseedCoordinator, key: str, load: Any) -> None:
        while not self._stop.is_set():
            try:
                if await coordinator.increment(key, 1.0) is not None:
                    self.added.append(1.0)
                await coordinator.get(key, load)
            except ReseedError as exc:
                self.errors.append(exc)
                await asyncio.sleep(0.01)

    async def finish(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


# -- the counter's slot migrated mid-traffic ---------------------------------------------


def _migrate(cluster: EmbeddedCluster, key: str, hold: float) -> None:
    """Move ``key``'s slot (the counter and its companions) to another master, leaving it
    half-migrated for ``hold`` seconds, so traffic meets ASK redirects."""
    slot = key_slot(key.encode())
    source = cluster.master_of(key)
    target = next(
        node for node in cluster.nodes[:3] if node is not source and node.running
    )  # a master from the start, untouched by this module's other tests
    source_id, target_id = cluster.node_id(source), cluster.node_id(target)
    ask = cluster._ask
    ask(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    ask(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    keys = ask(source, "CLUSTER", "GETKEYSINSLOT", slot, 100)
    assert len(keys) >= 2  # the counter and its fence hash
    ask(source, "MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
    time.sleep(hold)
    for node in (target, source):
        ask(node, "CLUSTER", "SETSLOT", slot, "NODE", target_id)


async def test_a_slot_migrated_mid_traffic_keeps_an_exact_sum(
    coordinators: list[ReseedCoordinator],
    cluster: EmbeddedCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = "migrating"
    asks: list[tuple[Any, ...]] = []
    pack = _AskingOnSameConnection.pack_command

    def counting(self: _AskingOnSameConnection, *args: Any) -> list[bytes]:
        if args == ("ASKING",):
            asks.append(args)
        return pack(self, *args)

    monkeypatch.setattr(_AskingOnSameConnection, "pack_command", counting)
    assert await coordinators[0].get(key, _constant(100.0)) == 100.0
    for coordinator in coordinators:
        await coordinator.increment(key, 0.0)  # scripts loaded everywhere they will run
    traffic = Traffic(coordinators, key, _constant(-1.0), per_pod=4)
    await asyncio.sleep(0.2)
    source = cluster.master_of(key)
    await asyncio.to_thread(_migrate, cluster, key, 0.3)
    await asyncio.sleep(0.2)
    await traffic.finish()

    assert cluster.master_of(key) is not source
    assert asks  # traffic went through the half-migrated slot, ASK by ASK
    assert not [f for f in traffic.errors if "CROSSSLOT" in str(f)]
    # Refusals (TRYAGAIN while keys move) applied nothing; they stay rare.
    assert len(traffic.errors) <= len(traffic.added) // 10, traffic.errors[:3]
    assert await coordinators[0].get(key, _constant(-1.0)) == 100.0 + sum(traffic.added)
    target = cluster.master_of(key)
    moved = Redis(host=target.host, port=target.port)
    assert await moved.exists(key, fence_key(key)) == 2
    await moved.aclose()


# -- failover (last: it leaves a former replica as master) -------------------------------


async def test_failover_mid_traffic_gives_values_or_typed_errors_and_no_inflation(
    coordinators: list[ReseedCoordinator], cluster: EmbeddedCluster
) -> None:
    key = "failover"
    loads: list[int] = []

    async def load() -> float:
        loads.append(1)
        return 100.0

    assert await coordinators[0].get(key, load) == 100.0
    master = cluster.master_of(key)
    replica = cluster.replica_of(master)
    traffic = Traffic(coordinators, key, load, per_pod=2)
    await asyncio.sleep(0.2)
    master.kill()
    try:
        assert await asyncio.to_thread(cluster.wait_replaced, master) is replica
        await asyncio.sleep(0.3)  # traffic on the promoted replica
        await traffic.finish()

        assert traffic.errors  # the dead master's slots failed while the replica took over
        assert all(isinstance(error, StoreError) for error in traffic.errors)
        final = await coordinators[0].get(key, load)
        # A promoted replica may lack the last acknowledged adds, never holds extra ones.
        assert 100.0 <= final <= 100.0 + sum(traffic.added)
        assert len(loads) <= 2  # at most one rebuild after the failover
    finally:
        master.start()  # rejoins as a replica of the promoted one
        await asyncio.to_thread(cluster.wait_ok)
