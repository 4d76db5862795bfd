"""The fault table (docs/design.md, Faults), one test per row, on real servers and pods.

Each test runs the same scenario as ``python -m coordinator chaos`` (``coordinator.lab.chaos``)
and asserts on the row it returns. Every scenario has already checked that every call of
every pod ended with a value or a typed error within its deadline and that no value was
above the DB value plus the increments applied (``row.failures`` lists what did not hold);
the tests add the numbers each row promises.

The servers are this module's own (4 redis-servers and a PostgreSQL): the scenarios kill,
pause and restart them. The pods are shared by the whole module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from coordinator.lab import chaos
from coordinator.lab.chaos import Lab, Row, Run, Scenario
from coordinator.lab.cli import main
from coordinator.lab.embedded import EmbeddedServers
from coordinator.lab.servers import Deployment


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with (
        EmbeddedServers(redis_count=4, postgres=True) as running,
        Lab(Deployment.embedded(running)) as lab,
    ):
        yield lab


def run(lab: Lab, name: str) -> Row:
    row = lab.run(name)
    assert row.status != "skip", row.observed
    assert row.failures == [], row.failures
    assert row.passed
    return row


def test_lease_holder_killed_mid_rebuild(lab: Lab) -> None:
    row = run(lab, "holder-killed")
    assert row.db_reads == 2  # the dead holder's read, and exactly one more
    assert row.facts["final"] == row.facts["db_value"]


def test_holder_paused_past_its_lease_is_fenced_out_when_resumed(lab: Lab) -> None:
    row = run(lab, "holder-paused")
    assert row.fenced_writes == 1
    assert row.facts["written_by_stale"] is None  # the key was absent: the fence refused it
    assert row.facts["final"] == row.facts["new"]


def test_loader_slower_than_the_lease(lab: Lab) -> None:
    row = run(lab, "slow-loader")
    assert row.db_reads is not None
    assert 1 <= row.db_reads <= row.facts["pods"]
    assert row.facts["final"] == row.facts["db_value"]


def test_loader_slower_than_the_lease_many_pods_no_livelock(lab: Lab) -> None:
    row = run(lab, "slow-loader-many-pods")
    assert row.db_reads is not None
    assert 1 <= row.db_reads <= row.facts["pods"]
    assert row.fenced_writes == row.db_reads - 1  # all but the one seed wrote nothing
    assert row.facts["final"] == row.facts["db_value"]


def test_one_of_three_lock_masters_killed(lab: Lab) -> None:
    row = run(lab, "master-killed")
    assert row.db_reads == 1
    assert (row.facts["seeds_won"], row.fenced_writes) == (1, 0)


def test_one_of_three_lock_masters_paused(lab: Lab) -> None:
    row = run(lab, "master-paused")
    assert row.db_reads == 1


def test_link_to_a_lock_master_stalls(lab: Lab) -> None:
    row = run(lab, "master-link-stalled")
    assert row.db_reads == 1


def test_majority_of_lock_masters_killed(lab: Lab) -> None:
    row = run(lab, "majority-killed")
    assert row.facts["seeds_won"] == 1
    assert row.db_reads is not None
    assert row.db_reads <= 4  # one per pod


def test_counter_store_restarted_empty_mid_traffic(lab: Lab) -> None:
    row = run(lab, "store-restarted")
    assert row.db_reads == 2  # the first seed and the one rebuild
    facts = row.facts
    assert facts["final"] == facts["second"] + facts["increments_after"]


def test_a_caller_arriving_as_a_timed_out_rebuild_winds_down(lab: Lab) -> None:
    row = run(lab, "rebuild-winding-down")
    assert row.facts["late"] == [17.0, 17.0]


def test_postgres_stopped(lab: Lab) -> None:
    row = run(lab, "db-stopped")
    assert set(row.facts["errors"]) == {"SourceError"}
    assert row.facts["recovered"] == [31.0, 31.0]


def test_postgres_slower_than_the_deadline(lab: Lab) -> None:
    row = run(lab, "db-slow")
    assert set(row.facts["errors"]) == {"ReseedTimeoutError"}
    assert row.facts["recovered"] == [31.0, 31.0]


def test_budget_reset_during_a_rebuild(lab: Lab) -> None:
    row = run(lab, "reset-during-rebuild")
    assert row.fenced_writes == 1
    assert set(row.facts["seen"]) <= {0.0, 1.0, 2.0}  # never the pre-reset 500
    assert row.facts["final"] == 2.0


def test_reader_after_a_reset_in_the_doomed_rebuilds_pod(lab: Lab) -> None:
    run(lab, "reset-reader-in-holder-pod")


def test_store_replies_lost_after_increments_ran(lab: Lab) -> None:
    row = run(lab, "store-reply-lost")
    assert row.facts["final"] == row.facts["exact"]  # once each: never resent


def test_every_row_of_the_table_has_a_test() -> None:
    tested = {
        "holder-killed", "holder-paused", "slow-loader", "slow-loader-many-pods",
        "master-killed", "master-paused", "master-link-stalled", "majority-killed",
        "store-restarted", "rebuild-winding-down", "db-stopped", "db-slow",
        "reset-during-rebuild",
        "reset-reader-in-holder-pod", "store-reply-lost",
        "cluster-slot-migrated", "cluster-master-killed",  # in tests/test_cluster.py
        "cluster-replica-cut-off", "cluster-replica-cut-off-wait",
    }  # fmt: skip
    assert set(chaos.SCENARIOS) == tested


# -- the command -----------------------------------------------------------------------


def test_faults_that_need_a_server_it_cannot_kill_are_skipped(lab: Lab) -> None:
    # The same servers, given as URLs (a staging deployment): nothing to kill.
    with Lab(Deployment(lab.env.servers)) as given:
        for name in ("master-killed", "store-restarted", "db-stopped"):
            row = given.run(name)
            assert row.status == "skip"
            assert "needs embedded servers" in row.observed


def server_flags(servers: EmbeddedServers) -> list[str]:
    """The session's servers as the command's URL flags: no embedded servers started."""
    assert servers.postgres is not None
    flags = ["--redis-url", servers.redis[0].url, "--pg-dsn", servers.postgres.dsn]
    for master in servers.redis[1:4]:
        flags += ["--lock-url", master.url]
    return flags


def test_chaos_command_prints_json_rows_and_exits_zero_when_all_pass(
    servers: EmbeddedServers, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = server_flags(servers)
    code = main(["chaos", "--json", "--only", "db-slow", "--only", "master-killed", *flags])
    rows = json.loads(capsys.readouterr().out)
    assert [(row["name"], row["status"]) for row in rows] == [
        ("db-slow", "pass"),
        ("master-killed", "skip"),
    ]
    assert code == 0


def _always_fails(run: Run) -> None:
    run.check(False, "injected failure")


def test_chaos_command_exits_non_zero_when_a_row_fails(
    servers: EmbeddedServers, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = Scenario("always-fails", "a fault", "nothing", _always_fails)
    monkeypatch.setitem(chaos.SCENARIOS, failing.name, failing)
    assert main(["chaos", "--only", "always-fails", *server_flags(servers)]) == 1
    out = capsys.readouterr().out
    assert "injected failure" in out
    assert "1 FAIL" in out
