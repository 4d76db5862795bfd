"""Budgets enforced inside LiteLLM proxy pods: a LiteLLM callback on :class:`BudgetGuard`.

:class:`BudgetHook` is a LiteLLM ``CustomLogger``. Before the model call
(``async_pre_call_hook``) it reserves an estimated cost against every budgeted entity of the
request (key, team, team member, user, org, end user, tags), atomically with the check, and
answers 429 in LiteLLM's error shape when one is over (``type: budget_exceeded``; the scope,
id, spend and max_budget in ``provider_specific_fields``), or 503 when the outage policy
refuses (``type: budget_unavailable``). After the call (``async_log_success_event``, which
LiteLLM runs in a background worker) it records the actual cost once per
``litellm_call_id`` and ends the hold; when the call fails it ends the hold only.

Counters are rebuilt from LiteLLM's own spend tables (:mod:`.litellm_tables`, a lagging
source: LiteLLM's batched writer keeps them). Budgets come from LiteLLM's ``UserAPIKeyAuth``
(``max_budget``, ``team_max_budget``, ``user_max_budget``, ``organization_max_budget``,
``end_user_max_budget``) or, where it has none (team members, tags), from
:attr:`HookConfig.budgets`.

Use it from a proxy config: LiteLLM resolves ``callbacks:`` entries from files next to the
config, so a shim file there names the instance (see ``examples/litellm/``)::

    # budget_hook.py, next to config.yaml
    from coordinator.integrations.litellm import BudgetHook
    budget_hook = BudgetHook()

    # config.yaml
    litellm_settings:
      callbacks: budget_hook.budget_hook

Settings come from the environment (:meth:`HookConfig.from_env`) at the first request, on
the proxy's own event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException
from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy._types import UserAPIKeyAuth
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from ..budget.guard import (
    OUTAGE_POLICIES,
    BudgetExceededError,
    BudgetGuard,
    BudgetUnavailableError,
    Entity,
    EntityId,
    OutagePolicy,
    Reservation,
    Scope,
    SpendSource,
    as_entity,
)
from ..coordinator import ReseedCoordinator
from ..errors import ConfigurationError, InvalidKeyError, InvalidValueError, ReseedError
from .litellm_tables import litellm_spend_source

log = logging.getLogger(__name__)

ENV_PREFIX = "RESEED_LITELLM_"
SETTLE_ATTEMPTS = 4
#: Where the pre-call hook leaves its reservation in the request's ``metadata``.
METADATA_KEY = "reseed_budget"

#: Makes the spend source a hook reads: the default reads LiteLLM's tables at ``pg_dsn``.
SourceFactory = Callable[["HookConfig"], Awaitable[SpendSource]]


@dataclass(frozen=True)
class HookConfig:
    """What :class:`BudgetHook` runs on. ``estimates`` maps a model (as the request names
    it) to the most one call of it may cost, held while the call runs; other models hold
    ``default_estimate``. ``budgets`` are ``(scope, id, max_budget)`` for entities whose
    budget LiteLLM's auth does not carry (team members: id ``(team_id, user_id)``; tags)
    or to override none."""

    redis_url: str
    pg_dsn: str
    lock_urls: tuple[str, ...] = ()
    namespace: str = "litellm"
    outage_policy: OutagePolicy = "fail-closed"
    estimates: Mapping[str, float] = field(default_factory=dict)
    default_estimate: float = 0.0
    hold_ttl: float = 300.0
    counter_ttl: float = 60.0
    socket_timeout: float = 2.0
    budgets: tuple[Entity, ...] = ()

    def __post_init__(self) -> None:
        if self.outage_policy not in OUTAGE_POLICIES:
            raise ConfigurationError(
                f"outage_policy must be one of {OUTAGE_POLICIES}, got {self.outage_policy!r}"
            )
        for model, ceiling in {**self.estimates, "default_estimate": self.default_estimate}.items():
            if not _cost(ceiling):
                raise ConfigurationError(f"estimate of {model!r} must be >= 0, got {ceiling!r}")
        for item in self.budgets:
            if item.max_budget is None:
                raise ConfigurationError(f"budget of {item.scope} {item.id!r} has no max_budget")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HookConfig:
        """``RESEED_LITELLM_`` + ``REDIS_URL``, ``PG_DSN`` (required), ``LOCK_URLS``
        (comma-separated), ``NAMESPACE``, ``OUTAGE_POLICY``, ``ESTIMATES`` (JSON object:
        model -> USD), ``DEFAULT_ESTIMATE``, ``HOLD_TTL``, ``COUNTER_TTL``,
        ``SOCKET_TIMEOUT`` (seconds),
        ``BUDGETS`` (JSON list of ``[scope, id, max_budget]``, a team member's id
        ``[team_id, user_id]``)."""
        env = os.environ if environ is None else environ

        def get(name: str, default: str | None = None) -> str:
            value = env.get(ENV_PREFIX + name, default)
            if value is None:
                raise ConfigurationError(f"{ENV_PREFIX}{name} is not set")
            return value

        try:
            estimates = json.loads(get("ESTIMATES", "{}"))
            budgets = json.loads(get("BUDGETS", "[]"))
            numbers = {
                name: float(get(name, default))
                for name, default in [
                    ("DEFAULT_ESTIMATE", "0"),
                    ("HOLD_TTL", "300"),
                    ("COUNTER_TTL", "60"),
                    ("SOCKET_TIMEOUT", "2"),
                ]
            }
        except ValueError as exc:
            raise ConfigurationError(f"bad {ENV_PREFIX}* setting: {exc}") from exc
        if not isinstance(estimates, dict) or not isinstance(budgets, list):
            raise ConfigurationError(
                f"{ENV_PREFIX}ESTIMATES must be a JSON object and {ENV_PREFIX}BUDGETS a list"
            )
        policy = get("OUTAGE_POLICY", "fail-closed")
        if policy not in OUTAGE_POLICIES:
            raise ConfigurationError(f"{ENV_PREFIX}OUTAGE_POLICY must be one of {OUTAGE_POLICIES}")
        return cls(
            redis_url=get("REDIS_URL"),
            pg_dsn=get("PG_DSN"),
            lock_urls=tuple(url for url in get("LOCK_URLS", "").split(",") if url),
            namespace=get("NAMESPACE", "litellm"),
            outage_policy=policy,
            estimates=estimates,
            default_estimate=numbers["DEFAULT_ESTIMATE"],
            hold_ttl=numbers["HOLD_TTL"],
            counter_ttl=numbers["COUNTER_TTL"],
            socket_timeout=numbers["SOCKET_TIMEOUT"],
            budgets=tuple(_budget_entry(entry) for entry in budgets),
        )


class BudgetHTTPException(HTTPException):
    """An HTTPException LiteLLM turns into its error body: ``type`` and ``param`` become
    the error's, ``detail`` its ``provider_specific_fields``."""

    def __init__(self, status_code: int, kind: str, message: str, fields: dict[str, Any]):
        super().__init__(status_code=status_code, detail={"message": message, **fields})
        self.type = kind
        self.param: str | None = fields.get("scope")


