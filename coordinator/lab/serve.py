"""``python -m coordinator servers``: the embedded servers, kept running for your own code.

Starts a counter store, three lock masters and PostgreSQL (those not given by URL), prints
where they are as shell ``export`` lines (or ``--json``), and keeps them until Ctrl-C or
SIGTERM, which stop them and remove their temp dirs. The variables are the ones the
examples read and the ``doctor`` command takes as defaults.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from typing import Any

from .cliargs import CommandError, add_server_flags, print_json
from .servers import Deployment, Servers, started_servers

REDIS_URL = "RESEED_REDIS_URL"
LOCK_URLS = "RESEED_LOCK_URLS"  # comma-separated
PG_DSN = "RESEED_PG_DSN"


def environment(servers: Servers) -> dict[str, str]:
    """The servers as the environment variables the examples and ``doctor`` read."""
    return {
        REDIS_URL: servers.redis_url,
        LOCK_URLS: ",".join(servers.lock_urls),
        PG_DSN: servers.pg_dsn,
    }


def export_lines(servers: Servers) -> list[str]:
    return [f"export {name}={shlex.quote(value)}" for name, value in environment(servers).items()]


def describe(deployment: Deployment) -> dict[str, Any]:
    """The servers and what runs them, for ``--json``."""
    binary = deployment.redis_binary
    return {
        "redis_url": deployment.servers.redis_url,
        "lock_urls": list(deployment.servers.lock_urls),
        "pg_dsn": deployment.servers.pg_dsn,
        "env": environment(deployment.servers),
        "redis_server": None if binary is None else binary.as_dict(),
    }


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "servers",
        help="start the embedded servers and keep them for your own code; Ctrl-C stops them",
        description=(
            "Start an embedded counter store, 3 lock masters and PostgreSQL (those not given "
            f"by URL), print them as shell export lines ({REDIS_URL}, {LOCK_URLS} "
            f"comma-separated, {PG_DSN}) and keep them running until Ctrl-C or SIGTERM, "
            "which stop them and remove their files. Paste the lines into another shell to "
            "run the examples or the doctor against them."
        ),
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document instead of export lines"
    )
    add_server_flags(parser)
    parser.set_defaults(run=_servers)


def _stopped(deployment: Deployment) -> str | None:
    """Which embedded server is no longer running, if any."""
    if deployment.store is not None and not deployment.store.running:
        return f"the counter store ({deployment.servers.redis_url})"
    for master in deployment.masters:
        if not master.running:
            return f"the lock master {master.url}"
    postgres = deployment.postgres
    if postgres is not None and not postgres.external and not postgres.running:
        return "PostgreSQL"
    return None


def _servers(args: argparse.Namespace) -> int:
    with started_servers(args.redis_url, args.lock_url, args.pg_dsn) as deployment:
        # From the first line out: a reader may stop us as soon as it has the URLs.
        try:
            if args.json:
                print_json(describe(deployment))
            else:
                print("\n".join(export_lines(deployment.servers)))
            sys.stdout.flush()
            print("servers: running; Ctrl-C or SIGTERM stops them", file=sys.stderr, flush=True)
            while (stopped := _stopped(deployment)) is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("servers: stopping", file=sys.stderr, flush=True)
            return 0
        raise CommandError(f"{stopped} exited on its own; stopping the others")
