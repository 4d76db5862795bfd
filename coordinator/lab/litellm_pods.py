"""Real LiteLLM proxy pods (``litellm --config``) enforcing budgets through
:class:`coordinator.integrations.litellm.BudgetHook`, for ``examples/litellm`` and the e2e test.

Each pod is its own ``litellm`` process on a loopback port, with LiteLLM's DB off (its Prisma
engines cannot be had offline): the config's ``custom_auth`` supplies the ids and budgets.
The pods share one counter store, three lock masters and a PostgreSQL holding LiteLLM's own
schema, applied from the SQL migrations of the ``litellm-proxy-extras`` package.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ..budget.guard import EntityId, Scope
from ..integrations.litellm_tables import LITELLM_TABLES
from .embedded.process import file_size, free_port, spawn
from .proxy import HOST, Pod, ProxyError, _stop
from .servers import Servers

START_TIMEOUT = 180.0  # LiteLLM imports for tens of seconds on a busy 2-core machine
HEALTH = "/health/liveliness"  # answers without a key, once the app serves


def litellm_available() -> bool:
    """Whether the ``litellm`` extra (LiteLLM's proxy and its SQL migrations) is installed."""
    return all(
        importlib.util.find_spec(name) is not None for name in ("litellm", "litellm_proxy_extras")
    )


def litellm_migrations() -> list[str]:
    """LiteLLM's schema as SQL, one script per migration, in order."""
    root = resources.files("litellm_proxy_extras") / "migrations"
    steps = sorted((step for step in root.iterdir() if step.is_dir()), key=lambda step: step.name)
    return [
        (step / "migration.sql").read_text("utf-8")
        for step in steps
        if (step / "migration.sql").is_file()
    ]


async def install_litellm_schema(db: Any) -> int:
    """Apply LiteLLM's migrations to an empty database (``db``: an asyncpg connection or
    pool); how many were applied."""
    scripts = litellm_migrations()
    for script in scripts:
        await db.execute(script)
    return len(scripts)


def _where(scope: Scope, entity_id: EntityId) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    table, columns = LITELLM_TABLES[scope]
    return table, columns, entity_id if isinstance(entity_id, tuple) else (entity_id,)


async def add_litellm_rows(
    db: Any, entities: Sequence[tuple[Scope, EntityId]], spend: float
) -> None:
    """LiteLLM's rows for ``entities``, each with ``spend`` so far (what LiteLLM's own
    management API would have created; an organization needs a budget row)."""
    for scope, entity_id in entities:
        table, columns, parts = _where(scope, entity_id)
        names = ", ".join(columns)
        marks = ", ".join(f"${i + 2}" for i in range(len(parts)))
        if scope == "org":
            await db.execute(
                """INSERT INTO "LiteLLM_BudgetTable" (budget_id, created_by, updated_by)
                VALUES ('reseed-lab', 'reseed-lab', 'reseed-lab') ON CONFLICT DO NOTHING"""
            )
            names += ", organization_alias, budget_id, created_by, updated_by"
            marks += ", $2, 'reseed-lab', 'reseed-lab', 'reseed-lab'"
        await db.execute(
            f"INSERT INTO {table} (spend, {names}) VALUES ($1, {marks})", spend, *parts
        )


async def add_litellm_spend(
    db: Any, entities: Sequence[tuple[Scope, EntityId]], cost: float
) -> None:
    """What LiteLLM's batched spend writer does: add ``cost`` to every entity's row."""
    for scope, entity_id in entities:
        table, columns, parts = _where(scope, entity_id)
        where = " AND ".join(f"{column} = ${i + 2}" for i, column in enumerate(columns))
        await db.execute(f"UPDATE {table} SET spend = spend + $1 WHERE {where}", cost, *parts)


def pod_env(servers: Servers, settings: Mapping[str, str]) -> dict[str, str]:
    """A pod's environment: the hook's servers (``RESEED_LITELLM_*``), LiteLLM offline
    (local price map, no telemetry, no DB), plus ``settings``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("DATABASE_URL", "DIRECT_URL") and not name.startswith("RESEED_LITELLM_")
    }
    env.update(
        {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_TELEMETRY": "False",
            "RESEED_LITELLM_REDIS_URL": servers.redis_url,
            "RESEED_LITELLM_LOCK_URLS": ",".join(servers.lock_urls),
            "RESEED_LITELLM_PG_DSN": servers.pg_dsn,
        }
    )
    env.update(settings)
    return env


def _litellm_command() -> str:
    found = shutil.which("litellm", path=str(Path(sys.executable).parent))
    if found is None:
        raise ProxyError(
            "the litellm command is missing: pip install 'reseed-coordinator[litellm]'"
        )
    return found


def _start(name: str, config: Path, env: Mapping[str, str], log: Path, deadline: float) -> Pod:
    import httpx

    port = free_port(HOST)
    args = [_litellm_command(), "--config", str(config), "--host", HOST, "--port", str(port)]
    offset = file_size(log)
    process = spawn(args, log, signal.SIGTERM, cwd=config.parent, env=env)
    pod = Pod(name, port, process, log)
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ProxyError(
                    f"{name} exited with code {process.returncode}:\n{pod.log_tail(offset)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if client.get(pod.url + HEALTH).status_code == 200:
                    return pod
            time.sleep(0.2)
    _stop([pod])
    raise ProxyError(f"{name} did not answer within {START_TIMEOUT:g}s:\n{pod.log_tail(offset)}")


@contextlib.contextmanager
def run_litellm_pods(
    servers: Servers, config: Path, count: int, settings: Mapping[str, str] | None = None
) -> Iterator[list[Pod]]:
    """``count`` serving ``litellm --config config`` pods (``settings``: extra environment,
    e.g. ``RESEED_LITELLM_ESTIMATES``), started one after another (each import is heavy),
    stopped on exit. Their logs live in a temp dir removed on exit."""
    if not litellm_available():
        raise ProxyError("litellm missing: pip install 'reseed-coordinator[litellm]'")
    logs = Path(tempfile.mkdtemp(prefix="reseed-litellm-"))
    env = pod_env(servers, settings or {})
    pods: list[Pod] = []
    try:
        for index in range(count):
            name = f"litellm-{index}"
            deadline = time.monotonic() + START_TIMEOUT
            pods.append(_start(name, config, env, logs / f"{name}.log", deadline))
        yield pods
    finally:
        _stop(pods)
        shutil.rmtree(logs, ignore_errors=True)