class BudgetHook(CustomLogger):  # type: ignore[misc]  # LiteLLM's class is untyped
    """Reserve before the call, settle after it, release when it fails (see the module)."""

    def __init__(
        self, config: HookConfig | None = None, *, source: SourceFactory | None = None
    ) -> None:
        super().__init__()
        self._config = config
        self._make_source = source
        self._guard: BudgetGuard | None = None
        self._coordinator: ReseedCoordinator | None = None
        self._source: SpendSource | None = None
        self._opening = asyncio.Lock()

    @property
    def config(self) -> HookConfig:
        if self._config is None:
            self._config = HookConfig.from_env()
        return self._config

    async def guard(self) -> BudgetGuard:
        """The hook's guard, built at first use on the running loop (LiteLLM's)."""
        if self._guard is None:
            async with self._opening:
                if self._guard is None:
                    self._guard = await self._open()
        return self._guard

    async def aclose(self) -> None:
        """Close the guard's clients and pool."""
        if self._coordinator is not None:
            await self._coordinator.aclose()
        closer = getattr(self._source, "aclose", None)
        if closer is not None:
            await closer()
        self._guard = self._coordinator = self._source = None

    def entities(self, auth: UserAPIKeyAuth, data: Mapping[str, Any]) -> list[Entity]:
        """The request's budgeted entities: from LiteLLM's auth, else from the config."""
        configured = {(item.scope, item.id): item.max_budget for item in self.config.budgets}
        team, user = auth.team_id, auth.user_id
        candidates: list[tuple[Scope, EntityId | None, float | None]] = [
            ("key", auth.token, auth.max_budget),
            ("team", team, auth.team_max_budget),
            ("team_member", (team, user) if team and user else None, None),
            ("user", user, auth.user_max_budget),
            ("org", auth.org_id, auth.organization_max_budget),
            ("end_user", auth.end_user_id, auth.end_user_max_budget),
            *(("tag", tag, None) for tag in _tags(data)),
        ]
        found = []
        for scope, entity_id, budget in candidates:
            if not entity_id:
                continue
            limit = budget if budget is not None else configured.get((scope, entity_id))
            if limit is not None:
                found.append(as_entity((scope, entity_id, limit)))
        return found

    def estimate(self, data: Mapping[str, Any]) -> float:
        """The cost held while the call runs: the configured ceiling of its model."""
        config = self.config
        return config.estimates.get(str(data.get("model")), config.default_estimate)

    async def async_pre_call_hook(
        self,
        user_api_key_dict: UserAPIKeyAuth,
        cache: Any,
        data: dict[str, Any],
        call_type: Any,
    ) -> dict[str, Any]:
        metadata = data.get("metadata")
        if not isinstance(metadata, dict):
            metadata = data["metadata"] = {}
        # The client's metadata arrives here too: a reservation in it is forged (it would
        # charge or release entities of the client's choosing after the call).
        metadata.pop(METADATA_KEY, None)
        try:
            entities = self.entities(user_api_key_dict, data)
        except (InvalidKeyError, InvalidValueError) as exc:
            raise BudgetHTTPException(400, "invalid_request_error", str(exc), {}) from exc
        if not entities:
            return data
        request_id = str(data.get("litellm_call_id") or uuid.uuid4())
        try:
            guard = await self.guard()
            reservation = await guard.reserve(request_id, entities, self.estimate(data))
        except BudgetExceededError as exc:
            raise _over_budget(exc) from exc
        except ReseedError as exc:
            raise _unavailable(exc) from exc
        metadata[METADATA_KEY] = _dump(reservation)
        return data

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        reservation = _reservation_of(kwargs)
        if reservation is None:
            return
        logged = kwargs.get("standard_logging_object") or {}
        cost = logged.get("response_cost", kwargs.get("response_cost")) or 0.0
        guard = await self.guard()
        try:
            # Recording is exactly once per request id, so a store failure is retried: a
            # burst of success events opens connections faster than a busy pod connects.
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(BudgetUnavailableError),
                stop=stop_after_attempt(SETTLE_ATTEMPTS),
                wait=wait_random_exponential(multiplier=0.05, max=1.0),
                reraise=True,
            ):
                with attempt:
                    await guard.settle(reservation, float(cost))
        except ReseedError as exc:
            # A logging callback must not raise: the hold expires, and the counter catches
            # up with LiteLLM's own spend write when it is next rebuilt.
            log.warning("spend of %s not recorded: %s", reservation.request_id, exc)

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        await self._release(_reservation_of(kwargs))

    async def async_post_call_failure_hook(
        self,
        request_data: dict[str, Any],
        original_exception: Exception,
        user_api_key_dict: UserAPIKeyAuth,
        traceback_str: str | None = None,
    ) -> None:
        await self._release(_reservation_of(request_data))

    async def _release(self, reservation: Reservation | None) -> None:
        # Both failure paths may run for one call: ending a hold twice ends nothing.
        if reservation is None:
            return
        try:
            await (await self.guard()).release(reservation)
        except ReseedError as exc:
            log.warning("hold of %s not released (it expires): %s", reservation.request_id, exc)

    async def _open(self) -> BudgetGuard:
        config = self.config
        make = self._make_source or _litellm_source
        self._source = await make(config)
        self._coordinator = ReseedCoordinator.from_urls(
            config.redis_url,
            lock_urls=list(config.lock_urls),
            ttl=config.counter_ttl,
            socket_timeout=config.socket_timeout,
        )
        return BudgetGuard(
            self._coordinator,
            self._source,
            write_mode="lagging",
            namespace=config.namespace,
            outage_policy=config.outage_policy,
            hold_ttl=config.hold_ttl,
        )


