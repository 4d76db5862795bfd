"""Spend queries for LiteLLM's own tables (its Prisma schema, as the SQL migrations of the
``litellm-proxy-extras`` package create it), one per scope.

LiteLLM writes spend to these tables itself, in batches, after the calls: a source on them is
a lagging one (``BudgetGuard(..., write_mode="lagging")``), and needs nothing of this library
in the database. The key scope's id is the key's hash (``LiteLLM_VerificationToken.token``,
as LiteLLM's ``UserAPIKeyAuth.token`` carries it).

End users, tags and team memberships get their rows when they first spend (or never, for a
team member without a budget of its own): a missing row reads as no spend. A key, team, user
or organization without a row is an error (:class:`~coordinator.errors.MissingRowError`): a
budget on an entity LiteLLM does not know is a misconfiguration.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..budget.guard import Scope
from ..budget.spend_source import PostgresSpendSource

#: Each scope's table and id column(s) in LiteLLM's schema (a team member: team, then user).
LITELLM_TABLES: Mapping[Scope, tuple[str, tuple[str, ...]]] = {
    "key": ('"LiteLLM_VerificationToken"', ("token",)),
    "team": ('"LiteLLM_TeamTable"', ("team_id",)),
    "team_member": ('"LiteLLM_TeamMembership"', ("team_id", "user_id")),
    "user": ('"LiteLLM_UserTable"', ("user_id",)),
    "org": ('"LiteLLM_OrganizationTable"', ("organization_id",)),
    "end_user": ('"LiteLLM_EndUserTable"', ("user_id",)),
    "tag": ('"LiteLLM_TagTable"', ("tag_name",)),
}
# Scopes whose entities may spend before LiteLLM writes their row.
_LAZY_ROWS: frozenset[Scope] = frozenset({"team_member", "end_user", "tag"})


def _single(scope: Scope) -> str:
    table, columns = LITELLM_TABLES[scope]
    where = " AND ".join(f"{column} = ${i + 1}" for i, column in enumerate(columns))
    query = f"SELECT spend FROM {table} WHERE {where}"
    return f"SELECT coalesce(({query}), 0)" if scope in _LAZY_ROWS else query


def _batch(scope: Scope) -> str:
    table, columns = LITELLM_TABLES[scope]
    arrays = ", ".join(f"${i + 1}::text[]" for i in range(len(columns)))
    on = " AND ".join(f"m.{column} = k.{column}" for column in columns)
    selected = ", ".join(f"m.{column}" for column in columns)
    return (
        f"SELECT {selected}, m.spend FROM {table} m "
        f"JOIN unnest({arrays}) AS k({', '.join(columns)}) ON {on}"
    )


#: One entity's spend per scope, for :class:`PostgresSpendSource` (``$1`` the id;
#: ``team_member``: ``$1`` the team, ``$2`` the user).
LITELLM_QUERIES: Mapping[str, str] = {scope: _single(scope) for scope in LITELLM_TABLES}

#: The doctor's batch queries per scope (``$1`` a ``text[]`` of ids; ``team_member``: ``$1``
#: the teams, ``$2`` the users; rows: the id column(s), then the spend).
LITELLM_BATCH_QUERIES: Mapping[str, str] = {scope: _batch(scope) for scope in LITELLM_TABLES}


async def litellm_spend_source(dsn: str, **options: Any) -> PostgresSpendSource:
    """A lagging spend source on LiteLLM's tables (``options`` as for
    :meth:`PostgresSpendSource.connect`: pool sizes, timeout)."""
    return await PostgresSpendSource.connect(dsn, LITELLM_QUERIES, **options)


__all__ = ["LITELLM_BATCH_QUERIES", "LITELLM_QUERIES", "LITELLM_TABLES", "litellm_spend_source"]
