"""One pod of an LLM proxy fleet: budget enforcement with BudgetGuard on every request.

Run several of them with ``python -m coordinator proxy --pods N``, or one by hand::

    RESEED_PROXY_REDIS_URL=redis://127.0.0.1:6379 RESEED_PROXY_PG_DSN=postgresql://... \\
        uvicorn --factory coordinator.lab.proxy_app:create_app --port 4000

``POST /v1/chat/completions`` (OpenAI shape, bearer API key):

1. authenticate the key against PostgreSQL (``api_key``: key -> team, user, org), cached
   for a few seconds per pod;
2. ``BudgetGuard.check`` the key, its team, the user's membership of the team, the user,
   the org, and the request's end user (``user``) and tags (``metadata.tags``) when they
   have a budget: one Redis round trip when the counters are warm;
3. simulate the model call (a sleep) with a cost;
4. record the spend (``BudgetGuard.record``, ledger mode): ledger row, spend columns and
   outbox rows in one transaction, idempotent per ``x-request-id``, then the counters, once;
   the pod's background drainer applies what a failed counter write left in the outbox.

Over budget: 429 with ``{"error": {"type": "budget_exceeded", "scope", "id", "spend",
"max_budget", "exceeded"}}``. ``POST /budget/reset`` (master key) resets an entity's spend
in the DB and its counter together. With ``RESEED_PROXY_DEBUG=1`` (demo and tests only),
``GET /_stats`` shows the pod's coordinator and guard counters, and a request may set
``mock_cost`` and ``mock_latency_ms``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .. import ReseedCoordinator, ReseedError
from ..budget import (
    BudgetExceededError,
    BudgetGuard,
    Entity,
    EntityId,
    OutagePolicy,
    Overage,
    as_entity,
)
from ..budget.spend_source import PostgresSpendSource
from ..errors import MissingRowError
from ..sources import DB_ERRORS
from .proxy import ENV_PREFIX, hash_api_key

AUTH_CACHE_SECONDS = 5.0
# A budget read that failed on either side: answered 503, never a false 200 or 429.
UNAVAILABLE: tuple[type[Exception], ...] = (ReseedError, *DB_ERRORS)

# Budgets of the key and everything it belongs to, in one query.
_AUTH = """
SELECT k.team_id, k.user_id, k.org_id, k.blocked,
       kb.max_budget AS key_budget, tb.max_budget AS team_budget,
       mb.max_budget AS member_budget, ub.max_budget AS user_budget,
       ob.max_budget AS org_budget
FROM api_key k
LEFT JOIN budget_entity kb ON kb.scope = 'key' AND kb.entity_id = k.token_hash
LEFT JOIN budget_entity tb ON tb.scope = 'team' AND tb.entity_id = k.team_id
LEFT JOIN team_member mb ON mb.team_id = k.team_id AND mb.user_id = k.user_id
LEFT JOIN budget_entity ub ON ub.scope = 'user' AND ub.entity_id = k.user_id
LEFT JOIN budget_entity ob ON ob.scope = 'org' AND ob.entity_id = k.org_id
WHERE k.token_hash = $1
"""
_BUDGETS = """
SELECT scope, entity_id, max_budget FROM budget_entity
WHERE (scope, entity_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""


@dataclass(frozen=True)
class Settings:
    redis_url: str
    pg_dsn: str
    lock_urls: tuple[str, ...] = ()
    name: str = "pod"
    namespace: str = "litellm"
    master_key: str | None = None
    debug: bool = False
    cost: float = 1.0  # simulated cost of a request
    latency_ms: float = 20.0  # simulated model latency
    outage_policy: OutagePolicy = "read-through"
    socket_timeout: float = 0.5
    lock_timeout: float = 0.3

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        def get(name: str, default: str = "") -> str:
            return env.get(ENV_PREFIX + name, default)

        missing = [name for name in ("REDIS_URL", "PG_DSN") if not get(name)]
        if missing:
            raise RuntimeError(f"set {', '.join(ENV_PREFIX + name for name in missing)}")
        policy = get("OUTAGE_POLICY", "read-through")
        if policy not in ("fail-closed", "fail-open", "read-through"):
            raise RuntimeError(f"{ENV_PREFIX}OUTAGE_POLICY: unknown policy {policy!r}")
        return cls(
            redis_url=get("REDIS_URL"),
            pg_dsn=get("PG_DSN"),
            lock_urls=tuple(url for url in get("LOCK_URLS").split(",") if url),
            name=get("NAME", "pod"),
            namespace=get("NAMESPACE", "litellm"),
            master_key=get("MASTER_KEY") or None,
            debug=get("DEBUG") == "1",
            cost=float(get("COST", "1.0")),
            latency_ms=float(get("LATENCY_MS", "20")),
            outage_policy=policy,  # type: ignore[arg-type]
            socket_timeout=float(get("SOCKET_TIMEOUT", "0.5")),
            lock_timeout=float(get("LOCK_TIMEOUT", "0.3")),
        )


@dataclass(frozen=True)
class KeyInfo:
    token_hash: str
    entities: tuple[Entity, ...]  # the key and what it belongs to, with their budgets


class BadRequest(Exception):
    pass


def _error(status: int, kind: str, message: str, **fields: Any) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message, **fields}}, status)


