"""The counter store on a real Redis Cluster (3 masters, 3 replicas, started once for the
module): the same guarantees as on one server, no CROSSSLOT anywhere."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from patience import PATIENT_TIMEOUTS
from redis.asyncio import Redis
from redis.crc import key_slot
from test_doctor import COUNTERS, FLAGGED, ROWS, TO_FIX, insert_rows, seed_counters, shipped_schema

from coordinator import ReseedCoordinator
from coordinator.budget import BudgetGuard, spend_key
from coordinator.budget.spend_source import PostgresSpendSource
from coordinator.clients import _AskingOnSameConnection, cluster_client
from coordinator.errors import ConfigurationError, InvalidKeyError, ReseedError, StoreError
from coordinator.keys import applied_key, fence_key, same_slot_prefix, seed_channel
from coordinator.lab import cli
from coordinator.lab.chaos import SCENARIOS, Lab, TcpProxy, run_table
from coordinator.lab.embedded import EmbeddedServers
from coordinator.lab.embedded.cluster import EmbeddedCluster
from coordinator.lab.race import run_race
from coordinator.lab.servers import Deployment, Servers
from coordinator.wakeup import Watch

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


@pytest.fixture
def deployment(cluster: EmbeddedCluster, servers: EmbeddedServers) -> Deployment:
    """The lab's view of the cluster (the chaos table's), with the session's lock masters
    and PostgreSQL."""
    assert servers.postgres is not None
    locks = tuple(s.url for s in servers.redis[1:4])
    return Deployment(Servers(cluster.url, locks, servers.postgres.dsn), cluster=cluster)


def test_chaos_rows_that_need_a_single_store_are_skipped_on_a_cluster(
    deployment: Deployment,
) -> None:
    rows = run_table(deployment, ["store-restarted", "store-reply-lost"])
    assert [(row.status, row.observed) for row in rows] == [
        ("skip", "needs a single store: the counter store is a Redis Cluster")
    ] * 2


# -- the doctor ---------------------------------------------------------------------------


async def test_doctor_scans_and_fixes_the_counters_of_every_master(
    coordinators: list[ReseedCoordinator],
    cluster: EmbeddedCluster,
    servers: EmbeddedServers,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RESEED_LOCK_URLS", raising=False)
    store = coordinators[0].store
    await store.initialize()  # type: ignore[union-attr]
    await seed_counters(store)
    masters = {cluster.master_of(spend_key(*entity)).port for entity in COUNTERS}
    assert len(masters) == 3
    locks = [arg for s in servers.redis[1:4] for arg in ("--lock-url", s.url)]
    async with shipped_schema(servers) as dsn:
        await insert_rows(dsn)
        args = ["doctor", "--redis-url", cluster.url, "--pg-dsn", dsn]
        refused = await asyncio.to_thread(cli.main, [*args, "--fix", "--yes"])
        assert "--lock-url" in capsys.readouterr().err
        args += locks
        code = await asyncio.to_thread(cli.main, [*args, "--fix", "--yes", "--json"])
        document = json.loads(capsys.readouterr().out)
        after = await asyncio.to_thread(cli.main, [*args, "--json"])

    assert refused == 2
    assert code == 1  # the counter without a DB row stays flagged
    assert {row["key"]: row["status"] for row in document["counters"]} == FLAGGED
    assert document["summary"]["scanned"] == len(COUNTERS)
    for entity in TO_FIX:
        assert float(await store.get(spend_key(*entity)) or "nan") == ROWS[entity]
    assert after == 1
    remaining = json.loads(capsys.readouterr().out)["counters"]
    assert [(row["key"], row["status"]) for row in remaining] == [
        (spend_key("user", "orphan"), "missing_row")
    ]


# -- seed wake-ups ------------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [True, False], ids=["cluster-spublish", "one-server"])
async def test_a_waiting_loser_is_woken_by_the_seed_announcement(
    sharded: bool,
    cluster: EmbeddedCluster,
    servers: EmbeddedServers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster.wait_ok()
    key = f"woken:{uuid.uuid4().hex[:8]}"
    channel = seed_channel(key)
    url, server = (
        (cluster.url, cluster.master_of(key))
        if sharded
        else (servers.redis[0].url, servers.redis[0])
    )
    count = ("PUBSUB", "SHARDNUMSUB") if sharded else ("PUBSUB", "NUMSUB")
    watches: list[Watch] = []
    made = Watch.__init__

    def recording(self: Watch, *args: Any) -> None:
        made(self, *args)
        watches.append(self)

    monkeypatch.setattr(Watch, "__init__", recording)
    # Backoffs of up to 30 s: the loser learns of the seed from the announcement, not a poll.
    pods = [
        ReseedCoordinator.from_urls(
            url,
            lock_urls=[s.url for s in servers.redis[1:4]],
            backoff_initial=30.0,
            backoff_max=30.0,
            wait=120.0,
        )
        for _ in range(2)
    ]
    release, loading = asyncio.Event(), asyncio.Event()
    loads: list[int] = []

    async def load() -> float:
        loads.append(1)
        loading.set()
        await release.wait()
        return 100.0

    try:
        winner = asyncio.create_task(pods[0].get(key, load))
        await loading.wait()
        loser = asyncio.create_task(pods[1].get(key, load))
        listener = Redis(host=server.host, port=server.port)
        for _ in range(3000):  # until the loser subscribed, on the counter's own master
            if (await listener.execute_command(*count, channel))[1] == 1:
                break
            await asyncio.sleep(0.01)
        await listener.aclose()
        release.set()
        assert await asyncio.gather(winner, loser) == [100.0, 100.0]
    finally:
        for pod in pods:
            await pod.aclose()

    assert pods[0]._store.sharded is sharded
    assert len(loads) == 1
    assert [watch.seeded for watch in watches if watch.subscribed] == [b"100.0"]


# -- WAIT for replicas -------------------------------------------------------------------


async def test_writes_no_replica_acknowledged_are_logged_not_raised(
    servers: EmbeddedServers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="coordinator.store")
    coordinator = ReseedCoordinator.from_urls(
        servers.redis[0].url, replicas=1, replica_timeout=0.01
    )  # one server: no replica ever acknowledges
    key = f"unreplicated:{uuid.uuid4().hex[:8]}"
    try:
        assert await coordinator.get(key, _constant(10.0)) == 10.0
        assert await coordinator.increment(key, 1.0) == 11.0  # applied once, not raised
        assert await coordinator.get(key, _constant(-1.0)) == 11.0
    finally:
        await coordinator.aclose()
    warned = [r for r in caplog.records if getattr(r, "outcome", None) == "under_replicated"]
    assert coordinator._store.under_replicated == 2  # the seed, the add
    assert [r.levelname for r in warned] == ["WARNING", "DEBUG"]  # once until acked again


async def test_writes_wait_for_the_replica_of_their_own_master(
    coordinators: list[ReseedCoordinator], cluster: EmbeddedCluster, servers: EmbeddedServers
) -> None:
    waiting = ReseedCoordinator.from_urls(
        cluster.url,
        lock_urls=[s.url for s in servers.redis[1:4]],
        replicas=1,
        replica_timeout=5.0,
    )
    keys = [f"replicated:{n}" for n in range(6)]
    assert len({cluster.master_of(key).port for key in keys}) == 3
    try:
        for key in keys:
            assert await waiting.get(key, _constant(1.0)) == 1.0
        adds = await asyncio.gather(*(waiting.increment(key, 1.0) for key in keys * 4))
    finally:
        await waiting.aclose()
    assert sorted(adds) == sorted([2.0, 3.0, 4.0, 5.0] * len(keys))
    assert waiting._store.under_replicated == 0


@pytest.mark.parametrize(
    "options", [{"replicas": -1}, {"replicas": True}, {"replica_timeout": 0}]
)
def test_bad_replica_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="replica"):
        ReseedCoordinator(Redis(), **options)


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


async def test_an_increment_whose_reply_is_dropped_is_applied_once(
    cluster: EmbeddedCluster, servers: EmbeddedServers
) -> None:
    cluster.wait_ok()
    key = f"dropped:{uuid.uuid4().hex[:8]}"
    master = cluster.master_of(key)
    locks = [Redis.from_url(s.url) for s in servers.redis[1:4]]
    with TcpProxy(master.host, master.port) as proxy:
        # Cluster nodes announce their own addresses: the client is told to reach the
        # counter's master through the proxy instead.
        store = cluster_client(cluster.url, timeout=2.0)
        address, proxied = (master.host, master.port), ("127.0.0.1", proxy.port)
        store.nodes_manager.address_remap = lambda at: proxied if at == address else at
        coordinator = ReseedCoordinator(store, lock_masters=locks)
        try:
            assert await coordinator.get(key, _constant(10.0)) == 10.0
            assert await coordinator.increment(key, 1.0) == 11.0  # the script is loaded
            proxy.drop_replies(1, to=b"EVALSHA")
            with pytest.raises(StoreError):
                await coordinator.increment(key, 1.0)
            assert proxy.dropped == 1
            # Ran once by the master, whose reply never came back; never resent.
            assert await coordinator.get(key, _constant(-1.0)) == 12.0
        finally:
            await coordinator.aclose()
            for client in (store, *locks):
                await client.aclose()


def _constant(value: float) -> Any:
    async def load() -> float:
        return value

    return load


class Traffic:
    """Callers adding 1 and reading ``key`` in a loop on every coordinator, until
    ``finish``: ``added`` the adds acknowledged, ``errors`` the calls that raised,
    ``unknown`` the adds that raised (a timed-out add may have been applied, once)."""

    def __init__(
        self, coordinators: list[ReseedCoordinator], key: str, load: Any, per_pod: int
    ) -> None:
        self.added: list[float] = []
        self.unknown: list[float] = []
        self.errors: list[ReseedError] = []
        self._stop = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._call(c, key, load))
            for c in coordinators
            for _ in range(per_pod)
        ]

    async def _call(self, coordinator: ReseedCoordinator, key: str, load: Any) -> None:
        while not self._stop.is_set():
            adding = True
            try:
                if await coordinator.increment(key, 1.0) is not None:
                    self.added.append(1.0)
                adding = False
                await coordinator.get(key, load)
            except ReseedError as exc:
                self.errors.append(exc)
                if adding:
                    self.unknown.append(1.0)
                await asyncio.sleep(0.01)

    async def finish(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


# -- the counter's slot migrated mid-traffic ---------------------------------------------


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
    await asyncio.to_thread(cluster.migrate, key, 0.3)
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
        # Never above what was sent: acknowledged adds, plus those whose reply was lost.
        assert 100.0 <= final <= 100.0 + sum(traffic.added) + sum(traffic.unknown)
        assert len(loads) <= 2  # at most one rebuild after the failover
    finally:
        master.start()  # rejoins as a replica of the promoted one
        await asyncio.to_thread(cluster.wait_ok)


async def test_with_wait_a_promoted_replica_lacks_only_writes_reported_unreplicated(
    cluster: EmbeddedCluster, servers: EmbeddedServers
) -> None:
    cluster.wait_ok()
    key = f"lagging:{uuid.uuid4().hex[:8]}"
    pods = [
        ReseedCoordinator.from_urls(
            cluster.url, lock_urls=[s.url for s in servers.redis[1:4]], replicas=1
        )
        for _ in range(2)
    ]
    try:
        assert await pods[0].get(key, _constant(100.0)) == 100.0
        master = cluster.master_of(key)
        replica = cluster.replica_of(master)
        traffic = Traffic(pods, key, _constant(100.0), per_pod=2)
        await asyncio.sleep(0.2)
        replica.pause()
        # The link is cut: what the master applies from now on never reaches the replica.
        cluster.cut_replicas(master)
        await asyncio.sleep(0.3)
        master.kill()
        await traffic.finish()
        replica.resume()
        try:
            assert await asyncio.to_thread(cluster.wait_replaced, master) is replica
            promoted = Redis(host=replica.host, port=replica.port)
            raw = await promoted.get(key)
            await promoted.aclose()
        finally:
            master.start()
            await asyncio.to_thread(cluster.wait_ok)
    finally:
        for pod in pods:
            await pod.aclose()

    reported = sum(pod.stats.under_replicated for pod in pods)
    assert raw is not None  # the seed was acknowledged by the replica
    lost = 100.0 + sum(traffic.added) - float(raw)
    assert reported >= 1  # writes went on while the replica was cut off
    assert lost <= reported  # every acknowledged write it lacks was reported


def test_chaos_cluster_rows_pass_on_the_embedded_cluster(deployment: Deployment) -> None:
    names = [name for name in SCENARIOS if name.startswith("cluster-")]
    with Lab(deployment) as lab:
        rows = [lab.run(name) for name in names]
    assert [(row.name, row.status, row.failures) for row in rows] == [
        (name, "pass", []) for name in names
    ]
    migrated, killed, cut, waited = (row.facts for row in rows)
    assert migrated["final"] == 100.0 + migrated["adds"]
    assert killed["errors"] >= 1
    assert 0 <= killed["lost"] <= killed["adds"]
    assert (cut["lost"] >= 1, cut["reported"]) == (True, 0)  # lost silently
    assert 0 <= waited["lost"] <= waited["reported"]  # every loss was reported
