"""End to end: three uvicorn proxy pods (coordinator.lab.proxy_app, each its own OS process with its
own coordinator) on the session's servers, driven over HTTP by concurrent httpx clients.

Every request costs COST (an exact binary fraction, so counters and DB spend compare
exactly) and touches seven entities, one of every scope. The overshoot bound: a request is
admitted when its check reads spend < budget, and the counter then holds every cost
recorded before that read, so at most the requests in flight (CONCURRENCY, each counted
once) are admitted past a budget: final spend < budget + CONCURRENCY * COST.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from coordinator.budget import EntityId, Scope, spend_key
from coordinator.budget.spend_source import PostgresSpendSource
from coordinator.lab.embedded import EmbeddedServers
from coordinator.lab.proxy import DEMO_KEY, Pod, add_api_key, run_pods
from coordinator.lab.race import Servers

PODS = 3
COST = 0.5
LATENCY_MS = 30
CONCURRENCY = 8
MASTER_KEY = "sk-master-e2e"
HTTP_TIMEOUT = 15.0


@dataclass(frozen=True)
class Tenant:
    """An API key and the six other entities a request with it touches."""

    token: str
    key_hash: str
    entities: tuple[tuple[Scope, EntityId], ...]


@pytest.fixture(scope="module")
def fleet(servers: EmbeddedServers) -> Iterator[tuple[Servers, list[Pod]]]:
    assert servers.postgres is not None
    env = Servers(
        servers.redis[0].url, tuple(s.url for s in servers.redis[1:4]), servers.postgres.dsn
    )
    asyncio.run(_install(env.pg_dsn))
    settings = {
        "DEBUG": "1",
        "MASTER_KEY": MASTER_KEY,
        "LATENCY_MS": str(LATENCY_MS),
        # A busy 2-core machine must not turn a slow reply into a store or lock failure.
        "SOCKET_TIMEOUT": "3",
        "LOCK_TIMEOUT": "1",
    }
    with run_pods(env, PODS, settings) as pods:
        yield env, pods
        logs = {pod.name: pod.log_tail() for pod in pods}
    # Pods answer errors as JSON; anything in a log (warning level) is a failure to look at.
    problems = ("Traceback", "WARNING", "ERROR")
    assert not any(word in text for text in logs.values() for word in problems), logs


async def _install(dsn: str) -> None:
    async with await PostgresSpendSource.connect(dsn) as source:
        await source.install_schema()
        await source.pool.execute(
            "TRUNCATE budget_entity, team_member, api_key, spend_ledger, spend_outbox"
        )


@pytest.fixture
async def db(fleet: tuple[Servers, list[Pod]]) -> AsyncIterator[PostgresSpendSource]:
    source = await PostgresSpendSource.connect(fleet[0].pg_dsn, max_size=2)
    yield source
    await source.aclose()


@pytest.fixture
async def counters(fleet: tuple[Servers, list[Pod]]) -> AsyncIterator[Redis]:
    client = Redis.from_url(fleet[0].redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=CONCURRENCY * 2)
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, limits=limits) as client:
        yield client


async def _tenant(
    db: PostgresSpendSource, counters: Redis, key_budget: float, others: float
) -> Tenant:
    """Fresh entities with budgets, spend 0, and no counters."""
    tag = uuid.uuid4().hex[:8]
    team, user, org = f"team {tag}", f"user:{tag}", f"org%{tag}"
    token = f"sk-{tag}"
    key_hash = await add_api_key(db.pool, token, team_id=team, user_id=user, org_id=org)
    entities: tuple[tuple[Scope, EntityId], ...] = (
        ("key", key_hash),
        ("team", team),
        ("team_member", (team, user)),
        ("user", user),
        ("org", org),
        ("end_user", f"customer {tag}"),
        ("tag", f"prod:{tag}"),
    )
    for scope, entity_id in entities:
        await db.set_budget(scope, entity_id, key_budget if scope == "key" else others)
    keys = [spend_key(scope, entity_id) for scope, entity_id in entities]
    await counters.delete(*keys)
    assert await counters.exists(*keys) == 0
    return Tenant(token, key_hash, entities)


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    key_spend: float | None
    started: float


async def _ask(http: httpx.AsyncClient, pod: Pod, tenant: Tenant) -> Reply:
    end_user, tag = tenant.entities[5][1], tenant.entities[6][1]
    started = time.monotonic()
    response = await http.post(
        f"{pod.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {tenant.token}"},
        json={
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "user": end_user,
            "metadata": {"tags": [tag]},
            "mock_cost": COST,
        },
    )
    spend = response.headers.get("x-litellm-key-spend")
    return Reply(
        response.status_code, response.json(), None if spend is None else float(spend), started
    )


async def _drive(
    http: httpx.AsyncClient,
    pods: list[Pod],
    tenant: Tenant,
    total: int,
    *,
    stop_on_429: bool = False,
    after: tuple[int, Any] | None = None,
) -> list[Reply]:
    """``total`` requests (at most), CONCURRENCY at a time, round-robin over the pods.
    ``after=(n, coroutine function)`` runs it once n replies have arrived."""
    replies: list[Reply] = []
    numbers = itertools.count()
    done = asyncio.Event()
    hook: asyncio.Task[Any] | None = None

    async def worker() -> None:
        nonlocal hook
        while not done.is_set() and (n := next(numbers)) < total:
            reply = await _ask(http, pods[n % len(pods)], tenant)
            replies.append(reply)
            if stop_on_429 and reply.status == 429:
                done.set()
            if after is not None and hook is None and len(replies) >= after[0]:
                hook = asyncio.create_task(after[1]())

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))), 60)
    if hook is not None:
        await hook
    return replies


async def _stats(http: httpx.AsyncClient, pods: list[Pod]) -> list[dict[str, Any]]:
    responses = await asyncio.gather(*(http.get(f"{pod.url}/_stats") for pod in pods))
    return [response.json() for response in responses]


def _summed(stats: list[dict[str, Any]], name: str) -> int:
    return sum(pod["coordinator"][name] for pod in stats)


async def _spends(
    db: PostgresSpendSource, counters: Redis, tenant: Tenant
) -> list[tuple[float, float | None]]:
    """(DB spend, counter) per entity."""
    keys = [spend_key(scope, entity_id) for scope, entity_id in tenant.entities]
    raws = await counters.mget(keys)
    return [
        (await db.fetch(scope, entity_id), None if raw is None else float(raw))
        for (scope, entity_id), raw in zip(tenant.entities, raws, strict=True)
    ]


async def _ledger_rows(pool: Any, key_hash: str) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM spend_ledger WHERE $1 = ANY(entities)", f"key:{key_hash}"
    )
    return count


async def test_cold_start_zero_false_429s_and_one_db_read_per_counter(
    fleet: tuple[Servers, list[Pod]],
    db: PostgresSpendSource,
    counters: Redis,
    http: httpx.AsyncClient,
) -> None:
    pods = fleet[1]
    requests = 60
    # Budgets equal to the whole run's spend: the last check reads at most (n-1) * COST, so
    # a counter inflated by even one rebuild (the field's bug) refuses requests.
    tenant = await _tenant(db, counters, requests * COST, requests * COST)
    before = await _stats(http, pods)

    replies = await _drive(http, pods, tenant, requests)

    after = await _stats(http, pods)
    assert [reply.status for reply in replies] == [200] * requests
    assert _summed(after, "loader_calls") - _summed(before, "loader_calls") == 7
    assert _summed(after, "lock_degraded") == _summed(after, "fenced_writes") == 0
    assert await _spends(db, counters, tenant) == [(requests * COST, requests * COST)] * 7
    assert await _ledger_rows(db.pool, tenant.key_hash) == requests


async def test_refusals_start_at_the_budget_with_bounded_overshoot(
    fleet: tuple[Servers, list[Pod]],
    db: PostgresSpendSource,
    counters: Redis,
    http: httpx.AsyncClient,
) -> None:
    budget = 10 * COST
    tenant = await _tenant(db, counters, budget, 1000.0)

    replies = await _drive(http, fleet[1], tenant, 200, stop_on_429=True)

    assert {reply.status for reply in replies} == {200, 429}
    served = sum(COST for reply in replies if reply.status == 200)
    refused = [reply.body["error"] for reply in replies if reply.status == 429]
    spends = await _spends(db, counters, tenant)
    assert spends[0] == (served, served)  # the key: counter == DB == what was served
    assert all(db_spend == counter for db_spend, counter in spends)
    # No false 429: each refusal reports the key's real spend, at or over its budget.
    for error in refused:
        assert (error["scope"], error["id"]) == ("key", tenant.key_hash)
        assert budget <= error["spend"] <= served
        assert error["max_budget"] == budget
    overshoot = served - budget
    assert 0 <= overshoot < CONCURRENCY * COST, f"overshoot {overshoot}"
    print(f"budget {budget}, served {served}, overshoot {overshoot}, 429s {len(refused)}")


async def test_a_reset_mid_traffic_restarts_the_counters_from_zero(
    fleet: tuple[Servers, list[Pod]],
    db: PostgresSpendSource,
    counters: Redis,
    http: httpx.AsyncClient,
) -> None:
    pods = fleet[1]
    tenant = await _tenant(db, counters, 1e6, 1e6)
    pre_reset = 500.0
    await db.pool.execute(
        "UPDATE budget_entity SET spend = $1 WHERE scope = 'key' AND entity_id = $2",
        pre_reset,
        tenant.key_hash,
    )
    reset_started = reset_done = float("inf")

    async def reset() -> None:
        nonlocal reset_started, reset_done
        reset_started = time.monotonic()
        response = await http.post(
            f"{pods[1].url}/budget/reset",
            headers={"Authorization": f"Bearer {MASTER_KEY}"},
            json={"scope": "key", "id": tenant.key_hash},
        )
        assert response.status_code == 200, response.text
        reset_done = time.monotonic()

    replies = await _drive(http, pods, tenant, 120, after=(40, reset))

    assert [reply.status for reply in replies] == [200] * 120
    later = [reply for reply in replies if reply.started > reset_done]
    assert later, "no request started after the reset"
    # Checks after the reset never see pre-reset spend again...
    assert all(reply.key_spend is not None and reply.key_spend < pre_reset for reply in later)
    spends = await _spends(db, counters, tenant)
    key_db, key_counter = spends[0]
    assert key_counter == key_db
    # ...and the key's spend is what was recorded after the reset: every request started
    # after it, and of the others at most those started while it ran or in flight then.
    during = [reply for reply in replies if reply.started > reset_started]
    assert len(later) * COST <= key_db <= (len(during) + CONCURRENCY) * COST
    assert spends[1:] == [(120 * COST, 120 * COST)] * 6  # the others were not reset


def test_the_proxy_command_demo_refuses_once_the_key_budget_is_spent(
    fleet: tuple[Servers, list[Pod]], tmp_path: Path
) -> None:
    env = fleet[0]
    out = tmp_path / "proxy.out"
    servers = ["--redis-url", env.redis_url, "--pg-dsn", env.pg_dsn]
    servers += [arg for url in env.lock_urls for arg in ("--lock-url", url)]
    with out.open("wb") as sink:
        command = subprocess.Popen(
            [sys.executable, "-m", "coordinator", "proxy", "--pods", "2", *servers],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "Ctrl-C" not in out.read_text() and command.poll() is None:
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        banner = out.read_text()
        urls = re.findall(r"pod-\d+\s+(http://\S+)", banner)
        assert len(urls) == 2, banner
        statuses = [
            httpx.post(
                f"{urls[n % 2]}/v1/chat/completions",
                headers={"Authorization": f"Bearer {DEMO_KEY}"},
                json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
                timeout=HTTP_TIMEOUT,
            ).status_code
            for n in range(4)
        ]
        assert statuses == [200, 200, 200, 429]  # budget 3, cost 1: the banner says so
        assert "request 4 gets 429" in banner
        command.send_signal(signal.SIGINT)
        assert command.wait(timeout=30) == 0
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