def _jsonable(entity_id: EntityId) -> str | list[str]:
    return list(entity_id) if isinstance(entity_id, tuple) else entity_id


def _overage(overage: Overage) -> dict[str, Any]:
    return {
        "scope": overage.scope,
        "id": _jsonable(overage.id),
        "spend": overage.spend,
        "max_budget": overage.max_budget,
    }


def _number(body: Mapping[str, Any], name: str, default: float) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number")
    if value < 0:
        raise BadRequest(f"{name} must be >= 0")
    return float(value)


class Pod:
    def __init__(
        self,
        settings: Settings,
        coordinator: ReseedCoordinator,
        source: PostgresSpendSource,
        guard: BudgetGuard,
    ) -> None:
        self.settings = settings
        self.coordinator = coordinator
        self.source = source
        self.guard = guard
        self._keys: dict[str, tuple[float, KeyInfo]] = {}

    def _mock(self, body: Mapping[str, Any], name: str, default: float) -> float:
        """A simulation knob from the request, honoured in debug mode only."""
        return _number(body, name, default) if self.settings.debug else default

    async def authenticate(self, request: Request) -> KeyInfo | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        token_hash = hash_api_key(token)
        cached = self._keys.get(token_hash)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        row = await self.source.pool.fetchrow(_AUTH, token_hash)
        if row is None or row["blocked"]:
            return None
        team, user, org = row["team_id"], row["user_id"], row["org_id"]
        candidates: list[tuple[Any, EntityId | None, float | None]] = [
            ("key", token_hash, row["key_budget"]),
            ("team", team, row["team_budget"]),
            ("team_member", (team, user) if team and user else None, row["member_budget"]),
            ("user", user, row["user_budget"]),
            ("org", org, row["org_budget"]),
        ]
        info = KeyInfo(
            token_hash,
            tuple(as_entity((s, i, b)) for s, i, b in candidates if i is not None),
        )
        self._keys[token_hash] = (now + AUTH_CACHE_SECONDS, info)
        return info

    async def request_entities(self, body: Mapping[str, Any]) -> list[Entity]:
        """The end user and tags named by the request, with their budgets if any."""
        named: list[tuple[str, str]] = []
        end_user = body.get("user")
        if end_user is not None:
            if not isinstance(end_user, str):
                raise BadRequest("user must be a string")
            named.append(("end_user", end_user))
        metadata = body.get("metadata") or {}
        tags = metadata.get("tags", []) if isinstance(metadata, dict) else None
        if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
            raise BadRequest("metadata.tags must be a list of strings")
        named += [("tag", tag) for tag in dict.fromkeys(tags)]
        if not named:
            return []
        scopes, ids = zip(*named, strict=True)
        rows = await self.source.pool.fetch(_BUDGETS, list(scopes), list(ids))
        budgets = {(row["scope"], row["entity_id"]): row["max_budget"] for row in rows}
        return [as_entity((scope, i, budgets.get((scope, i)))) for scope, i in named]

    async def chat(self, request: Request) -> JSONResponse:
        try:
            key = await self.authenticate(request)
        except DB_ERRORS as exc:
            return _error(503, "auth_unavailable", f"{type(exc).__name__}: {exc}")
        if key is None:
            return _error(401, "invalid_api_key", "missing, unknown or blocked API key")
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            entities = [*key.entities, *await self.request_entities(body)]
            cost = self._mock(body, "mock_cost", self.settings.cost)
            latency = self._mock(body, "mock_latency_ms", self.settings.latency_ms)
            request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
            spends = await self.guard.check(entities)
        except BudgetExceededError as over:
            first, *_ = over.exceeded
            return _error(
                429,
                "budget_exceeded",
                str(over),
                **_overage(first),
                exceeded=[_overage(overage) for overage in over.exceeded],
            )
        except (BadRequest, ValueError) as exc:
            return _error(400, "invalid_request", str(exc))
        except UNAVAILABLE as exc:
            return _error(503, "budget_unavailable", f"{type(exc).__name__}: {exc}")

        await asyncio.sleep(latency / 1000)  # the model call

        try:
            recorded = await self.guard.record(request_id, entities, cost)
        except ReseedError as exc:
            return _error(503, "spend_not_recorded", f"{type(exc).__name__}: {exc}")
        key_spend = spends[0]
        headers = {
            "x-request-id": request_id,
            "x-pod": self.settings.name,
            "x-litellm-response-cost": repr(0.0 if recorded.duplicate else cost),
        }
        if key_spend is not None:
            headers["x-litellm-key-spend"] = repr(key_spend)
        return JSONResponse(
            {
                "id": f"chatcmpl-{request_id}",
                "object": "chat.completion",
                "model": body.get("model", "simulated"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "(simulated reply)"},
                        "finish_reason": "stop",
                    }
                ],
                "duplicate": recorded.duplicate,
            },
            headers=headers,
        )

    async def reset(self, request: Request) -> JSONResponse:
        master = self.settings.master_key
        if master is None or request.headers.get("authorization") != f"Bearer {master}":
            return _error(403, "forbidden", "resets need the master key")
        try:
            body = await request.json()
            raw_id = body["id"]
            entity = as_entity(
                (body["scope"], tuple(raw_id) if isinstance(raw_id, list) else raw_id)
            )
            await self.guard.reset_spend(entity.scope, entity.id)
        except MissingRowError as exc:
            return _error(404, "not_found", str(exc))
        except (KeyError, TypeError, ValueError) as exc:
            return _error(400, "invalid_request", f"expected {{scope, id}}: {exc}")
        except ReseedError as exc:
            return _error(503, "reset_failed", f"{type(exc).__name__}: {exc}")
        return JSONResponse({"reset": {"scope": entity.scope, "id": _jsonable(entity.id)}})

    async def stats(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "pod": self.settings.name,
                "coordinator": self.coordinator.stats.as_dict(),
                "guard": asdict(self.guard.stats),
            }
        )


