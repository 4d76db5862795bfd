"""Waking a rebuild's losers the moment the winner seeds.

Losers back off between re-reads of the key (tenacity, random exponential). Left alone,
that backoff decides how long after the seed they notice it. The seed script PUBLISHes on
the counter's channel when it writes, and a loser's backoff sleep ends early when that
message arrives. One pub/sub connection per server carries every channel a coordinator
waits on there.

On a Redis Cluster of Redis/Valkey >= 7 the seed script uses sharded pub/sub (SPUBLISH):
the message stays on the counter's shard (the channel is in the counter's slot), and the
coordinator SSUBSCRIBEs on the master serving that slot, one connection per master it
waits on. On an older cluster the seed script's PUBLISH reaches every node over the
cluster bus, so the pub/sub connection goes to one node (the first startup node) and
hears every seed; if that node is down, losers poll.

Pub/sub is an accelerator only: a message lost to a reconnect, a failover or a slot
migration, or sent before the loser's SUBSCRIBE reached the server, costs at most one
backoff interval, never correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any

from redis.asyncio import ConnectionPool, RedisCluster
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .keys import seed_channel

if TYPE_CHECKING:
    from .store import CounterStore

log = logging.getLogger(__name__)


class Watch:
    """One flight's view of its key's seed announcements: a backoff ``sleep`` that ends
    early when the key is seeded, and the value the seed announced (``seeded``)."""

    def __init__(self, signals: SeedSignals | None, channel: bytes) -> None:
        self._signals = signals
        self.channel = channel
        self.event = asyncio.Event()
        self.seeded: bytes | None = None
        self.subscribed = False
        self.via: _Subscriber | None = None  # the connection it waits on, once subscribed

    async def sleep(self, seconds: float) -> None:
        if self._signals is None:
            await asyncio.sleep(seconds)
            return
        if not self.subscribed:
            # Subscribe on the first backoff (a flight that wins its lease at once pays
            # nothing), then return at once: the caller re-reads the key, which catches a
            # seed that landed before the SUBSCRIBE did.
            self.subscribed = True
            await self._signals.add(self)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.event.wait(), seconds)
        self.event.clear()


def _pubsub_pool(
    kwargs: dict[str, Any], connection_class: type[AbstractConnection]
) -> ConnectionPool:
    """A pool with a client's settings whose connections redis-py never reconnects on its
    own: with no supported errors its retry layer skips the failure callback that
    reconnects (it runs even with zero retries), so only :class:`_Subscriber` reconnects."""
    settings = {
        **kwargs,
        "retry": Retry(NoBackoff(), 0, supported_errors=()),
        "retry_on_error": [],
        "retry_on_timeout": False,
    }
    return ConnectionPool(connection_class=connection_class, **settings)


class SeedSignals:
    """A coordinator's wake-up connections: one to its store (one to the first startup node
    of a cluster without sharded pub/sub), or one per cluster master whose counters it
    waits on (sharded pub/sub)."""

    def __init__(self, store: CounterStore, *, enabled: bool = True) -> None:
        self._store = store
        self._enabled = enabled
        self._subscribers: dict[str, _Subscriber] = {}

    @contextlib.asynccontextmanager
    async def watch(self, key: str) -> AsyncIterator[Watch]:
        """Announcements of ``key``'s seed for one flight (plain backoff when disabled)."""
        watch = Watch(self if self._enabled else None, seed_channel(key).encode())
        try:
            yield watch
        finally:
            if watch.via is not None:
                await watch.via.remove(watch)

    async def add(self, watch: Watch) -> None:
        """Subscribe ``watch`` on the server its channel is published on; if that cannot be
        told (a cluster slot not served), it polls."""
        via = self._subscriber(watch.channel)
        if via is not None:
            watch.via = via
            await via.add(watch)

    async def aclose(self) -> None:
        for subscriber in self._subscribers.values():
            await subscriber.aclose()
        self._subscribers.clear()

    def _subscriber(self, channel: bytes) -> _Subscriber | None:
        client = self._store.client
        connection_class: type[AbstractConnection]
        if not isinstance(client, RedisCluster):
            name, sharded = "", False
            kwargs = client.connection_pool.connection_kwargs
            connection_class = client.connection_pool.connection_class
        else:
            sharded = self._store.sharded
            try:
                node = (
                    # The master serving the channel's slot now (the store read the map).
                    client.nodes_manager.get_node_from_slot(client.keyslot(channel))
                    if sharded
                    else next(iter(client.nodes_manager.startup_nodes.values()))
                )
            except RedisError:
                return None
            name, kwargs, connection_class = (
                node.name,
                node.connection_kwargs,
                node.connection_class,
            )
        subscriber = self._subscribers.get(name)
        if subscriber is None:
            pool = _pubsub_pool(kwargs, connection_class)
            subscriber = self._subscribers[name] = _Subscriber(pool, sharded=sharded)
        return subscriber


