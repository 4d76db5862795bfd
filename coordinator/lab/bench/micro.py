"""In-process measurements of the bench: the hot path and the lease cost.

Both compare variants in alternating blocks (the order flipped every block), so that the
load of a shared machine, which drifts over seconds, weighs on each side alike; the ratios
are medians of per-block ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ...coordinator import ReseedCoordinator
from ...keys import fence_key
from ...lock import LeaseManager, QuorumUnavailable, lock_client
from ..embedded import RedisServer
from ..pods import Timeouts
from ..race import percentile
from ..servers import Servers

Call = Callable[[], Awaitable[object]]

LEASE = 10.0  # the coordinator's default lease


@dataclass(frozen=True)
class MicroPlan:
    blocks: int  # alternating blocks per comparison
    hot_calls: int  # calls per hot-path block, spread over the concurrent tasks
    concurrencies: tuple[int, ...]
    lock_ops: int  # acquire+release cycles per lock block


def alternating(blocks: int, names: Sequence[str]) -> list[list[str]]:
    """The block schedule: every name once per block, the order rotated each block."""
    return [[*names[b % len(names) :], *names[: b % len(names)]] for b in range(blocks)]


def _ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    return round(statistics.median(n / d for n, d in zip(numerators, denominators, strict=True)), 3)


# -- hot path ------------------------------------------------------------------------------


async def _rate(call: Call, concurrency: int, calls: int) -> float:
    """Calls per second of ``concurrency`` tasks making ``calls`` calls between them."""
    each = max(1, calls // concurrency)

    async def task() -> None:
        for _ in range(each):
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(task() for _ in range(concurrency)))
    return each * concurrency / (time.perf_counter() - started)


async def hot_path(servers: Servers, plan: MicroPlan, timeouts: Timeouts) -> dict[str, Any]:
    """``get`` on a present counter against a raw ``GET`` on the coordinator's own client."""
    key = f"bench:hot:{uuid.uuid4().hex[:12]}"
    coordinator = ReseedCoordinator.from_urls(
        servers.redis_url,
        lock_urls=list(servers.lock_urls),
        socket_timeout=timeouts.socket_timeout,
        lock_timeout=timeouts.lock_timeout,
        ttl=None,
    )

    async def load() -> float:
        return 100.0

    calls: dict[str, Call] = {
        "get": lambda: coordinator.get(key, load),
        "raw_get": lambda: coordinator.store.get(key),
    }
    try:
        await coordinator.get(key, load)
        results = []
        for concurrency in plan.concurrencies:
            # One untimed block opens the pool's connections for this concurrency.
            for call in calls.values():
                await _rate(call, concurrency, plan.hot_calls)
            rates: dict[str, list[float]] = {name: [] for name in calls}
            for order in alternating(plan.blocks, list(calls)):
                for name in order:
                    rates[name].append(await _rate(calls[name], concurrency, plan.hot_calls))
            get_rate = statistics.median(rates["get"])
            raw_rate = statistics.median(rates["raw_get"])
            results.append(
                {
                    "concurrency": concurrency,
                    "get_calls_per_s": round(get_rate),
                    "raw_get_calls_per_s": round(raw_rate),
                    "get_us": round(1e6 * concurrency / get_rate, 1),
                    "raw_get_us": round(1e6 * concurrency / raw_rate, 1),
                    # time per call of get over raw GET: 1.0 means free
                    "ratio": _ratio(rates["raw_get"], rates["get"]),
                }
            )
    finally:
        await coordinator.store.delete(key, fence_key(key))
        await coordinator.aclose()
    return {
        "blocks": plan.blocks,
        "calls_per_block": plan.hot_calls,
        "note": "us: the mean latency of a call with `concurrency` calls in flight",
        "by_concurrency": results,
    }


# -- lease cost ----------------------------------------------------------------------------


