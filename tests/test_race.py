"""The multi-process race (``python -m coordinator race``) on the session's real servers.

Every race spawns real OS processes; the counts asserted here (DB reads, final counter) are
the whole point of the three strategies, so they are exact. The servers are healthy, so the
pods' clients are ``PATIENT`` (``--socket-timeout``/``--lock-timeout`` on the command line).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from patience import PATIENT_FLAGS, PATIENT_TIMEOUTS

from coordinator.lab import cli, race
from coordinator.lab.embedded import EmbeddedServers
from coordinator.lab.pods import Link
from coordinator.lab.race import PodSpec, RaceError, RaceResult, Strategy, run_race
from coordinator.lab.servers import Servers

DB_VALUE = 123.25


@pytest.fixture(scope="module")
def race_servers(servers: EmbeddedServers) -> Servers:
    assert servers.postgres is not None
    return Servers(
        redis_url=servers.redis[0].url,
        lock_urls=tuple(server.url for server in servers.redis[1:4]),
        pg_dsn=servers.postgres.dsn,
    )


def _race(servers: Servers, strategy: Strategy, pods: int, callers: int = 8) -> RaceResult:
    result = run_race(
        strategy, servers, pods=pods, callers=callers, db_value=DB_VALUE, timeouts=PATIENT_TIMEOUTS
    )
    assert result.errors == 0, result.error_types
    assert (result.pods, result.callers, result.db_value) == (pods, callers, DB_VALUE)
    return result


@pytest.mark.parametrize("pods", [4, 8])
def test_coordinated_reads_the_db_once_fleet_wide(race_servers: Servers, pods: int) -> None:
    result = _race(race_servers, "coordinated", pods)

    assert result.db_reads == 1
    assert result.final_counter == DB_VALUE
    assert result.min_returned == result.max_returned == DB_VALUE
    assert result.stats is not None
    assert result.stats["loader_calls"] == 1
    assert result.stats["lock_degraded"] == result.stats["fenced_writes"] == 0


def test_per_process_reads_the_db_once_per_pod(race_servers: Servers) -> None:
    result = _race(race_servers, "per-process", 4)

    assert result.db_reads == 4
    assert result.final_counter == DB_VALUE
    assert result.min_returned == result.max_returned == DB_VALUE
    assert result.stats is None


def test_naive_inflates_the_counter_once_per_pod(race_servers: Servers) -> None:
    result = _race(race_servers, "naive", 4)

    assert result.db_reads == 4
    assert result.final_counter == 4 * DB_VALUE
    assert result.inflation == 4
    assert result.max_returned == 4 * DB_VALUE


def test_cli_prints_one_json_object(race_servers: Servers) -> None:
    args = ["race", "--pods", "2", "--callers", "4", "--strategy", "coordinated", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "coordinator", *args, *_server_args(race_servers)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["strategy"] == "coordinated"
    assert (result["pods"], result["callers"]) == (2, 4)
    assert result["final_counter"] == result["db_value"] == 100.0
    assert result["db_reads"] == 1
    assert result["errors"] == 0
    for name in ("min_returned", "max_returned", "p50_ms", "p99_ms"):
        assert name in result


def _server_args(servers: Servers) -> list[str]:
    locks = [arg for url in servers.lock_urls for arg in ("--lock-url", url)]
    return ["--redis-url", servers.redis_url, *locks, "--pg-dsn", servers.pg_dsn, *PATIENT_FLAGS]


@pytest.mark.parametrize("flag", ["--socket-timeout", "--lock-timeout"])
def test_a_timeout_must_be_positive(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["race", flag, "0"])

    assert exited.value.code == 2
    assert "expected a number > 0, got 0" in capsys.readouterr().err


def test_all_strategies_print_one_table(
    race_servers: Servers, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["race", "--pods", "2", "--callers", "2", "--strategy", "all"]

    assert cli.main([*args, *_server_args(race_servers)]) == 0

    header, rule, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["strategy", "pods", "x"]
    assert set(rule) == {"-", " "}
    table = {row.split()[0]: row.split() for row in rows[:3]}
    assert list(table) == ["coordinated", "per-process", "naive"]
    # final counter column: the DB value, except naive's one copy per pod
    assert [table[name][5] for name in table] == ["100", "100", "200"]


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def test_unreachable_store_is_a_clear_setup_error(
    race_servers: Servers, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _closed_port_url()
    broken = Servers(url, race_servers.lock_urls, race_servers.pg_dsn)

    assert cli.main(["race", "--pods", "2", "--strategy", "naive", *_server_args(broken)]) == 2
    assert f"cannot reach the counter store at {url}" in capsys.readouterr().err


def test_unreachable_postgres_raises_before_any_pod_starts(race_servers: Servers) -> None:
    dsn = "postgresql://postgres@127.0.0.1:1/postgres"
    broken = Servers(race_servers.redis_url, race_servers.lock_urls, dsn)

    with pytest.raises(RaceError, match="cannot connect to PostgreSQL"):
        run_race("coordinated", broken, pods=2, callers=2)


async def _die_before_the_start(link: Link, spec: PodSpec, index: int) -> None:
    if index == 0:
        os._exit(3)
    await race.race_pod(link, spec, index)


@pytest.mark.timeout(60)
def test_a_pod_dying_before_the_start_fails_the_race_without_a_hang(
    race_servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The spawned pods import this module for the target; their race module is unpatched.
    monkeypatch.setattr(race, "race_pod", _die_before_the_start)

    with pytest.raises(RaceError) as failed:
        run_race("per-process", race_servers, pods=3, callers=2)

    lines = str(failed.value).splitlines()
    assert lines[1].strip() == "pod 0: pod exited with code 3 without a report"
    assert all("start barrier broke" in line for line in lines[2:])
