"""The servers a lab command runs on: those given by URL, plus embedded ones (a counter store,
three lock masters, PostgreSQL) for whatever is missing, with handles on the embedded ones
for the commands that inject faults into them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import asyncpg
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio import RedisCluster as AsyncRedisCluster
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisError

from ..clients import is_cluster_url, parse_cluster_url, redact
from .cliargs import CommandError, describe
from .embedded import (
    EmbeddedServerError,
    EmbeddedServers,
    PostgresServer,
    RedisBinary,
    RedisServer,
    choose_redis_server,
)
from .embedded.cluster import EmbeddedCluster

#: A server a fault needs a handle on: the counter store, the lock masters, PostgreSQL; or
#: a counter store that is one server (a proxy in front of it sees all its traffic), or the
#: embedded Redis Cluster.
Need = Literal["store", "masters", "postgres", "single-store", "cluster"]


class ServersError(CommandError):
    """The embedded servers could not be started."""


@dataclass(frozen=True)
class Servers:
    redis_url: str
    lock_urls: tuple[str, ...]
    pg_dsn: str


@dataclass(frozen=True)
class Deployment:
    """The servers to run on, and handles on the embedded ones (None or empty for those
    given by URL), for callers that kill, pause or restart them."""

    servers: Servers
    store: RedisServer | None = None
    masters: tuple[RedisServer, ...] = ()
    postgres: PostgresServer | None = None
    redis_binary: RedisBinary | None = None  # what the embedded redis servers run
    cluster: EmbeddedCluster | None = None  # the embedded cluster that is the counter store

    @classmethod
    def embedded(cls, running: EmbeddedServers) -> Deployment:
        """redis[0] the store, redis[1:4] the lock masters, and the bundle's PostgreSQL."""
        if running.postgres is None:
            raise ValueError("a deployment needs PostgreSQL: start the bundle with postgres=True")
        masters = tuple(running.redis[1:4])
        return cls(
            Servers(
                running.redis[0].url, tuple(server.url for server in masters), running.postgres.dsn
            ),
            running.redis[0],
            masters,
            running.postgres,
        )

    def controls(self, need: Need) -> bool:
        """Whether a fault may be injected into ``need`` (it is embedded, ours to break)."""
        if need == "store":
            return self.store is not None
        if need == "single-store":
            return not is_cluster_url(self.servers.redis_url)
        if need == "cluster":
            return self.cluster is not None
        if need == "masters":
            return len(self.masters) >= 3
        return self.postgres is not None and not self.postgres.external

    def lacking(self, needs: Sequence[Need]) -> str:
        """Why faults into ``needs`` (not :meth:`controls`) cannot be injected."""
        if "single-store" in needs or ("store" in needs and self.cluster is not None):
            return "needs a single store: the counter store is a Redis Cluster"
        if "cluster" in needs:
            return "needs the embedded Redis Cluster (--cluster)"
        return f"needs embedded servers ({', '.join(needs)}): URLs were given"

    def restore(self) -> None:
        """Bring back whatever a fault killed, paused or stopped."""
        for server in [*([self.store] if self.store else []), *self.masters]:
            if server.running:
                server.resume()
            else:
                server.start()
        if self.postgres is not None and not self.postgres.external:
            self.postgres.start()
        if self.cluster is not None:
            for node in self.cluster.nodes:
                if node.running:
                    node.resume()
                else:
                    node.start()  # rejoins as a replica of the master promoted in its place
            self.cluster.wait_ok()

    def client(self, url: str | None = None) -> Redis | RedisCluster:
        """A client on ``url``, by default the counter store."""
        return store_client(url or self.servers.redis_url, socket_timeout=5.0)

    def counter(self, key: str) -> float | None:
        with self.client() as client:
            raw = client.get(key)
        return None if raw is None else float(raw)

    @contextlib.contextmanager
    def watch(self, key: str) -> Iterator[list[float | None]]:
        """Every value the counter holds while the block runs, polled every 10 ms."""
        seen: list[float | None] = []
        done = threading.Event()

        def poll() -> None:
            with self.client() as client:
                while not done.is_set():
                    raw = client.get(key)
                    seen.append(None if raw is None else float(raw))
                    done.wait(0.01)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield seen
        finally:
            done.set()
            thread.join(10.0)

    def remove(self, prefix: str) -> None:
        """Remove every key under ``prefix`` (counters and fence hashes) from the store."""
        with self.client() as client:
            doomed = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            if doomed:
                client.delete(*doomed)


def store_client(url: str, **options: Any) -> Redis | RedisCluster:
    """A lab client (redis-py's defaults, retries included) on ``url``: one server, or a
    cluster named by ``redis+cluster://``."""
    if not is_cluster_url(url):
        return Redis.from_url(url, **options)
    node_url, nodes = parse_cluster_url(url)
    startup = [ClusterNode(host, port) for host, port in nodes]  # type: ignore[no-untyped-call]
    return RedisCluster.from_url(node_url, startup_nodes=startup, **options)


