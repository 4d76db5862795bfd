"""Random interleavings of get / increment / increment(loader=) / reset / expire / DB
changes across three pods and three keys on the real servers, checked against a model
after every step.

Each pod is its own thread running its own event loop, with its own coordinator and Redis
clients: pods meet only in Redis, as separate processes do. Rebuilds can be held between
their DB read and their seed (a gate the loader waits on, opened by the machine), so the
machine interleaves resets, expiries and DB changes with a rebuild in flight, and forces a
fleet-wide stampede onto one rebuild. Ordering comes from gates and observed counts, never
from sleeps.

The model, per key: the DB value, the counter (absent, or its value), the increments since
its seed, the reset epoch and every DB read with the epoch it happened in. The library's
guarantees, as the model states them:

1. A counter is the value its rebuild read (at seed time: a DB change after the read does
   not reach it) plus the increments applied since: never a multiple, never a sum of
   snapshots. Amounts and DB values are multiples of 1/4, so every sum is exact in both
   Python and INCRBYFLOAT, and the model demands equality.
2. One DB read per cold miss, fleet-wide (no pod is ever faulted here).
4. No stale write: a rebuild whose read predates its key's latest reset writes nothing.
   If a rebuild after the reset seeded first, its SET NX finds that counter; else it is
   fenced out (``fenced_writes`` counts it) and rebuilds in the new generation. An expiry
   is not a reset: a held rebuild's read is still current after one, so it seeds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from itertools import permutations
from typing import Any, TypeVar

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis import Redis

from coordinator import ReseedCoordinator
from coordinator.lab.embedded import EmbeddedServers
from coordinator.stats import Stats

T = TypeVar("T")

PODS = 3
KEYS = tuple(f"spend:stateful:{name}" for name in ("a", "b", "c"))
# Hang protection only: every wait on a pod is bounded, so a stuck protocol fails the step.
HANG = 20.0
# A call's deadline: far beyond any example, so a held rebuild never runs out of time.
WAIT = 120.0

pods = st.integers(0, PODS - 1)
keys = st.sampled_from(KEYS)
amounts = st.integers(-40, 400).map(lambda quarters: quarters / 4)
db_values = st.integers(0, 4000).map(lambda quarters: quarters / 4)
# How far a reset moves the DB from what a held rebuild read: never zero, so a stale write
# cannot pass for a fresh one.
db_moves = st.integers(1, 400).map(lambda quarters: quarters / 4)
# What other pods do to a key while its rebuild is held (see ``disturbed_rebuild``); a reset
# twice as often as the rest, as the paths it opens (fenced out, or beaten) are the point.
DISTURBANCES = (
    "reset",
    "reset",
    "expire",
    "change_db",
    "increment",
    "get",
    "increment_with_loader",
)


class Pod:
    """A pod: a thread running an event loop, with a coordinator built on that loop."""

    def __init__(self, name: str, urls: list[str]) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()
        try:
            self.coordinator = self.run(self._build(urls))
        except BaseException:
            self._stop()
            raise

    @staticmethod
    async def _build(urls: list[str]) -> ReseedCoordinator:
        # No TTL, a long lease and patient clients: neither clocks nor a loaded machine can
        # end a counter, lose a lock quorum or lapse a held rebuild's lease behind the
        # model's back (no pod is faulted here; expiry is the DEL of ``expire``).
        return ReseedCoordinator.from_urls(
            urls[0],
            lock_urls=urls[1:4],
            socket_timeout=HANG,
            lock_timeout=HANG,
            ttl=None,
            lease=10.0,
            wait=WAIT,
        )

    def start(self, call: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(call, self.loop)

    def run(self, call: Coroutine[Any, Any, T]) -> T:
        return self.start(call).result(HANG)

    def stats(self) -> Stats:
        return self.run(self._stats())

    async def _stats(self) -> Stats:
        return self.coordinator.stats

    def close(self) -> None:
        try:
            self.run(self.coordinator.aclose())
        finally:
            self._stop()

    def _stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(HANG)
        self.loop.close()


@dataclass
class Gate:
    """Holds one rebuild between its DB read and its seed. The loader fills in what it read
    (the value and its key's reset epoch then) before it sets ``read``."""

    pod: Pod
    read: threading.Event = field(default_factory=threading.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    value: float = 0.0
    epoch: int = 0

    def release(self) -> None:
        self.pod.loop.call_soon_threadsafe(self.released.set)


@dataclass
class Held:
    """A call whose rebuild is held at its gate: a get, or an increment(loader=) by
    ``amount``."""

    pod: int
    amount: float | None
    gate: Gate
    call: Future[float | None]


class FleetMachine(RuleBasedStateMachine):
    def __init__(self, env: EmbeddedServers) -> None:
        super().__init__()
        urls = [server.url for server in env.redis]
        for url in urls:
            with Redis.from_url(url) as client:
                client.flushall()
        self.raw = Redis.from_url(urls[0])
        self.pods: list[Pod] = []
        try:
            for index in range(PODS):
                self.pods.append(Pod(f"pod-{index}", urls))
        except BaseException:
            self.close()
            raise
        # Loaders run on the pods' threads; the machine reads what they record.
        self.lock = threading.Lock()
        self.db = dict.fromkeys(KEYS, 100.0)
        self.epoch = dict.fromkeys(KEYS, 0)  # resets of each key so far
        self.reads: dict[str, list[tuple[int, float]]] = {key: [] for key in KEYS}
        self.counter: dict[str, float | None] = dict.fromkeys(KEYS)
        self.added = dict.fromkeys(KEYS, 0.0)  # increments since the counter's seed
        self.armed: dict[tuple[int, str], Gate] = {}
        self.held: dict[str, Held] = {}
        self.loads = 0
        self.cold_misses = 0
        self.fenced = 0

    # -- the DB and its gates ------------------------------------------------------------

    def loader(self, pod: int, key: str) -> Callable[[], Awaitable[float]]:
        async def load() -> float:
            with self.lock:
                value, epoch = self.db[key], self.epoch[key]
                self.reads[key].append((epoch, value))
                self.loads += 1
                gate = self.armed.pop((pod, key), None)
            if gate is not None:
                gate.value, gate.epoch = value, epoch
                gate.read.set()
                await gate.released.wait()  # bounded by the call's deadline
            return value

        return load

    def hold(self, pod: int, key: str, start: Callable[[], None]) -> Gate:
        """Gate ``pod``'s next DB read of ``key``, ``start`` the calls that make it, and
        return once the read happened."""
        gate = Gate(self.pods[pod])
        with self.lock:
            self.armed[(pod, key)] = gate
        start()
        assert gate.read.wait(HANG), f"pod {pod} never read {key} from the DB"
        return gate

    def until(self, what: str, reached: Callable[[], bool]) -> None:
        deadline = time.monotonic() + HANG
        while not reached():
            assert time.monotonic() < deadline, f"{what}: not reached"
            time.sleep(0.001)

    # -- the model -----------------------------------------------------------------------

    def in_flight(self, key: str) -> bool:
        """A held rebuild of ``key`` in its current generation: any rebuild of the key
        would wait for it, so calls that may rebuild stay off the key until its release."""
        held = self.held.get(key)
        return held is not None and held.gate.epoch == self.epoch[key]

    def free_keys(self) -> list[str]:
        return [key for key in KEYS if not self.in_flight(key)]

    def idle_keys(self) -> list[str]:
        return [key for key in KEYS if key not in self.held]

    def idle_misses(self) -> list[str]:
        return [key for key in self.idle_keys() if self.counter[key] is None]

    def held_now(self) -> list[str]:
        return [key for key in KEYS if self.in_flight(key)]

    def seed(self, key: str, value: float) -> None:
        self.counter[key], self.added[key] = value, 0.0

    def cold_miss(self, key: str) -> None:
        """A rebuild that reads the DB now: from the DB once if the counter is absent."""
        if self.counter[key] is None:
            self.seed(key, self.db[key])
            self.cold_misses += 1

    def add(self, key: str, amount: float) -> None:
        counter = self.counter[key]
        if counter is not None:
            self.counter[key] = counter + amount
            self.added[key] += amount

    def drop(self, key: str) -> None:
        self.counter[key], self.added[key] = None, 0.0

    def check(self, key: str) -> None:
        raw = self.raw.get(key)
        real = None if raw is None else float(raw)
        if real is not None:
            now = self.epoch[key]
            fresh = {value for epoch, value in self.reads[key] if epoch == now}
            stale = {value for epoch, value in self.reads[key] if epoch < now} - fresh
            seeded = real - self.added[key]
            assert seeded not in stale, (
                f"stale write: {key} seeded with {seeded}, read before a reset"
            )
        assert real == self.counter[key], f"{key}: counter {real}, model {self.counter[key]}"

    # -- one call at a time --------------------------------------------------------------

    def request(
        self, pod: int, key: str, amount: float | None, *, rebuild: bool = True
    ) -> Coroutine[Any, Any, float | None]:
        """A get (``amount`` None) or an increment, with this pod's loader if ``rebuild``."""
        coordinator = self.pods[pod].coordinator
        load = self.loader(pod, key) if rebuild else None
        if amount is None:
            assert load is not None
            return coordinator.get(key, load)
        return coordinator.increment(key, amount, loader=load)

    def call(self, pod: int, key: str, amount: float | None, *, rebuild: bool) -> float | None:
        return self.pods[pod].run(self.request(pod, key, amount, rebuild=rebuild))

    @precondition(lambda self: self.free_keys())
    @rule(data=st.data(), pod=pods)
    def get(self, data: st.DataObject, pod: int) -> None:
        self.get_key(pod, data.draw(st.sampled_from(self.free_keys()), label="key"))

    def get_key(self, pod: int, key: str) -> None:
        value = self.call(pod, key, None, rebuild=True)
        self.cold_miss(key)
        assert value == self.counter[key]

    @rule(pod=pods, key=keys, amount=amounts)
    def increment(self, pod: int, key: str, amount: float) -> None:
        new = self.call(pod, key, amount, rebuild=False)
        self.add(key, amount)
        assert new == self.counter[key]

    @precondition(lambda self: self.free_keys())
    @rule(data=st.data(), pod=pods, amount=amounts)
    def increment_with_loader(self, data: st.DataObject, pod: int, amount: float) -> None:
        key = data.draw(st.sampled_from(self.free_keys()), label="key")
        self.increment_with_loader_key(pod, key, amount)

    def increment_with_loader_key(self, pod: int, key: str, amount: float) -> None:
        new = self.call(pod, key, amount, rebuild=True)
        self.cold_miss(key)
        self.add(key, amount)
        assert new == self.counter[key]

    @rule(pod=pods, key=keys)
    def reset(self, pod: int, key: str) -> None:
        self.pods[pod].run(self.pods[pod].coordinator.reset(key))
        with self.lock:
            self.epoch[key] += 1
        self.drop(key)

    @rule(key=keys)
    def expire(self, key: str) -> None:
        """What a TTL expiry or an eviction does: the counter is gone, the fence is not."""
        self.raw.delete(key)
        self.drop(key)

    @rule(key=keys, value=db_values)
    def change_db(self, key: str, value: float) -> None:
        with self.lock:
            self.db[key] = value

    # -- a rebuild held between its DB read and its seed ---------------------------------

    @precondition(lambda self: self.idle_misses())
    @rule(data=st.data(), pod=pods, amount=st.none() | amounts)
    def start_held_rebuild(self, data: st.DataObject, pod: int, amount: float | None) -> None:
        self.start_held(pod, data.draw(st.sampled_from(self.idle_misses()), label="key"), amount)

    def start_held(self, pod: int, key: str, amount: float | None) -> None:
        started: list[Future[float | None]] = []
        request = partial(self.request, pod, key, amount)
        gate = self.hold(pod, key, lambda: started.append(self.pods[pod].start(request())))
        self.cold_misses += 1  # its read is the cold miss; the counter waits for its seed
        self.held[key] = Held(pod, amount, gate, started[0])

    @precondition(lambda self: self.held_now())
    @rule(data=st.data(), pod=pods, move=db_moves)
    def reset_mid_rebuild(self, data: st.DataObject, pod: int, move: float) -> None:
        self.reset_moving_db(pod, data.draw(st.sampled_from(self.held_now()), label="key"), move)

    def reset_moving_db(self, pod: int, key: str, move: float) -> None:
        """Reset a key whose rebuild has read the DB, and move the DB away from that read."""
        self.reset(pod, key)
        self.change_db(key, self.held[key].gate.value + move)

    @precondition(lambda self: self.held_now())
    @rule(data=st.data())
    def expire_mid_rebuild(self, data: st.DataObject) -> None:
        self.expire(data.draw(st.sampled_from(self.held_now()), label="key"))

    @precondition(lambda self: self.held_now())
    @rule(data=st.data(), value=db_values)
    def change_db_mid_rebuild(self, data: st.DataObject, value: float) -> None:
        self.change_db(data.draw(st.sampled_from(self.held_now()), label="key"), value)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        self.release_held(data.draw(st.sampled_from(sorted(self.held)), label="key"))

    def release_held(self, key: str) -> None:
        held = self.held.pop(key)
        holder = self.pods[held.pod]
        fenced_before = holder.stats().fenced_writes
        fenced = 0
        if held.gate.epoch == self.epoch[key]:
            # No reset since its read: that read is current (whatever the DB holds now, and
            # though the counter may have expired meanwhile) and it is what gets seeded.
            assert self.counter[key] is None
            moved = "DB moved since its read" if held.gate.value != self.db[key] else "DB same"
            event(f"release: seeds its read ({moved})")
            self.seed(key, held.gate.value)
        elif self.counter[key] is None:
            event("release: fenced out by a reset, rebuilds in the new generation")
            fenced = 1
            self.cold_miss(key)
        else:
            event("release: a rebuild after the reset seeded first, its SET NX finds that")
        held.gate.release()
        value = held.call.result(HANG)
        if held.amount is not None:
            self.add(key, held.amount)
        self.check(key)
        assert value == self.counter[key]
        assert holder.stats().fenced_writes - fenced_before == fenced
        self.fenced += fenced

    @precondition(lambda self: self.idle_keys())
    @rule(
        data=st.data(),
        pod=pods,
        amount=st.none() | amounts,
        during=st.lists(st.sampled_from(DISTURBANCES), max_size=5),
    )
    def disturbed_rebuild(
        self, data: st.DataObject, pod: int, amount: float | None, during: list[str]
    ) -> None:
        """A rebuild held after its read while other pods hit its key, then released, in one
        step: the rules above reach these orders too, but seldom within a short run."""
        key = data.draw(st.sampled_from(self.idle_keys()), label="key")
        if self.counter[key] is not None:
            self.expire(key)
        self.start_held(pod, key, amount)
        for what in during:
            other = data.draw(pods, label="pod")
            if what == "reset":
                self.reset_moving_db(other, key, data.draw(db_moves, label="move"))
            elif what == "expire":
                self.expire(key)
            elif what == "change_db":
                self.change_db(key, data.draw(db_values, label="value"))
            elif what == "increment":
                self.increment(other, key, data.draw(amounts, label="amount"))
            elif self.in_flight(key):
                continue  # a rebuild would wait for the held one: only after a reset
            elif what == "get":
                self.get_key(other, key)
            else:
                self.increment_with_loader_key(other, key, data.draw(amounts, label="amount"))
            self.check(key)
        self.release_held(key)

    # -- a stampede: every caller waits on one held rebuild ------------------------------

    def stampede(
        self, key: str, callers: list[int], amounts: list[float | None]
    ) -> list[float | None]:
        """Call ``key`` on every caller's pod at once, a get or an increment(loader=) by its
        amount. A missing counter is rebuilt by the first caller's pod, held after its read
        until every other call has joined its pod's flight or lost the lease and waits."""
        pending: dict[int, list[tuple[int, float | None]]] = {}
        for index, (pod, amount) in enumerate(zip(callers, amounts, strict=True)):
            pending.setdefault(pod, []).append((index, amount))
        first, *others = pending
        started: dict[int, Future[float | None]] = {}

        def start(pod: int) -> None:
            for index, amount in pending[pod]:
                started[index] = self.pods[pod].start(self.request(pod, key, amount))

        if self.counter[key] is not None:
            for pod in pending:
                start(pod)
        else:
            event(f"stampede on a miss: {len(callers)} callers on {len(pending)} pods")
            before = [pod.stats() for pod in self.pods]
            gate = self.hold(first, key, lambda: start(first))
            for pod in others:
                start(pod)

            def waiting(pod: int) -> bool:
                now, then = self.pods[pod].stats(), before[pod]
                lost = pod == first or now.leases_lost > then.leases_lost
                return lost and now.joined - then.joined == len(pending[pod]) - 1

            for pod in pending:
                self.until(f"pod {pod}'s callers waiting on the rebuild", partial(waiting, pod))
            self.cold_misses += 1
            self.seed(key, gate.value)
            gate.release()
        return [started[index].result(HANG) for index in range(len(callers))]

    @precondition(lambda self: self.free_keys())
    @rule(data=st.data(), callers=st.lists(pods, min_size=2, max_size=4))
    def concurrent_gets(self, data: st.DataObject, callers: list[int]) -> None:
        key = data.draw(st.sampled_from(self.free_keys()), label="key")
        values = self.stampede(key, callers, [None] * len(callers))
        assert values == [self.counter[key]] * len(callers)

    @precondition(lambda self: self.free_keys())
    @rule(data=st.data(), adds=st.lists(st.tuples(pods, amounts), min_size=2, max_size=4))
    def concurrent_increments_with_loader(
        self, data: st.DataObject, adds: list[tuple[int, float]]
    ) -> None:
        key = data.draw(st.sampled_from(self.free_keys()), label="key")
        steps = [amount for _, amount in adds]
        news = self.stampede(key, [pod for pod, _ in adds], list(steps))
        base = self.counter[key]
        assert base is not None
        # One rebuild, then every amount applied once, in some order.
        assert news in list(_running_totals(base, steps))
        self.add(key, sum(steps))

    # -- after every step ----------------------------------------------------------------

    @invariant()
    def counters_match_model_and_none_is_stale(self) -> None:
        for key in KEYS:
            self.check(key)

    @invariant()
    def one_db_read_per_cold_miss(self) -> None:
        assert self.loads == self.cold_misses
        assert sum(pod.stats().loader_calls for pod in self.pods) == self.loads

    @invariant()
    def only_rebuilds_that_a_reset_overtook_are_fenced(self) -> None:
        assert sum(pod.stats().fenced_writes for pod in self.pods) == self.fenced

    def teardown(self) -> None:
        try:
            for held in self.held.values():
                held.gate.release()
            for held in self.held.values():
                held.call.exception(HANG)
        finally:
            self.close()

    def close(self) -> None:
        for pod in self.pods:
            pod.close()
        self.raw.close()


def _running_totals(base: float, steps: list[float]) -> Iterator[list[float]]:
    """For each order of applying ``steps`` to ``base``, what each step's caller sees."""
    for order in permutations(range(len(steps))):
        seen, total = [0.0] * len(steps), base
        for index in order:
            total += steps[index]
            seen[index] = total
        yield seen


def test_counter_invariants_hold_over_random_interleavings(servers: EmbeddedServers) -> None:
    run_state_machine_as_test(
        lambda: FleetMachine(servers),
        settings=settings(max_examples=40, stateful_step_count=25, deadline=None),
    )
