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

# (table, id column) of each scope whose id is one string.
_TABLES: Mapping[Scope, tuple[str, str]] = {
    "key": ('"LiteLLM_VerificationToken"', "token"),
    "team": ('"LiteLLM_TeamTable"', "team_id"),
    "user": ('"LiteLLM_UserTable"', "user_id"),
    "org": ('"LiteLLM_OrganizationTable"', "organization_id"),
    "end_user": ('"LiteLLM_EndUserTable"', "user_id"),
    "tag": ('"LiteLLM_TagTable"', "tag_name"),
}
_MEMBERS = '"LiteLLM_TeamMembership"'
# Scopes whose entities may spend before LiteLLM writes their row.
_LAZY_ROWS: frozenset[Scope] = frozenset({"end_user", "tag"})


def _single(scope: Scope) -> str:
    table, column = _TABLES[scope]
    query = f"SELECT spend FROM {table} WHERE {column} = $1"
    return f"SELECT coalesce(({query}), 0)" if scope in _LAZY_ROWS else query


#: One entity's spend per scope, for :class:`PostgresSpendSource` (``$1`` the id;
#: ``team_member``: ``$1`` the team, ``$2`` the user).
LITELLM_QUERIES: Mapping[str, str] = {
    **{scope: _single(scope) for scope in _TABLES},
    "team_member": (
        f"SELECT coalesce((SELECT spend FROM {_MEMBERS} WHERE team_id = $1 AND user_id = $2), 0)"
    ),
}

#: The doctor's batch queries per scope (``$1`` a ``text[]`` of ids; ``team_member``: ``$1``
#: the teams, ``$2`` the users; rows: the id column(s), then the spend).
LITELLM_BATCH_QUERIES: Mapping[str, str] = {
    **{
        scope: f"SELECT {column}, spend FROM {table} WHERE {column} = ANY($1::text[])"
        for scope, (table, column) in _TABLES.items()
    },
    "team_member": (
        f"SELECT m.team_id, m.user_id, m.spend FROM {_MEMBERS} m "
        "JOIN unnest($1::text[], $2::text[]) AS k(team_id, user_id) "
        "ON m.team_id = k.team_id AND m.user_id = k.user_id"
    ),
}


async def litellm_spend_source(dsn: str, **options: Any) -> PostgresSpendSource:
    """A lagging spend source on LiteLLM's tables (``options`` as for
    :meth:`PostgresSpendSource.connect`: pool sizes, timeout)."""
    return await PostgresSpendSource.connect(dsn, LITELLM_QUERIES, **options)


__all__ = ["LITELLM_BATCH_QUERIES", "LITELLM_QUERIES", "litellm_spend_source"]
