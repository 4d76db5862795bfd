"""BudgetHook in this process, called as LiteLLM calls it, on the session's real servers.

Only ``coordinator.integrations.litellm`` and LiteLLM's types are imported (not LiteLLM's
proxy server, whose import warns), with LiteLLM's local price map (no fetch at import).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from redis.asyncio import Redis

from coordinator.budget import Entity, spend_key
from coordinator.budget.spend_source import PostgresSpendSource
from coordinator.errors import ConfigurationError
from coordinator.keys import holds_key
from coordinator.lab.embedded import EmbeddedServers

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
hook_module = pytest.importorskip("coordinator.integrations.litellm", exc_type=ImportError)
UserAPIKeyAuth = pytest.importorskip("litellm.proxy._types").UserAPIKeyAuth

BudgetHook = hook_module.BudgetHook
BudgetHTTPException = hook_module.BudgetHTTPException
HookConfig = hook_module.HookConfig
METADATA_KEY = hook_module.METADATA_KEY


def _auth(**fields: Any) -> Any:
    return UserAPIKeyAuth(api_key="sk-test", **fields)


def test_config_from_env_parses_every_setting_and_refuses_bad_ones() -> None:
    env = {
        "RESEED_LITELLM_REDIS_URL": "redis://r",
        "RESEED_LITELLM_PG_DSN": "postgresql://p",
        "RESEED_LITELLM_LOCK_URLS": "redis://a,redis://b",
        "RESEED_LITELLM_ESTIMATES": '{"gpt": 0.5}',
        "RESEED_LITELLM_BUDGETS": '[["team_member", ["t", "u"], 2], ["tag", "prod", 3]]',
        "RESEED_LITELLM_OUTAGE_POLICY": "read-through",
    }
    config = HookConfig.from_env(env)
    assert config.lock_urls == ("redis://a", "redis://b")
    assert config.estimates == {"gpt": 0.5}
    assert config.budgets == (
        Entity("team_member", ("t", "u"), 2.0),
        Entity("tag", "prod", 3.0),
    )
    assert config.outage_policy == "read-through"
    for name, value in [
        ("RESEED_LITELLM_PG_DSN", None),
        ("RESEED_LITELLM_ESTIMATES", '{"gpt": -1}'),
        ("RESEED_LITELLM_ESTIMATES", "[1]"),
        ("RESEED_LITELLM_BUDGETS", '[["planet", "x", 1]]'),
        ("RESEED_LITELLM_BUDGETS", '[["tag", "x"]]'),
        ("RESEED_LITELLM_HOLD_TTL", "soon"),
        ("RESEED_LITELLM_OUTAGE_POLICY", "pray"),
    ]:
        bad = {k: v for k, v in env.items() if k != name}
        if value is not None:
            bad[name] = value
        with pytest.raises(ConfigurationError):
            HookConfig.from_env(bad)


def test_entities_come_from_litellms_auth_then_from_the_config() -> None:
    config = HookConfig(
        "redis://r",
        "postgresql://p",
        budgets=(
            Entity("team_member", ("t", "u"), 2.0),
            Entity("tag", "prod", 3.0),
            Entity("user", "u", 9.0),
            Entity("team", "t", 99.0),
        ),
    )
    auth = _auth(
        team_id="t",
        user_id="u",
        org_id="o",
        end_user_id="e",
        max_budget=1.0,
        team_max_budget=5.0,
        end_user_max_budget=4.0,
    )
    data = {"model": "m", "metadata": {"tags": ["prod", "dev", "prod"]}}

    entities = BudgetHook(config).entities(auth, data)

    assert entities == [
        Entity("key", auth.token, 1.0),
        Entity("team", "t", 5.0),  # the auth's budget wins over the config's
        Entity("team_member", ("t", "u"), 2.0),
        Entity("user", "u", 9.0),
        Entity("end_user", "e", 4.0),
        Entity("tag", "prod", 3.0),  # org and tag "dev" have no budget anywhere
    ]
    assert BudgetHook(config).entities(_auth(), {"tags": "prod"}) == []


@pytest.fixture
async def hook(servers: EmbeddedServers, store: Redis, source: PostgresSpendSource) -> Any:
    assert servers.postgres is not None

    async def shared(config: Any) -> PostgresSpendSource:
        return source

    config = HookConfig(
        servers.redis[0].url,
        servers.postgres.dsn,
        lock_urls=tuple(server.url for server in servers.redis[1:4]),
        estimates={"big": 4.0},
        default_estimate=1.0,
    )
    made = BudgetHook(config, source=shared)
    yield made
    await made.aclose()  # the source's pool too: closing it again is a no-op


async def test_reserve_refuse_settle_once_and_release_as_litellm_calls_them(
    hook: Any, store: Redis, source: PostgresSpendSource
) -> None:
    await source.set_budget("team", "t", 5.0)
    auth = _auth(team_id="t", team_max_budget=5.0)
    key, holds = spend_key("team", "t"), holds_key(spend_key("team", "t"))

    first = await hook.async_pre_call_hook(
        auth, None, {"model": "m", "litellm_call_id": "c1"}, "completion"
    )
    assert first["metadata"][METADATA_KEY]["held_keys"] == [key]
    with pytest.raises(BudgetHTTPException) as refused:
        await hook.async_pre_call_hook(
            auth, None, {"model": "big", "litellm_call_id": "c2"}, "completion"
        )
    assert refused.value.status_code == 429
    assert (refused.value.type, refused.value.param) == ("budget_exceeded", "team")
    assert refused.value.detail["id"] == "t"
    assert (refused.value.detail["spend"], refused.value.detail["held"]) == (0.0, 1.0)

    logged = {
        "litellm_params": {"metadata": first["metadata"]},
        "standard_logging_object": {"response_cost": 0.5},
    }
    await hook.async_log_success_event(logged, None, None, None)
    await hook.async_log_success_event(logged, None, None, None)  # a replay: nothing added
    assert (await store.get(key), await store.hlen(holds)) == (b"0.5", 0)

    failed = await hook.async_pre_call_hook(
        auth, None, {"model": "m", "litellm_call_id": "c3"}, "completion"
    )
    assert await store.hlen(holds) == 1
    await hook.async_post_call_failure_hook(failed, RuntimeError("model down"), auth)
    assert (await store.get(key), await store.hlen(holds)) == (b"0.5", 0)


async def test_a_reservation_forged_in_the_clients_metadata_is_dropped(
    hook: Any, store: Redis, source: PostgresSpendSource
) -> None:
    await source.set_budget("team", "victim", 5.0)
    forged = {
        "request_id": "forged",
        "estimate": 0.0,
        "entities": [["team", "victim", 5.0]],
        "held_keys": [],
    }
    data = {"model": "m", "litellm_call_id": "c", "metadata": {METADATA_KEY: forged}}

    served = await hook.async_pre_call_hook(_auth(), None, data, "completion")
    await hook.async_log_success_event(
        {"metadata": served["metadata"], "standard_logging_object": {"response_cost": 3.0}},
        None,
        None,
        None,
    )

    assert METADATA_KEY not in served["metadata"]
    assert not await store.exists(spend_key("team", "victim"))


async def test_a_counter_store_outage_answers_503_under_fail_closed(
    servers: EmbeddedServers, source: PostgresSpendSource
) -> None:
    assert servers.postgres is not None
    await source.set_budget("team", "t", 5.0)

    async def shared(config: Any) -> PostgresSpendSource:
        return source

    # Nothing listens on port 1: every store command fails to connect.
    down = HookConfig("redis://127.0.0.1:1", servers.postgres.dsn, socket_timeout=0.2)
    hook = BudgetHook(down, source=shared)
    auth = _auth(team_id="t", team_max_budget=5.0)
    try:
        with pytest.raises(BudgetHTTPException) as refused:
            await hook.async_pre_call_hook(
                auth, None, {"model": "m", "litellm_call_id": "c"}, "completion"
            )
    finally:
        await hook.aclose()
    assert (refused.value.status_code, refused.value.type) == (503, "budget_unavailable")
    assert refused.value.detail["policy"] == "fail-closed"
