"""Waking a rebuild's losers the moment the winner seeds.

Losers back off between re-reads of the key (tenacity, random exponential). Left alone,
that backoff decides how long after the seed they notice it. The seed script PUBLISHes on
the counter's channel when it writes, and a loser's backoff sleep ends early when that
message arrives. One pub/sub connection per coordinator carries every channel it waits on.

On a Redis Cluster the seed script's PUBLISH reaches every node over the cluster bus, so
the pub/sub connection goes to one node (the first startup node) and hears every seed; if
that node is down, losers poll.

Pub/sub is an accelerator only: a message lost to a reconnect, or sent before the loser's
SUBSCRIBE reached the server, costs at most one backoff interval, never correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator

from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .keys import seed_channel

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


def _pubsub_pool(client: Redis | RedisCluster) -> ConnectionPool:
    """A pool with ``client``'s settings (for a cluster: its first startup node's) whose
    connections redis-py never reconnects on its own: with no supported errors its retry
    layer skips the failure callback that reconnects (it runs even with zero retries), so
    only :class:`SeedSignals` reconnects."""
    connection_class: type[AbstractConnection]
    if isinstance(client, RedisCluster):
        node = next(iter(client.nodes_manager.startup_nodes.values()))
        kwargs, connection_class = node.connection_kwargs, node.connection_class
    else:
        kwargs = client.connection_pool.connection_kwargs
        connection_class = client.connection_pool.connection_class
    settings = {
        **kwargs,
        "retry": Retry(NoBackoff(), 0, supported_errors=()),
        "retry_on_error": [],
        "retry_on_timeout": False,
    }
    return ConnectionPool(connection_class=connection_class, **settings)


class SeedSignals:
    """The coordinator's one PubSub connection, carrying every channel its flights wait on.

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

    def __init__(self, client: Redis | RedisCluster, *, enabled: bool = True) -> None:
        self._pool = _pubsub_pool(client)
        self._enabled = enabled
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[bytes, set[Watch]] = {}
        self._lock = asyncio.Lock()
        self._retry_at = -math.inf
        self._down = False

    @contextlib.asynccontextmanager
    async def watch(self, key: str) -> AsyncIterator[Watch]:
        """Announcements of ``key``'s seed for one flight (plain backoff when disabled)."""
        watch = Watch(self if self._enabled else None, seed_channel(key).encode())
        try:
            yield watch
        finally:
            if watch.subscribed:
                await self._remove(watch)

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
                await pubsub.subscribe(*channels)
            except Exception as exc:
                self._failed(exc)
                await self._drop(pubsub)
                return
            self._pubsub = pubsub
            self._restored()
            if self._reader is None or self._reader.done():
                self._reader = asyncio.get_running_loop().create_task(self._read(pubsub))

    async def _remove(self, watch: Watch) -> None:
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
                await pubsub.unsubscribe(channel)
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
            if message is not None and message.get("type") == "message":
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
