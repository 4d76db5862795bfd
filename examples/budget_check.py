"""BudgetGuard end to end: check a request's budgets, record its cost, refuse, reset.

    python -m coordinator servers      # shell 1: starts the servers, prints export lines
    python examples/budget_check.py    # shell 2, after pasting those lines

The guard runs in ledger mode: PostgreSQL (the shipped schema) is the ledger, each cost is
committed there first, then added to the Redis counters, exactly once per request id.
"""

import asyncio
import os
import uuid

from coordinator import ReseedCoordinator
from coordinator.budget import BudgetExceededError, BudgetGuard, Entity, PostgresSpendSource

REDIS_URL = os.environ["RESEED_REDIS_URL"]  # the counter store
LOCK_URLS = os.environ["RESEED_LOCK_URLS"].split(",")  # 3 independent Redlock masters
PG_DSN = os.environ["RESEED_PG_DSN"]  # the ledger

# The budget holders of one request. An entity is a scope, an id and a budget:
# - scope is one of key, team, team_member, user, org, end_user, tag;
# - the id is a string, except team_member's: a (team id, user id) pair;
# - max_budget is the spend at which requests are refused (spend >= max_budget), or None
#   for an entity that is recorded but never checked (its counter is not even read).
# A (scope, id, max_budget) tuple works too. Each entity has one counter,
# litellm:spend:<scope>:<id>, rebuilt from its DB row when missing.
ENTITIES = [
    Entity("key", "sk-hash-1", max_budget=3.0),  # an API key (by its hash): tight budget
    Entity("team", "t-1", max_budget=100.0),
    Entity("team_member", ("t-1", "u-1"), max_budget=10.0),  # u-1's spend within t-1
    Entity("user", "u-1", max_budget=None),  # spend recorded, no budget
]
COST = 1.0  # what each model call costs


async def main() -> None:
    source = await PostgresSpendSource.connect(PG_DSN)
    await source.install_schema()  # budget_entity, team_member, spend_ledger, spend_outbox
    coord = ReseedCoordinator.from_urls(REDIS_URL, lock_urls=LOCK_URLS)
    guard = BudgetGuard(coord, source, write_mode="ledger", drain_interval=1.0)
    async with coord, guard:  # the guard's outbox drainer runs inside
        for entity in ENTITIES:  # create each entity with its budget and zero spend
            await source.set_budget(entity.scope, entity.id, entity.max_budget)
            await guard.reset_spend(entity.scope, entity.id)

        run = uuid.uuid4().hex[:8]  # request ids are remembered forever: unique per run
        for n in range(1, 5):
            try:
                spends = await guard.check(ENTITIES)  # one MGET; a missing counter is rebuilt
            except BudgetExceededError as over:  # .exceeded: every entity over budget
                spent, budget = over.spend, over.max_budget
                print(f"request {n}: refused, {over.scope} spent {spent:g} of {budget:g}")
                continue
            print(f"request {n}: allowed, key spent {spends[0]:g} of 3")
            # ... the model call happens here; then its cost, committed and counted once:
            await guard.record(f"{run}-{n}", ENTITIES, COST)

        retry = await guard.record(f"{run}-3", ENTITIES, COST)  # a retried record
        print(f"retry of request 3: duplicate={retry.duplicate}, nothing counted twice")

        # A budget reset: the DB row is zeroed and, while it is locked, the counter reset
        # (a rebuild in flight cannot bring the old spend back).
        await guard.reset_spend("key", "sk-hash-1")
        spends = await guard.check(ENTITIES)
        print(f"after the key's reset: allowed, key spent {spends[0]:g} of 3")
        print(f"the user (no budget) has spent {await guard.current_spend('user', 'u-1'):g}")
    await source.aclose()


asyncio.run(main())