def commands_processed(client: Redis | RedisCluster) -> tuple[int, int]:
    """Commands processed so far by the counter store (by every master of a cluster), and
    how many servers were asked (each counts this INFO in its next answer)."""
    nodes: list[Any] = [None]
    if isinstance(client, RedisCluster):
        nodes = client.get_primaries()  # type: ignore[no-untyped-call]
    infos = [
        client.info("stats") if node is None else client.info("stats", target_nodes=node)
        for node in nodes
    ]
    return sum(int(info["total_commands_processed"]) for info in infos), len(infos)


def async_store_client(url: str, **options: Any) -> AsyncRedis | AsyncRedisCluster:
    """:func:`store_client`, asyncio flavour."""
    if not is_cluster_url(url):
        return AsyncRedis.from_url(url, **options)
    node_url, nodes = parse_cluster_url(url)
    startup = [AsyncClusterNode(host, port) for host, port in nodes]
    return AsyncRedisCluster.from_url(node_url, startup_nodes=startup, **options)


def _redis_problem(role: str, url: str) -> str | None:
    try:
        with store_client(url, socket_timeout=5.0, socket_connect_timeout=5.0) as client:
            client.ping()
    except (RedisError, ValueError) as exc:  # ValueError: a URL redis-py cannot parse
        return f"cannot reach the {role} at {redact(url)}: {describe(exc)}"
    return None


def unreachable(servers: Servers) -> str | None:
    """Why the counter store or a lock master does not answer (None: they all do)."""
    for role, url in [("counter store", servers.redis_url)] + [
        ("lock master", url) for url in servers.lock_urls
    ]:
        problem = _redis_problem(role, url)
        if problem is not None:
            return problem
    return None


async def _postgres_problem(dsn: str) -> str | None:
    try:
        conn = await asyncpg.connect(dsn, timeout=10.0)
    except Exception as exc:  # asyncpg raises OSError, its own errors or ValueError
        return f"cannot connect to PostgreSQL at {redact(dsn)}: {describe(exc)}"
    await conn.close()
    return None


def check_given(redis_url: str | None, lock_urls: Sequence[str], pg_dsn: str | None) -> None:
    """Fail with one line naming the first server given by URL (or ``RESEED_PG_DSN``) that
    does not answer, and how to fix it, before any embedded server is started."""
    redis = [("counter store", "--redis-url", redis_url)] if redis_url else []
    redis += [("lock master", "--lock-url", url) for url in lock_urls]
    for role, flag, url in redis:
        problem = _redis_problem(role, url)
        if problem is not None:
            raise ServersError(f"{problem} (check {flag}, or leave it out to start one)")
    env_dsn = os.environ.get("RESEED_PG_DSN") or None
    dsn = pg_dsn or env_dsn
    if dsn is not None:
        problem = asyncio.run(_postgres_problem(dsn))
        if problem is not None:
            where = "--pg-dsn" if pg_dsn else "RESEED_PG_DSN (unset it to start one)"
            fix = f"check {where}" + (", or leave it out to start one" if pg_dsn else "")
            raise ServersError(f"{problem} ({fix})")


@contextlib.contextmanager
def started_servers(
    redis_url: str | None = None,
    lock_urls: Sequence[str] = (),
    pg_dsn: str | None = None,
    *,
    cluster: bool = False,
) -> Iterator[Deployment]:
    """The servers given, plus embedded ones for whatever is missing (the counter store,
    three lock masters, PostgreSQL), stopped on exit. The servers given are checked first;
    the redis-server binary of the embedded ones is announced on stderr. ``cluster``: an
    embedded counter store is a Redis Cluster (3 masters, 3 replicas), with no handle for
    faults."""
    check_given(redis_url, lock_urls, pg_dsn)
    if cluster and not redis_url:
        with (
            _embedded_cluster() as nodes,
            started_servers(nodes.url, lock_urls, pg_dsn) as deployment,
        ):
            yield replace(deployment, cluster=nodes)
        return
    embedded_redis = (0 if redis_url else 1) + (0 if lock_urls else 3)
    if not embedded_redis and pg_dsn:
        yield Deployment(Servers(redis_url or "", tuple(lock_urls), pg_dsn))
        return
    try:
        binary = choose_redis_server() if embedded_redis else None
        running = EmbeddedServers(redis_count=embedded_redis, postgres=not pg_dsn)
        running.start()
    except EmbeddedServerError as exc:
        raise ServersError(f"cannot start the embedded servers: {exc}") from exc
    try:
        if binary is not None:
            print(f"embedded redis-server: {binary.describe()}", file=sys.stderr, flush=True)
        spare = iter(running.redis)
        store = None if redis_url else next(spare)
        masters = () if lock_urls else tuple(spare)
        postgres = running.postgres
        servers = Servers(
            redis_url or (store.url if store else ""),
            tuple(lock_urls) or tuple(server.url for server in masters),
            pg_dsn or (postgres.dsn if postgres else ""),
        )
        yield Deployment(servers, store, masters, postgres, binary)
    finally:
        running.close()


@contextlib.contextmanager
def _embedded_cluster() -> Iterator[EmbeddedCluster]:
    try:
        running = EmbeddedCluster()
        running.start()
    except EmbeddedServerError as exc:
        raise ServersError(f"cannot start the embedded cluster: {exc}") from exc
    try:
        yield running
    finally:
        running.close()
