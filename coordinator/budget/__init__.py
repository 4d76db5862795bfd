"""Budget enforcement on spend counters: what an LLM proxy reads and writes per request.

* :mod:`.guard`: key encoding, :class:`BudgetGuard` (checks, reservations, exactly-once spend
  recording through an outbox in ledger mode, the outbox drain, resets) and the ledger contract
  (:class:`LedgerSource`) a schema of your own must keep;
* :mod:`.spend_source`: :class:`PostgresSpendSource` (the ledger on PostgreSQL: your spend
  queries and writer, or the shipped schema's) and the shipped schema;
* :mod:`.doctor`: scan a deployment's counters against the DB, classify, fix; outbox lag.

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
    Claim,
    Entity,
    EntityId,
    EntityLike,
    LedgerSource,
    OutagePolicy,
    OutboxRow,
    Overage,
    Reservation,
    Scope,
    SpendRecord,
    SpendSource,
    WriteMode,
    as_entity,
    encode_entity_id,
    entity_ref,
    parse_spend_key,
    spend_id,
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
    "Claim",
    "Entity",
    "EntityId",
    "EntityLike",
    "LedgerSource",
    "OutagePolicy",
    "OutboxRow",
    "Overage",
    "PostgresSpendSource",
    "Reservation",
    "Scope",
    "SpendRecord",
    "SpendSource",
    "WriteMode",
    "as_entity",
    "encode_entity_id",
    "entity_ref",
    "parse_spend_key",
    "schema_sql",
    "spend_id",
    "spend_key",
]