class _Subscriber:
    """One PubSub connection to one server, carrying every channel the coordinator's flights
    wait on there (``sharded``: shard channels, SSUBSCRIBE).

    redis-py's PubSub is one connection shared by the reader task and the subscribers, and
    redis-py reconnects it from whichever coroutine hit an error (even with retries off).
    When the server goes away those reconnects race: two coroutines reading one stream
    raise ``RuntimeError``, a write on a connection another coroutine just closed raises
    ``AttributeError``, and the losing socket leaks. So the PubSub has a pool of its own
    whose connections redis-py never re-establishes, subscribes and unsubscribes take
    turns (``_lock``), and every call on the PubSub sits behind one error boundary:
    whatever it raises (those, ``RedisError``, ``OSError``...), the PubSub is torn down and
    the losers poll; the first subscribe after ``retry_after`` builds a fresh PubSub with
    every channel still waited on. The wake-up channel never fails a call.
    """

    retry_after = 0.1

    def __init__(self, pool: ConnectionPool, *, sharded: bool) -> None:
        self._pool = pool
        self._sharded = sharded
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[bytes, set[Watch]] = {}
        self._lock = asyncio.Lock()
        self._retry_at = -math.inf
        self._down = False

    async def aclose(self) -> None:
        self._waiters.clear()
        async with self._lock:
            if self._pubsub is not None:
                await self._drop(self._pubsub)
        with contextlib.suppress(Exception):  # an accelerator's teardown fails nobody
            await self._pool.disconnect()

    async def add(self, watch: Watch) -> None:
        """Subscribe ``watch`` to its channel; on any failure it polls instead."""
        channel = watch.channel
        watches = self._waiters.setdefault(channel, set())
        watches.add(watch)
        if len(watches) > 1 and self._pubsub is not None:
            return
        async with self._lock:
            pubsub = self._pubsub
            if pubsub is None:
                if asyncio.get_running_loop().time() < self._retry_at:
                    return
                pubsub = PubSub(self._pool, ignore_subscribe_messages=True)
                channels = list(self._waiters)  # a fresh PubSub carries every waiter
            else:
                channels = [channel]
            try:
                await self._subscribe(pubsub, channels)
            except Exception as exc:
                self._failed(exc)
                await self._drop(pubsub)
                return
            self._pubsub = pubsub
            self._restored()
            if self._reader is None or self._reader.done():
                self._reader = asyncio.get_running_loop().create_task(self._read(pubsub))

    def _subscribe(self, pubsub: PubSub, channels: list[bytes]) -> Awaitable[Any]:
        return (pubsub.ssubscribe if self._sharded else pubsub.subscribe)(*channels)

    async def remove(self, watch: Watch) -> None:
        channel = watch.channel
        watches = self._waiters.get(channel)
        if watches is None:
            return
        watches.discard(watch)
        if watches:
            return
        del self._waiters[channel]
        async with self._lock:
            pubsub = self._pubsub
            if pubsub is None:
                return
            try:
                await (pubsub.sunsubscribe if self._sharded else pubsub.unsubscribe)(channel)
            except Exception as exc:
                self._failed(exc)
                await self._drop(pubsub)

    async def _read(self, pubsub: PubSub) -> None:
        while self._waiters and self._pubsub is pubsub:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except Exception as exc:
                # Not redis-py's own reconnect: it would race the subscribers' writes.
                self._failed(exc)
                async with self._lock:
                    await self._drop(pubsub)
                return
            if message is not None and message.get("type") in ("message", "smessage"):
                for watch in self._waiters.get(message["channel"], ()):
                    watch.seeded = message["data"]
                    watch.event.set()

    async def _drop(self, pubsub: PubSub) -> None:
        """Tear ``pubsub`` down (the caller holds ``_lock``); the next subscribe after
        ``retry_after`` builds a new one."""
        if self._pubsub is pubsub:
            self._pubsub = None
            self._retry_at = asyncio.get_running_loop().time() + self.retry_after
            reader = self._reader
            if reader is not None and reader is not asyncio.current_task():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
        with contextlib.suppress(Exception):  # closing a broken connection may fail too
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _failed(self, exc: Exception) -> None:
        # Once per outage: a retry every 0.1 s would otherwise log ten lines a second.
        if self._down:
            log.debug("seed notifications still down: %s: %s", type(exc).__name__, exc)
            return
        self._down = True
        log.warning(
            "seed notifications down, losers fall back to backoff: %s: %s",
            type(exc).__name__,
            exc,
            extra={"outcome": "pubsub_down"},
        )

    def _restored(self) -> None:
        if self._down:
            self._down = False
            log.info("seed notifications restored", extra={"outcome": "pubsub_restored"})
