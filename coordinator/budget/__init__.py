"""Budget enforcement on spend counters: what an LLM proxy reads and writes per request.

* :mod:`.guard`: key encoding, :class:`BudgetGuard` (checks, spend recording, resets);
* :mod:`.spend_source`: :class:`PostgresSpendSource` and the shipped schema;
* :mod:`.doctor`: scan a deployment's counters against the DB, classify, fix.

Built on the core (:mod:`coordinator`); imports nothing from :mod:`coordinator.lab`.
"""

from .guard import (
    DEFAULT_NAMESPACE,
    MAX_ID_BYTES,
    OUTAGE_POLICIES,
    SCOPES,
    WRITE_MODES,
    BudgetExceededError,
    BudgetGuard,
    BudgetObserver,
    BudgetStats,
    BudgetUnavailableError,
    Entity,
    EntityId,
    EntityLike,
    OutagePolicy,
    Overage,
    Scope,
    SpendRecord,
    SpendSource,
    WriteMode,
    as_entity,
    encode_entity_id,
    parse_spend_key,
    request_key,
    spend_key,
)
from .spend_source import PostgresSpendSource, schema_sql

__all__ = [
    "DEFAULT_NAMESPACE",
    "MAX_ID_BYTES",
    "OUTAGE_POLICIES",
    "SCOPES",
    "WRITE_MODES",
    "BudgetExceededError",
    "BudgetGuard",
    "BudgetObserver",
    "BudgetStats",
    "BudgetUnavailableError",
    "Entity",
    "EntityId",
    "EntityLike",
    "OutagePolicy",
    "Overage",
    "PostgresSpendSource",
    "Scope",
    "SpendRecord",
    "SpendSource",
    "WriteMode",
    "as_entity",
    "encode_entity_id",
    "parse_spend_key",
    "request_key",
    "schema_sql",
    "spend_key",
]
