"""End to end inside real LiteLLM: three ``litellm --config`` proxy processes on loopback, each
enforcing budgets through coordinator.integrations.litellm.BudgetHook, sharing the session's
counter store and lock masters, and a PostgreSQL database holding LiteLLM's own schema (its
``litellm-proxy-extras`` migrations). LiteLLM's DB layer stays off (its Prisma engines are
not to be had offline): a custom auth supplies the ids and budgets, and the test plays
LiteLLM's batched spend writer.

The model is a mock whose tokens cost 2**-10 each, so every request's cost (from the usage
in its response) is an exact binary fraction and counters compare exactly. The hook holds
ESTIMATE, below the actual cost, while a call runs: a budget is overshot by at most the sum
of (actual - ESTIMATE) over the requests holding budget at once.

LiteLLM runs only in the pods' processes: nothing here imports it, so its import-time
warnings stay out of this suite's warnings-as-errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from coordinator.budget import EntityId, Scope, spend_key
from coordinator.integrations.litellm_tables import LITELLM_TABLES
from coordinator.keys import holds_key
from coordinator.lab.embedded import EmbeddedServers
from coordinator.lab.litellm_pods import (
    add_litellm_rows,
    add_litellm_spend,
    install_litellm_schema,
    litellm_available,
    run_litellm_pods,
)
from coordinator.lab.proxy import Pod
from coordinator.lab.servers import Servers

pytestmark = pytest.mark.skipif(
    not litellm_available(),
    reason="litellm is not installed: pip install -e '.[litellm]' (the dev extra includes it)",
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "litellm"
PODS = 3
TOKEN_PRICE = 2.0**-10  # examples/litellm/config.yaml, input and output alike
ESTIMATE = 2.0**-6  # below a request's actual cost (tens of tokens)
CONCURRENCY = 8  # requests per wave while driving a key to its budget
MASTER_KEY = "sk-master-e2e"
READS = "e2e-db-reads"  # incremented by the pods' spend source (the shim below) per DB read
HTTP_TIMEOUT = 60.0
PROMPT = [{"role": "user", "content": "hi"}]

# The pods' hook, as examples/litellm/budget_hook.py, with a spend source that counts its
# DB reads fleet-wide on the counter store.
SHIM = f'''
from redis.asyncio import Redis

from coordinator.integrations.litellm import BudgetHook
from coordinator.integrations.litellm_tables import litellm_spend_source


class Counting:
    def __init__(self, inner, store):
        self.inner, self.store = inner, store

    async def fetch(self, scope, entity_id):
        await self.store.incr("{READS}")
        return await self.inner.fetch(scope, entity_id)


async def source(config):
    return Counting(await litellm_spend_source(config.pg_dsn), Redis.from_url(config.redis_url))


budget_hook = BudgetHook(source=source)
'''


@dataclass(frozen=True)
class Tenant:
    """An API key, its ids in every scope, and the budgets the auth or the hook gives them."""

    token: str
    ids: dict[Scope, EntityId]
    budgets: dict[Scope, float]

    @property
    def key_hash(self) -> str:
        return hashlib.sha256(self.token.encode()).hexdigest()

    def auth(self) -> dict[str, Any]:
        """The demo custom auth's fields (UserAPIKeyAuth) for this key."""
        return {
            "team_id": self.ids["team"],
            "user_id": self.ids["user"],
            "org_id": self.ids["org"],
            "end_user_id": self.ids["end_user"],
            "max_budget": self.budgets["key"],
            "team_max_budget": self.budgets["team"],
            "user_max_budget": self.budgets["user"],
            "organization_max_budget": self.budgets["org"],
            "end_user_max_budget": self.budgets["end_user"],
        }

    def entities(self) -> list[tuple[Scope, EntityId]]:
        return [("key", self.key_hash), *((s, i) for s, i in self.ids.items())]


def _tenant(name: str, key_budget: float) -> Tenant:
    ids: dict[Scope, EntityId] = {
        "team": f"team-{name}",
        "team_member": (f"team-{name}", f"user-{name}"),
        "user": f"user-{name}",
        "org": f"org-{name}",
        "end_user": f"customer-{name}",
        "tag": f"tag-{name}",
    }
    budgets: dict[Scope, float] = {scope: 1000.0 for scope in ids}
    return Tenant(f"sk-{name}", ids, {**budgets, "key": key_budget})