async def _litellm_source(config: HookConfig) -> SpendSource:
    return await litellm_spend_source(config.pg_dsn)


def _cost(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _budget_entry(entry: object) -> Entity:
    if not (isinstance(entry, list) and len(entry) == 3):
        raise ConfigurationError(f"a budget is [scope, id, max_budget], got {entry!r}")
    scope, entity_id, budget = entry
    try:
        ident = tuple(entity_id) if isinstance(entity_id, list) else entity_id
        return as_entity((scope, ident, budget))
    except (InvalidKeyError, InvalidValueError) as exc:
        raise ConfigurationError(f"bad budget {entry!r}: {exc}") from exc


def _tags(data: Mapping[str, Any]) -> list[str]:
    metadata = data.get("metadata")
    tags = data.get("tags") or (metadata.get("tags") if isinstance(metadata, dict) else None)
    if not isinstance(tags, (list, tuple)):
        return []
    return list(dict.fromkeys(tag for tag in tags if isinstance(tag, str) and tag))


def _over_budget(exc: BudgetExceededError) -> BudgetHTTPException:
    first = exc.exceeded[0]
    entity_id = list(first.id) if isinstance(first.id, tuple) else first.id
    return BudgetHTTPException(
        429,
        "budget_exceeded",
        str(exc),
        {
            "scope": first.scope,
            "id": entity_id,
            "spend": first.spend,
            "max_budget": first.max_budget,
            "held": first.held,
            "estimate": first.estimate,
        },
    )


def _unavailable(exc: ReseedError) -> BudgetHTTPException:
    policy = exc.policy if isinstance(exc, BudgetUnavailableError) else None
    return BudgetHTTPException(
        503, "budget_unavailable", f"budget check failed: {exc}", {"policy": policy}
    )


def _dump(reservation: Reservation) -> dict[str, Any]:
    # Request metadata travels through LiteLLM's logging as plain JSON-like data.
    return {
        "request_id": reservation.request_id,
        "estimate": reservation.estimate,
        "entities": [
            [item.scope, list(item.id) if isinstance(item.id, tuple) else item.id, item.max_budget]
            for item in reservation.entities
        ],
        "held_keys": list(reservation.held_keys),
    }


def _reservation_of(data: Mapping[str, Any]) -> Reservation | None:
    """The reservation the pre-call hook left in a request's (or a log event's) metadata."""
    params = data.get("litellm_params")
    for metadata in (
        data.get("metadata"),
        params.get("metadata") if isinstance(params, dict) else None,
    ):
        if isinstance(metadata, dict) and isinstance(metadata.get(METADATA_KEY), dict):
            return _load(metadata[METADATA_KEY])
    return None


def _load(saved: Mapping[str, Any]) -> Reservation:
    entities = tuple(_budget_entry(list(entry)) for entry in saved["entities"])
    return Reservation(
        str(saved["request_id"]),
        entities,
        float(saved["estimate"]),
        tuple(None for _ in entities),
        tuple(str(key) for key in saved["held_keys"]),
    )


__all__ = [
    "ENV_PREFIX",
    "METADATA_KEY",
    "BudgetHTTPException",
    "BudgetHook",
    "HookConfig",
    "SourceFactory",
]
