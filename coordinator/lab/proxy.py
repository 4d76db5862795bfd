"""``python -m coordinator proxy --pods N``: a fleet of example LLM proxy pods enforcing budgets.

Each pod is a uvicorn process running :mod:`coordinator.lab.proxy_app` (a Starlette app with its own
coordinator, asyncpg pool and :class:`~coordinator.budget.BudgetGuard`) on a loopback
port. They share one counter store, three lock masters and PostgreSQL: embedded ones unless
``--redis-url/--lock-url/--pg-dsn`` are given. The command installs the spend schema, seeds a
demo API key with a small budget, prints the pods' URLs, the servers (as ``export`` lines)
and a curl to try, and runs until Ctrl-C or SIGTERM. :func:`run_pods` is the same launcher
for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..budget.guard import BudgetGuard, EntityId, Scope
from ..budget.spend_source import PostgresSpendSource
from ..coordinator import ReseedCoordinator
from .cliargs import CommandError, add_server_flags, non_negative, positive_int
from .embedded.process import file_size, free_port, read_since, spawn
from .serve import export_lines
from .servers import Deployment, Servers, started_servers

if TYPE_CHECKING:
    import httpx

APP = "coordinator.lab.proxy_app:create_app"
HOST = "127.0.0.1"
ENV_PREFIX = "RESEED_PROXY_"
START_TIMEOUT = 60.0  # import + connect of every pod on a busy 2-core machine
STOP_GRACE = 5.0
PORT_ATTEMPTS = 5
PROXY_MODULES = ("starlette", "uvicorn", "httpx")

DEMO_KEY = "sk-demo-reseed"
DEMO_MASTER_KEY = "sk-master-demo"


class ProxyError(CommandError):
    """A pod could not be started, or died."""


def hash_api_key(token: str) -> str:
    """How keys are stored (``api_key.token_hash``) and named in counters: SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


async def add_api_key(
    pool: Any,
    token: str,
    *,
    team_id: str | None = None,
    user_id: str | None = None,
    org_id: str | None = None,
    alias: str | None = None,
) -> str:
    """Create (or re-point and unblock) an API key; its hash, the key's entity id."""
    token_hash = hash_api_key(token)
    await pool.execute(
        """
        INSERT INTO api_key (token_hash, key_alias, team_id, user_id, org_id)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (token_hash) DO UPDATE SET key_alias = $2, team_id = $3, user_id = $4,
            org_id = $5, blocked = false
        """,
        token_hash,
        alias,
        team_id,
        user_id,
        org_id,
    )
    return token_hash


@dataclass
class Pod:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, offset: int = 0) -> str:
        return read_since(self.log, offset).strip()


def _launch(name: str, env: Mapping[str, str], log: Path) -> tuple[Pod, int]:
    port = free_port(HOST)
    args = [
        sys.executable, "-m", "uvicorn", "--factory", APP,
        "--host", HOST, "--port", str(port),
        "--lifespan", "on", "--log-level", "warning", "--no-access-log",
        "--timeout-graceful-shutdown", str(int(STOP_GRACE)),
    ]  # fmt: skip
    offset = file_size(log)
    process = spawn(args, log, signal.SIGTERM, env={**os.environ, **env, ENV_PREFIX + "NAME": name})
    return Pod(name, port, process, log), offset


def _ready(pod: Pod, client: httpx.Client) -> bool:
    import httpx

    try:
        return client.get(f"{pod.url}/health").status_code == 200
    except httpx.HTTPError:
        return False


def _start(name: str, env: Mapping[str, str], log: Path, deadline: float) -> Pod:
    """One pod, serving; a new port when another process took the one we picked."""
    import httpx  # the proxy extra: every other command runs without it

    with httpx.Client(timeout=1.0) as client:
        for _ in range(PORT_ATTEMPTS):
            pod, offset = _launch(name, env, log)
            while time.monotonic() < deadline:
                if pod.process.poll() is not None:
                    break
                if _ready(pod, client):
                    return pod
                time.sleep(0.05)
            else:
                _stop([pod])
                raise ProxyError(
                    f"{name} did not answer within {START_TIMEOUT:g}s:\n{pod.log_tail(offset)}"
                )
            if "address already in use" not in pod.log_tail(offset).lower():
                raise ProxyError(
                    f"{name} exited with code {pod.process.returncode}:\n{pod.log_tail(offset)}"
                )
    raise ProxyError(f"{name}: no free port after {PORT_ATTEMPTS} attempts")


def _stop(pods: list[Pod]) -> None:
    # SIGTERM lets uvicorn run the lifespan shutdown (closing coordinators and pools).
    for pod in pods:
        if pod.process.poll() is None:
            pod.process.terminate()
    deadline = time.monotonic() + STOP_GRACE + 1.0
    for pod in pods:
        try:
            pod.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pod.process.kill()
            pod.process.wait()


def pod_env(servers: Servers, settings: Mapping[str, str]) -> dict[str, str]:
    """The pods' environment: the servers, plus ``settings`` (names without the prefix)."""
    env = {
        "REDIS_URL": servers.redis_url,
        "LOCK_URLS": ",".join(servers.lock_urls),
        "PG_DSN": servers.pg_dsn,
        **settings,
    }
    return {ENV_PREFIX + name: value for name, value in env.items()}


