"""BudgetGuard.check on warm counters against raw redis-py GETs, in one interleaved run.

    .venv/bin/python benchmarks/bench_budget.py [--rounds 30] [--iterations 300] [--redis-url URL]

Variants (all on the same client, so the same connection pool and socket settings):

* ``check x5``: ``BudgetGuard.check`` of 5 scopes with budgets (one MGET);
* ``GET x5``: 5 sequential ``GET``s, what a per-scope budget check costs without batching;
* ``MGET x5``: one raw ``MGET`` of the same keys, the floor for ``check x5``;
* ``check x1`` and ``GET x1``: a single scope.

Each round times ``iterations`` calls of every variant, in an order rotated per round, so
machine noise lands on all of them alike; the result is each variant's median per-call time
over the rounds, and the ratios. The counter store is an embedded redis-server unless
``--redis-url`` is given (its counters are overwritten under the ``bench`` namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator

from coordinator import ReseedCoordinator
from coordinator.budget import BudgetGuard, EntityId, Scope
from coordinator.lab.cliargs import positive_int
from coordinator.lab.embedded import RedisServer

ENTITIES: list[tuple[Scope, EntityId, float]] = [
    ("key", "sk-4f2a9c", 100.0),
    ("team", "team-7", 1000.0),
    ("team_member", ("team-7", "user-3"), 500.0),
    ("user", "user-3", 1000.0),
    ("org", "org-1", 10000.0),
]


class ConstantSource:
    """Never read: every counter is warm."""

    async def fetch(self, scope: Scope, entity_id: EntityId) -> float:
        raise AssertionError(f"unexpected rebuild of {scope} {entity_id!r}")


@contextlib.contextmanager
def _store(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url


async def _time(call: Callable[[], Awaitable[object]], iterations: int) -> float:
    started = time.perf_counter()
    for _ in range(iterations):
        await call()
    return (time.perf_counter() - started) / iterations * 1e6


async def bench(url: str, rounds: int, iterations: int) -> dict[str, float]:
    """Median microseconds per call of each variant."""
    async with ReseedCoordinator.from_urls(url) as coordinator:
        guard = BudgetGuard(coordinator, ConstantSource(), write_mode="lagging", namespace="bench")
        client = coordinator.store
        keys = [guard.key(scope, entity_id) for scope, entity_id, _ in ENTITIES]
        for key in keys:
            await client.set(key, "12.5")

        async def gets() -> None:
            for key in keys:
                await client.get(key)

        variants: dict[str, Callable[[], Awaitable[object]]] = {
            "check x5": lambda: guard.check(ENTITIES),
            "GET x5": gets,
            "MGET x5": lambda: client.mget(keys),
            "check x1": lambda: guard.check(ENTITIES[:1]),
            "GET x1": lambda: client.get(keys[0]),
        }
        names = list(variants)
        samples: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(rounds + 1):  # round 0 warms up and is dropped
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                per_call = await _time(variants[name], iterations)
                if round_:
                    samples[name].append(per_call)
        await client.delete(*keys)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=30)
    parser.add_argument("--iterations", type=positive_int, default=300)
    parser.add_argument("--redis-url", help="counter store (default: an embedded redis-server)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    with _store(args.redis_url) as url:
        medians = asyncio.run(bench(url, args.rounds, args.iterations))
    ratios = {
        "check x5 / GET x5": medians["check x5"] / medians["GET x5"],
        "check x5 / MGET x5": medians["check x5"] / medians["MGET x5"],
        "check x1 / GET x1": medians["check x1"] / medians["GET x1"],
    }
    command = (
        f"python benchmarks/bench_budget.py --rounds {args.rounds} --iterations {args.iterations}"
    )
    if args.json:
        document = {"us_per_call": medians, "ratios": ratios, "command": command}
        print(json.dumps(document, indent=2, cls=json.JSONEncoder))
        return 0
    for name, us in medians.items():
        print(f"{name:>10}  {us:8.1f} us/call (median of {args.rounds} rounds)")
    for name, ratio in ratios.items():
        print(f"{name:>20}  {ratio:.2f}")
    print(f"reproduce: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