async def _cycle(manager: LeaseManager, name: str) -> bool:
    """One acquire+release, as the miss path does it; whether the lease was won."""
    try:
        lease = await manager.try_acquire(name, 0, lambda: None)
    except QuorumUnavailable:
        return False
    if lease is None:
        return False
    lease.hold()
    await lease.let_go()
    return True


async def _block(manager: LeaseManager, name: str, ops: int) -> tuple[list[float], int]:
    """Each cycle's ms, and how many failed to win the lease."""
    latencies, failed = [], 0
    for _ in range(ops):
        started = time.perf_counter()
        failed += not await _cycle(manager, name)
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies, failed


@contextlib.contextmanager
def _expected_master_errors() -> Iterator[None]:
    """The master we kill makes the lock module warn about failing masters: on purpose."""
    logger = logging.getLogger("coordinator.lock")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


async def _lock_blocks(
    managers: dict[str, LeaseManager], victim: RedisServer | None, plan: MicroPlan
) -> tuple[dict[str, list[list[float]]], dict[str, int]]:
    """Each config's blocks of cycle times, and its cycles that did not win the lease."""
    name = f"bench:lock:{uuid.uuid4().hex[:12]}"
    samples: dict[str, list[list[float]]] = {config: [] for config in managers}
    failures = dict.fromkeys(managers, 0)
    for config in managers:
        await _block(managers[config], name, 3)  # connections and scripts
    for order in alternating(plan.blocks, list(managers)):
        for config in order:
            down = victim if config.endswith("down") else None
            if down is not None:
                down.kill()
            latencies, failed = await _block(managers[config], name, plan.lock_ops)
            if down is not None:
                down.start()
                await _block(managers[config], name, 2)  # drop the dead connection
            samples[config].append(latencies)
            failures[config] += failed
    return samples, failures


async def lock_cost(
    lock_urls: Sequence[str], victim: RedisServer | None, plan: MicroPlan, timeouts: Timeouts
) -> dict[str, Any]:
    """Lease acquire+release on 1 and 3 masters, and (when ``victim``, the third master,
    is ours to kill) on 3 masters with that one down: killed before its block, restarted
    after, and reconnected outside the timing."""
    clients = [lock_client(url, timeout=timeouts.lock_timeout) for url in lock_urls[:3]]
    managers = {"1 master": LeaseManager(clients[:1], duration=LEASE, extensions=None)}
    notes = []
    if len(clients) == 3:
        managers["3 masters"] = LeaseManager(clients, duration=LEASE, extensions=None)
        if victim is not None:
            managers["3 masters, 1 down"] = managers["3 masters"]
        else:
            notes.append("1 of 3 down: skipped, the lock masters are not embedded (--lock-url)")
    else:
        notes.append(f"3 masters: skipped, {len(clients)} lock master(s) given")
    try:
        with _expected_master_errors():
            samples, failures = await _lock_blocks(managers, victim, plan)
    finally:
        for client in clients:
            await client.aclose()
    results = []
    for config in managers:
        pooled = sorted(ms for block in samples[config] for ms in block)
        results.append(
            {
                "config": config,
                "n": len(pooled),
                "p50_ms": round(percentile(pooled, 50) or 0.0, 3),
                "p99_ms": round(percentile(pooled, 99) or 0.0, 3),
                "cycles_per_s": round(1000 * len(pooled) / sum(pooled)),
                "failed": failures[config],
            }
        )
    medians = {config: [statistics.median(b) for b in samples[config]] for config in managers}
    ratios = {}
    if "3 masters" in medians:
        ratios["3_over_1_p50"] = _ratio(medians["3 masters"], medians["1 master"])
    if "3 masters, 1 down" in medians:
        ratios["down_over_healthy_p50"] = _ratio(medians["3 masters, 1 down"], medians["3 masters"])
    return {
        "blocks": plan.blocks,
        "cycles_per_block": plan.lock_ops,
        "by_config": results,
        "ratios": ratios,
        "notes": notes,
    }
