"""Waking a rebuild's losers the moment the winner seeds.

Losers back off between re-reads of the key (tenacity, random exponential). Left alone,
that backoff decides how long after the seed they notice it. The seed script PUBLISHes on
the counter's channel when it writes, and a loser's backoff sleep ends early when that
message arrives. One pub/sub connection per coordinator carries every channel it waits on.

Pub/sub is an accelerator only: a message lost to a reconnect, or sent before the loser's
SUBSCRIBE reached the server, costs at most one backoff interval, never correctness. So no
failure of the pub/sub connection fails a call: redis-py's PubSub, shared by the reader
and the flights that (un)subscribe, can fail a reconnect with errors that are not
``RedisError`` (``RuntimeError: readuntil() called while another coroutine is already
waiting``, an ``AttributeError`` on a writer gone), and those mean "down" too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

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


class SeedSignals:
    def __init__(self, client: Redis, *, enabled: bool = True) -> None:
        self._client = client
        self._enabled = enabled
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[bytes, set[Watch]] = {}
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
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._pubsub is not None:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def add(self, watch: Watch) -> None:
        channel = watch.channel
        watches = self._waiters.setdefault(channel, set())
        watches.add(watch)
        if len(watches) > 1:
            return
        try:
            if self._pubsub is None:
                self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            await self._pubsub.subscribe(channel)
        except Exception as exc:  # see the module docstring: never fail the call
            self._failed(exc)
            return
        self._restored()
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read(self._pubsub))

    async def _remove(self, watch: Watch) -> None:
        channel = watch.channel
        watches = self._waiters.get(channel)
        if watches is None:
            return
        watches.discard(watch)
        if watches:
            return
        del self._waiters[channel]
        if self._pubsub is not None:
            try:
                await self._pubsub.unsubscribe(channel)
            except Exception as exc:  # see the module docstring: never fail the call
                self._failed(exc)

    async def _read(self, pubsub: PubSub) -> None:
        while self._waiters:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except Exception as exc:
                # redis-py reconnects and resubscribes on the next read; until then the
                # losers fall back to their backoff.
                self._failed(exc)
                await asyncio.sleep(0.1)
                continue
            self._restored()
            if message is not None and message.get("type") == "message":
                for watch in self._waiters.get(message["channel"], ()):
                    watch.seeded = message["data"]
                    watch.event.set()

    def _failed(self, exc: Exception) -> None:
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