async def _chat(request: Request) -> JSONResponse:
    pod: Pod = request.state.pod
    return await pod.chat(request)


async def _reset(request: Request) -> JSONResponse:
    pod: Pod = request.state.pod
    return await pod.reset(request)


async def _stats(request: Request) -> JSONResponse:
    pod: Pod = request.state.pod
    return await pod.stats(request)


async def _health(request: Request) -> JSONResponse:
    # uvicorn serves nothing before the lifespan started: answering means ready.
    pod: Pod = request.state.pod
    return JSONResponse({"pod": pod.settings.name})


def create_app(settings: Settings | None = None) -> Starlette:
    """The pod's ASGI app (a uvicorn ``--factory``); settings from the environment."""
    config = settings or Settings.from_env()
    # uvicorn configures only its own loggers; the library's and the pod's need a handler.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Pod]]:
        async with AsyncExitStack() as stack:
            coordinator = ReseedCoordinator.from_urls(
                config.redis_url,
                lock_urls=list(config.lock_urls),
                socket_timeout=config.socket_timeout,
                lock_timeout=config.lock_timeout,
            )
            stack.push_async_callback(coordinator.aclose)
            source = await PostgresSpendSource.connect(config.pg_dsn, max_size=10)
            stack.push_async_callback(source.aclose)
            guard = BudgetGuard(
                coordinator,
                source,
                write_mode="ledger",
                namespace=config.namespace,
                outage_policy=config.outage_policy,
                drain_interval=1.0,
            )
            await stack.enter_async_context(guard)  # runs the outbox drainer
            yield {"pod": Pod(config, coordinator, source, guard)}

    routes = [
        Route("/health", _health),
        Route("/v1/chat/completions", _chat, methods=["POST"]),
        Route("/budget/reset", _reset, methods=["POST"]),
    ]
    if config.debug:
        routes.append(Route("/_stats", _stats))
    return Starlette(routes=routes, lifespan=lifespan)
