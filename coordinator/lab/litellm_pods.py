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
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

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


async def install_litellm_schema(pool: Any) -> int:
    """Apply LiteLLM's migrations to an empty database; how many were applied."""
    scripts = litellm_migrations()
    async with pool.acquire() as conn:
        for script in scripts:
            await conn.execute(script)
    return len(scripts)


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