@contextlib.contextmanager
def run_pods(
    servers: Servers, count: int, settings: Mapping[str, str] | None = None
) -> Iterator[list[Pod]]:
    """``count`` serving pods (``settings`` as in :class:`coordinator.lab.proxy_app.Settings`,
    e.g. ``{"DEBUG": "1"}``), stopped on exit. Their logs live in a temp dir removed on exit."""
    missing = [name for name in PROXY_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ProxyError(f"{', '.join(missing)} missing: pip install 'reseed-coordinator[proxy]'")
    logs = Path(tempfile.mkdtemp(prefix="reseed-proxy-"))
    env = pod_env(servers, settings or {})
    pods: list[Pod] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT
        for index in range(count):
            name = f"pod-{index}"
            pods.append(_start(name, env, logs / f"{name}.log", deadline))
        yield pods
    finally:
        _stop(pods)
        shutil.rmtree(logs, ignore_errors=True)


# -- the demo ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Demo:
    key: str
    key_hash: str
    key_budget: float
    cost: float


async def seed_demo(servers: Servers, *, key_budget: float, cost: float) -> Demo:
    """Install the schema and create the demo key, team, user and org with budgets; their
    spend and counters restart from zero, so a rerun on the same servers behaves the same."""
    async with await PostgresSpendSource.connect(servers.pg_dsn) as source:
        await source.install_schema()
        key_hash = await add_api_key(
            source.pool,
            DEMO_KEY,
            team_id="demo-team",
            user_id="demo-user",
            org_id="demo-org",
            alias="demo",
        )
        budgets: list[tuple[Scope, EntityId, float]] = [
            ("key", key_hash, key_budget),
            ("team", "demo-team", 100 * key_budget),
            ("team_member", ("demo-team", "demo-user"), 10 * key_budget),
            ("user", "demo-user", 100 * key_budget),
            ("org", "demo-org", 1000 * key_budget),
        ]
        async with ReseedCoordinator.from_urls(
            servers.redis_url, lock_urls=list(servers.lock_urls)
        ) as coordinator:
            guard = BudgetGuard(coordinator, source, write_mode="ledger")
            for scope, entity_id, budget in budgets:
                await source.set_budget(scope, entity_id, budget)
                await guard.reset_spend(scope, entity_id)
    return Demo(DEMO_KEY, key_hash, key_budget, cost)


def _banner(pods: list[Pod], demo: Demo, deployment: Deployment) -> str:
    url = pods[0].url
    refused = int(demo.key_budget // demo.cost) + 1 if demo.cost else None
    body = '{"model": "demo", "messages": [{"role": "user", "content": "hi"}]}'
    reset = f'{{"scope": "key", "id": "{demo.key_hash}"}}'
    lines = [
        f"{len(pods)} proxy pods:",
        *(f"  {pod.name}  {pod.url}" for pod in pods),
        "",
        f"demo API key {demo.key}: budget {demo.key_budget:g}, {demo.cost:g} per request"
        + (f" (request {refused} gets 429)" if refused else ""),
        f"  curl -s {url}/v1/chat/completions \\",
        f"    -H 'Authorization: Bearer {demo.key}' -H 'Content-Type: application/json' \\",
        f"    -d '{body}'",
        "reset the key's spend (DB and counter, fenced):",
        f"  curl -s {url}/budget/reset -H 'Authorization: Bearer {DEMO_MASTER_KEY}' \\",
        f"    -d '{reset}'",
        f"a pod's counters: curl -s {url}/_stats",
        "",
        "the servers they share (paste into a shell for doctor or your own code):",
        *(f"  {line}" for line in export_lines(deployment.servers)),
        *(
            [f"  redis-server: {deployment.redis_binary.describe()}"]
            if deployment.redis_binary
            else []
        ),
        "",
        "Ctrl-C or SIGTERM stops the pods (and the embedded servers).",
    ]
    return "\n".join(lines)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "proxy",
        help="run N example LLM proxy pods (uvicorn) enforcing budgets; Ctrl-C stops them",
        description=(
            "Start N uvicorn processes of coordinator.lab.proxy_app on loopback ports, sharing one "
            "counter store, three lock masters and PostgreSQL (embedded unless given), seed a "
            "demo API key with a budget, print the URLs, the servers and a curl to try, and run "
            "until Ctrl-C or SIGTERM."
        ),
    )
    parser.add_argument("--pods", type=positive_int, default=3, help="uvicorn processes")
    parser.add_argument(
        "--key-budget", type=non_negative, default=3.0, help="the demo key's budget"
    )
    parser.add_argument("--cost", type=non_negative, default=1.0, help="simulated cost per request")
    parser.add_argument(
        "--latency-ms", type=non_negative, default=20.0, help="simulated model latency"
    )
    add_server_flags(parser)
    parser.set_defaults(run=_proxy)


def _proxy(args: argparse.Namespace) -> int:
    with started_servers(args.redis_url, args.lock_url, args.pg_dsn) as deployment:
        servers = deployment.servers
        demo = asyncio.run(seed_demo(servers, key_budget=args.key_budget, cost=args.cost))
        settings = {
            "DEBUG": "1",
            "MASTER_KEY": DEMO_MASTER_KEY,
            "COST": repr(args.cost),
            "LATENCY_MS": repr(args.latency_ms),
        }
        with run_pods(servers, args.pods, settings) as pods:
            try:  # from the banner on: its reader may stop us as soon as it has read it
                print(_banner(pods, demo, deployment), flush=True)
                while all(pod.process.poll() is None for pod in pods):
                    time.sleep(0.5)
            except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI raises it for both)
                print("stopping the pods", file=sys.stderr)
                return 0
            dead = next(pod for pod in pods if pod.process.poll() is not None)
            raise ProxyError(
                f"{dead.name} exited with code {dead.process.returncode}:\n{dead.log_tail()}"
            )
