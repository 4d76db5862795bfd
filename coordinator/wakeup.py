"""Waking a rebuild's losers the moment the winner seeds.

Losers back off between re-reads of the key (tenacity, random exponential). Left alone,
that backoff decides how long after the seed they notice it. The seed script PUBLISHes on
the counter's channel when it writes, and a loser's backoff sleep ends early when that
message arrives. One pub/sub connection per coordinator carries every channel it waits on.

Pub/sub is an accelerator only: a message lost to a reconnect, or sent before the loser's
SUBSCRIBE reached the server, costs at most one backoff interval, never correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from .keys import seed_channel

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


class SeedSignals:
    def __init__(self, client: Redis, *, enabled: bool = True) -> None:
        self._client = client
        self._enabled = enabled
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[bytes, set[asyncio.Event]] = {}
        self._down = False

    @contextlib.asynccontextmanager
    async def watch(self, key: str) -> AsyncIterator[Sleep]:
        """A sleep function for ``key``'s backoff that returns early when ``key`` is seeded.

        Subscribes on the first sleep, so a flight that wins its lease at once costs nothing.
        """
        if not self._enabled:
            yield asyncio.sleep
            return
        channel = seed_channel(key).encode()
        seeded = asyncio.Event()
        subscribed = False

        async def sleep(seconds: float) -> None:
            nonlocal subscribed
            if not subscribed:
                subscribed = True
                await self._add(channel, seeded)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(seeded.wait(), seconds)
            seeded.clear()

        try:
            yield sleep
        finally:
            if subscribed:
                await self._remove(channel, seeded)

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._pubsub is not None:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _add(self, channel: bytes, event: asyncio.Event) -> None:
        events = self._waiters.setdefault(channel, set())
        events.add(event)
        if len(events) > 1:
            return
        try:
            if self._pubsub is None:
                self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            await self._pubsub.subscribe(channel)
        except RedisError as exc:
            self._failed(exc)
            return
        self._restored()
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read(self._pubsub))

    async def _remove(self, channel: bytes, event: asyncio.Event) -> None:
        events = self._waiters.get(channel)
        if events is None:
            return
        events.discard(event)
        if events:
            return
        del self._waiters[channel]
        if self._pubsub is not None:
            with contextlib.suppress(RedisError):
                await self._pubsub.unsubscribe(channel)

    async def _read(self, pubsub: PubSub) -> None:
        while self._waiters:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except RedisError as exc:
                # redis-py reconnects and resubscribes on the next read; until then the
                # losers fall back to their backoff.
                self._failed(exc)
                await asyncio.sleep(0.1)
                continue
            self._restored()
            if message is not None and message.get("type") == "message":
                for event in self._waiters.get(message["channel"], ()):
                    event.set()

    def _failed(self, exc: RedisError) -> None:
        # Once per outage: a retry every 0.1 s would otherwise log ten lines a second.
        if self._down:
            log.debug("seed notifications still down: %s", exc)
            return
        self._down = True
        log.warning(
            "seed notifications down, losers fall back to backoff: %s",
            exc,
            extra={"outcome": "pubsub_down"},
        )

    def _restored(self) -> None:
        if self._down:
            self._down = False
            log.info("seed notifications restored", extra={"outcome": "pubsub_restored"})