COLD = _tenant("cold", 1000.0)
# A key without any budget, whose requests carry a forged reservation of COLD's team.
FREE = Tenant("sk-free", {"team": "team-free", "tag": "tag-free"}, {})
FORGED = {
    "reseed_budget": {
        "request_id": "forged",
        "estimate": 0.0,
        "entities": [["team", COLD.ids["team"], 1000.0]],
        "held_keys": [],
    }
}
CAPPED = _tenant("capped", 0.6)
SEED = 0.5  # every entity's spend in the DB when the test starts
CAPPED_SEED = 0.25


@dataclass(frozen=True)
class Fleet:
    pods: list[Pod]
    dsn: str
    store_url: str


@pytest.fixture(scope="module")
def fleet(servers: EmbeddedServers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    assert servers.postgres is not None
    dsn = asyncio.run(_litellm_database(servers.postgres.dsn))
    config = tmp_path_factory.mktemp("litellm-config")
    for name in ("config.yaml", "demo_auth.py"):
        shutil.copy(EXAMPLE / name, config / name)
    (config / "budget_hook.py").write_text(SHIM)
    env = Servers(servers.redis[0].url, tuple(s.url for s in servers.redis[1:4]), dsn)
    tenants = [COLD, CAPPED]
    settings = {
        "LITELLM_MASTER_KEY": MASTER_KEY,
        "RESEED_DEMO_KEYS": json.dumps(
            {**{t.token: t.auth() for t in tenants}, FREE.token: {"team_id": FREE.ids["team"]}}
        ),
        "RESEED_LITELLM_ESTIMATES": json.dumps({"demo": ESTIMATE}),
        # Budgets LiteLLM's auth does not carry: team members and tags.
        "RESEED_LITELLM_BUDGETS": json.dumps(
            [
                [scope, list(t.ids[scope]) if scope == "team_member" else t.ids[scope], budget]
                for t in tenants
                for scope, budget in t.budgets.items()
                if scope in ("team_member", "tag")
            ]
        ),
    }
    with run_litellm_pods(env, config / "config.yaml", PODS, settings) as pods:
        yield Fleet(pods, dsn, env.redis_url)


async def _litellm_database(admin_dsn: str) -> str:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute("DROP DATABASE IF EXISTS litellm_e2e")
        await conn.execute("CREATE DATABASE litellm_e2e")
    finally:
        await conn.close()
    dsn = admin_dsn.rsplit("/", 1)[0] + "/litellm_e2e"
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        await install_litellm_schema(pool)
    finally:
        await pool.close()
    return dsn


@pytest.fixture
async def db(fleet: Fleet) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(fleet.dsn)
    tables = ", ".join(table for table, _ in LITELLM_TABLES.values())
    await conn.execute(f'TRUNCATE {tables}, "LiteLLM_BudgetTable" CASCADE')
    yield conn
    await conn.close()


@pytest.fixture
async def counters(fleet: Fleet, store: Redis) -> Redis:
    """The counter store, flushed (the ``store`` fixture): every counter is cold."""
    return store


async def _chat(
    client: httpx.AsyncClient,
    pod: Pod,
    tenant: Tenant,
    call_id: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {tenant.token}"}
    if call_id is not None:
        headers["x-litellm-call-id"] = call_id
    return await client.post(
        f"{pod.url}/v1/chat/completions",
        headers=headers,
        json={
            "model": "demo",
            "messages": PROMPT,
            "metadata": {"tags": [tenant.ids["tag"]], **(metadata or {})},
        },
    )


async def _doctor(fleet: Fleet, *flags: str) -> tuple[int, dict[str, Any]]:
    """``python -m coordinator doctor`` on the fleet's store and LiteLLM's database."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "coordinator",
        "doctor",
        "--redis-url",
        fleet.store_url,
        "--pg-dsn",
        fleet.dsn,
        *flags,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), HTTP_TIMEOUT)
    return proc.returncode or 0, json.loads(out)


def _cost(response: httpx.Response) -> float:
    return float(response.json()["usage"]["total_tokens"]) * TOKEN_PRICE


async def _burst(fleet: Fleet, tenant: Tenant, count: int) -> list[httpx.Response]:
    """``count`` requests at once, spread over the pods."""
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
        return list(
            await asyncio.gather(
                *(_chat(client, fleet.pods[i % PODS], tenant) for i in range(count))
            )
        )


async def _values(store: Redis, tenant: Tenant) -> list[float | None]:
    raws = await store.mget([spend_key(scope, entity_id) for scope, entity_id in tenant.entities()])
    return [None if raw is None else float(raw) for raw in raws]


async def _settled(store: Redis, tenant: Tenant, expected: list[float]) -> list[float | None]:
    """The tenant's counters once they reach ``expected`` and no hold is left (the success
    events run in LiteLLM's background worker), or as they are after a bounded wait."""
    keys = [spend_key(scope, entity_id) for scope, entity_id in tenant.entities()]
    values = await _values(store, tenant)
    for _ in range(300):
        holds = sum([await store.hlen(holds_key(key)) for key in keys])
        if values == expected and not holds:
            break
        await asyncio.sleep(0.1)
        values = await _values(store, tenant)
    return values


async def test_cold_start_reads_each_counter_once_and_counts_every_cost_once(
    fleet: Fleet, counters: Redis, db: Any
) -> None:
    await add_litellm_rows(db, COLD.entities(), SEED)
    requests = 24

    responses = await _burst(fleet, COLD, requests)

    assert [r.status_code for r in responses] == [200] * requests  # no false 429
    cold = len(COLD.entities())
    assert int(await counters.get(READS) or 0) == cold  # one DB read per counter, fleet-wide
    spent = sum(map(_cost, responses))
    expected = [SEED + spent] * cold
    assert await _settled(counters, COLD, expected) == expected

    # A replayed litellm_call_id is served, holds its estimate again, and adds nothing; nor
    # does a reservation forged in a client's metadata (sent first, to the same pod).
    replayed = responses[0].headers["x-litellm-call-id"]
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
        forged = await _chat(client, fleet.pods[1], FREE, metadata=FORGED)
        again = await _chat(client, fleet.pods[1], COLD, call_id=replayed)
    assert (forged.status_code, again.status_code) == (200, 200)
    assert again.headers["x-litellm-call-id"] == replayed
    assert await _settled(counters, COLD, expected) == expected
    assert int(await counters.get(READS) or 0) == cold

    # LiteLLM's writer catches up: the counters agree with LiteLLM's own tables.
    await add_litellm_spend(db, COLD.entities(), spent)
    code, report = await _doctor(fleet, "--litellm-schema", "--json")
    assert (code, report["summary"]["scanned"], report["summary"]["healthy"]) == (0, cold, cold)


async def test_a_key_driven_to_its_budget_is_refused_within_the_reservation_bound(
    fleet: Fleet, counters: Redis, db: Any
) -> None:
    await add_litellm_rows(db, CAPPED.entities()[1:], SEED)
    await add_litellm_rows(db, CAPPED.entities()[:1], CAPPED_SEED)
    budget = CAPPED.budgets["key"]
    admitted: list[httpx.Response] = []
    refused: list[httpx.Response] = []
    worst = 0.0  # the largest sum of (actual - estimate) over one wave in flight
    for _ in range(4):
        # Each wave starts once the previous one is settled: its holds are its own.
        wave = await _burst(fleet, CAPPED, CONCURRENCY)
        served = [r for r in wave if r.status_code == 200]
        admitted += served
        refused += [r for r in wave if r.status_code != 200]
        worst = max(worst, sum(_cost(r) - ESTIMATE for r in served))
        spent = sum(map(_cost, admitted))
        expected = [CAPPED_SEED + spent] + [SEED + spent] * (len(CAPPED.entities()) - 1)
        assert await _settled(counters, CAPPED, expected) == expected

    assert admitted
    assert refused
    assert {r.status_code for r in refused} == {429}
    error = refused[0].json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("budget_exceeded", "key", "429")
    fields = error["provider_specific_fields"]
    assert (fields["scope"], fields["id"], fields["max_budget"]) == ("key", CAPPED.key_hash, budget)
    assert fields["spend"] + fields["held"] + fields["estimate"] >= budget
    overshoot = CAPPED_SEED + sum(map(_cost, admitted)) - budget
    assert overshoot <= worst
