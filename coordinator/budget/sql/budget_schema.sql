-- Spend and budgets for coordinator.budget.BudgetGuard and the example proxy pod
-- (examples/proxy_pod). Installed by PostgresSpendSource.install_schema(); idempotent.
--
-- Money is double precision, as the counters are (Redis INCRBYFLOAT): a counter rebuilt
-- from a row then equals the row exactly, whatever the order of additions.

-- Every scope but team_member: API keys (by token hash), teams, users, orgs, end users
-- (the OpenAI "user" field), tags. max_budget NULL means no budget.
CREATE TABLE IF NOT EXISTS budget_entity (
    scope      text NOT NULL
               CHECK (scope IN ('key', 'team', 'user', 'org', 'end_user', 'tag')),
    entity_id  text NOT NULL CHECK (entity_id <> ''),
    spend      double precision NOT NULL DEFAULT 0,
    max_budget double precision CHECK (max_budget >= 0),
    PRIMARY KEY (scope, entity_id)
);

-- A user's spend and budget within one team (scope team_member).
CREATE TABLE IF NOT EXISTS team_member (
    team_id    text NOT NULL CHECK (team_id <> ''),
    user_id    text NOT NULL CHECK (user_id <> ''),
    spend      double precision NOT NULL DEFAULT 0,
    max_budget double precision CHECK (max_budget >= 0),
    PRIMARY KEY (team_id, user_id)
);

-- API keys of the example proxy: the bearer key's SHA-256 (hex) and who it belongs to.
-- The key's own spend and budget are the budget_entity row ('key', token_hash).
CREATE TABLE IF NOT EXISTS api_key (
    token_hash text PRIMARY KEY,
    key_alias  text,
    team_id    text,
    user_id    text,
    org_id     text,
    blocked    boolean NOT NULL DEFAULT false
);

-- One row per recorded request: makes PostgresSpendSource.record idempotent per request id
-- (forever: a retry after the outbox row is gone still applies nothing).
-- entities holds "<scope>:<encoded id>" as in the counter keys.
CREATE TABLE IF NOT EXISTS spend_ledger (
    request_id text PRIMARY KEY,
    cost       double precision NOT NULL,
    entities   text[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The outbox: one row per (request, entity) whose cost is committed here but not yet known
-- to be counted on the entity's counter. Written in the spend's own transaction
-- (PostgresSpendSource.record), deleted once the counter has the cost (BudgetGuard.record,
-- or BudgetGuard.drain for rows left behind by a pod that died or a store that stalled).
-- A counter rebuild reads an entity's spend and its outbox rows in one snapshot: the seed
-- marks those requests counted, so their late applies add nothing.
-- entity is "<scope>:<encoded id>", as in spend_ledger.entities and the counter keys.
CREATE TABLE IF NOT EXISTS spend_outbox (
    entity     text NOT NULL,
    request_id text NOT NULL,
    cost       double precision NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (entity, request_id)
);
CREATE INDEX IF NOT EXISTS spend_outbox_request ON spend_outbox (request_id);
CREATE INDEX IF NOT EXISTS spend_outbox_created ON spend_outbox (created_at);
