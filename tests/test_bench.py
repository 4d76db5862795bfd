"""``python -m coordinator bench --quick --json``: the document's shape and its exact counts.

Timings are the bench's output, never asserted here; the counts (DB reads, final counter
over the DB value) are the strategies' defining properties, so they are exact. The servers are
healthy (but one lock master it kills), so the bench's clients are ``PATIENT``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from patience import PATIENT, PATIENT_FLAGS

from coordinator.lab.bench.command import VARIANTS
from coordinator.lab.bench.report import format_report, plot
from coordinator.lab.embedded import EmbeddedServers

LATENCY = {"n", "p50_ms", "p99_ms"}


@pytest.fixture(scope="module")
def quick(servers: EmbeddedServers, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quick run on the session's store and PostgreSQL; its lock masters are its own
    embedded ones, so that it may kill one."""
    assert servers.postgres is not None
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [
            *(sys.executable, "-m", "coordinator", "bench", "--quick", "--json"),
            *("--out", str(out), "--redis-url", servers.redis[0].url),
            *("--pg-dsn", servers.postgres.dsn),
            *PATIENT_FLAGS,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def test_every_strategy_is_measured_at_every_pod_count(quick: dict[str, Any]) -> None:
    plan = quick["plan"]
    cells = {(cell["strategy"], cell["pods"]): cell for cell in quick["cold_stampede"]}

    assert plan["pods"] == [2, 8]
    assert set(cells) == {(v.name, pods) for v in VARIANTS for pods in plan["pods"]}
    for cell in cells.values():
        assert cell["rounds"] == plan["reps"]
        assert cell["errors"] == 0, cell["error_types"]
        assert set(cell["latency"]) == {"all", "winners", "losers"}
        assert all(set(group) == LATENCY for group in cell["latency"].values())
        assert cell["latency"]["all"]["n"] == cell["pods"] * plan["callers"] * plan["reps"]


def test_counts_are_each_strategys_signature(quick: dict[str, Any]) -> None:
    for cell in quick["cold_stampede"]:
        if cell["strategy"].startswith("coordinated"):
            # One DB read per cold miss, fleet-wide: the winner pod's callers are 1 pod's.
            assert cell["db_reads_min"] == cell["db_reads_max"] == 1
            assert cell["latency"]["winners"]["n"] == quick["plan"]["callers"] * cell["rounds"]
        if cell["strategy"] == "naive":
            # Every pod that read the DB added the value once more.
            assert cell["final_over_db_max"] == cell["db_reads_max"]
        else:
            assert cell["final_over_db_min"] == cell["final_over_db_max"] == 1


def test_sections_and_metadata(quick: dict[str, Any]) -> None:
    [wakeup] = quick["seed_wakeup"]
    assert (wakeup["pods"], wakeup["db_delay_ms"]) == (8, 20.0)
    assert set(wakeup["p99_nowake_over_wake"]) == {"pooled", "paired"}
    assert [row["concurrency"] for row in quick["hot_path"]["by_concurrency"]] == [1, 8, 64]
    # The store is given by URL here: the bench must not restart it.
    assert "skipped" in quick["mass_recovery"]
    lock = {row["config"]: row for row in quick["lock_cost"]["by_config"]}
    assert list(lock) == ["1 master", "3 masters", "3 masters, 1 down"]
    assert all(row["failed"] == 0 for row in lock.values())
    assert set(quick["targets"]) == {
        "coordinated_db_reads_per_miss",
        "coordinated_p99_over_per_process_p99",
        "get_over_raw_get",
    }
    assert quick["targets"]["coordinated_db_reads_per_miss"]["met"] is True
    for name in ("python", "redis-py", "pottery", "redis-server", "postgresql"):
        assert quick["versions"][name]
    machine = quick["machine"]
    assert machine["cores"] == os.cpu_count()  # this machine's, not a placeholder
    assert quick["timeouts"] == PATIENT
    assert len(machine["load_average_before"]) == len(machine["load_average_after"]) == 3


def test_files_are_written(quick: dict[str, Any]) -> None:
    files = quick["files"]
    assert json.loads(Path(files["json"]).read_text())["cold_stampede"] == quick["cold_stampede"]
    assert Path(files["table"]).read_text().startswith("Cold stampede")
    # The plot needs the optional matplotlib: either it is drawn or a note says why not.
    assert "plot" in files or any("matplotlib" in note for note in quick["notes"])


def test_without_matplotlib_no_plot_and_a_note(
    quick: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails

    note = plot(quick, tmp_path / "bench.png")

    assert note is not None
    assert "matplotlib is not installed" in note
    assert not (tmp_path / "bench.png").exists()
    assert "coordinated-nowake" in format_report(quick)
