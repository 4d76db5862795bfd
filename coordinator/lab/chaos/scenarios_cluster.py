"""Faults of a Redis Cluster counter store (``chaos --cluster``): the counter's slot
migrated to another master; the counter's master killed and its replica promoted; the same
after the replica was cut off from its master, without and with WAIT for replicas."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

from ..embedded.cluster import EmbeddedCluster
from ..table import number
from .fleet import Ticket
from .messages import Report
from .reports import errors, loads, outcomes, stat, values
from .table import Run, scenario

_WAIT = 5.0
_DB_VALUE = 100.0


def _traffic(
    run: Run, duration: float, **options: Any
) -> tuple[str, EmbeddedCluster, list[Ticket]]:
    """Four pods reading and adding 1 to a warm counter for ``duration`` seconds, 1 s in:
    the key, the cluster, the tickets to finish."""
    key = run.key(_DB_VALUE)
    profile = run.profile(wait=_WAIT, **options)
    pods = run.pods(4, profile)
    run.fleet.finish([run.fleet.start(pods[0], run.work(profile, key))])
    cluster = run.env.cluster
    assert cluster is not None  # the scenarios need ("cluster",)
    traffic = run.work(profile, key, ops=("get", "add"), callers=4, duration=duration, pace=0.005)
    tickets = run.fleet.start_together(pods, traffic)
    time.sleep(1.0)
    return key, cluster, tickets


def _finished(
    run: Run, key: str, tickets: Sequence[Ticket]
) -> tuple[list[Report], float | None, list[float], list[str]]:
    """The traffic judged: every call a value or a StoreError in time, never above
    :func:`_ceiling`; the reports, the final counter, the adds' values and the errors."""
    reports = run.fleet.finish(tickets)
    run.judge(reports, ceiling=_ceiling(reports), deadline=_WAIT, allowed={"StoreError"})
    run.tally(reports)
    return reports, run.env.counter(key), values(reports, "add"), errors(reports)


def _ceiling(reports: Sequence[Report]) -> float:
    """The most the counter may hold: the DB value, the adds acknowledged, and the adds that
    raised (a ``StoreError`` on an add means its outcome is unknown)."""
    return _DB_VALUE + sum(1 for o in outcomes(reports, "add") if o.value is not None or o.error)


@scenario(
    "cluster-slot-migrated",
    fault="the counter's slot migrated to another master mid-traffic (MIGRATING / "
    "IMPORTING for 0.3 s, the counter moved with its companions)",
    expected="no CROSSSLOT; refusals are typed StoreErrors that applied nothing; counter == "
    "DB value + adds acknowledged; no rebuild",
    needs=("cluster",),
)
def _slot_migrated(run: Run) -> None:
    key, cluster, tickets = _traffic(run, 2.5)
    source = cluster.master_of(key)
    target = cluster.migrate(key, hold=0.3)
    reports, final, adds, failed = _finished(run, key, tickets)
    crossslot = [error for error in failed if "CROSSSLOT" in error]
    run.check(target is not source, "the slot did not move")
    run.check(not crossslot, f"{len(crossslot)} CROSSSLOT errors")
    run.check(
        final == _DB_VALUE + len(adds),
        f"counter {final}, not {number(_DB_VALUE)} + {len(adds)} adds acknowledged",
    )
    run.check(loads(reports) == 0, f"{loads(reports)} rebuilds of a counter that never vanished")
    run.row.facts.update(final=final, adds=len(adds), errors=len(failed))
    run.observe(
        f"slot moved {source.port} -> {target.port}: {len(adds)} adds, {len(failed)} refused; "
        f"counter {number(final)} = {number(_DB_VALUE)} + {len(adds)}"
    )


@scenario(
    "cluster-master-killed",
    fault="the counter's master killed (SIGKILL) mid-traffic; its replica promoted",
    expected="typed StoreErrors during the failover, values after it; the counter never "
    "above DB value + adds (the replica may lack the last ones); at most 1 rebuild",
    needs=("cluster",),
)
def _master_killed(run: Run) -> None:
    key, cluster, tickets = _traffic(run, 6.0)
    master = cluster.master_of(key)
    replica = cluster.replica_of(master)
    master.kill()
    promoted = cluster.wait_replaced(master)
    reports, final, adds, failed = _finished(run, key, tickets)
    run.check(promoted is replica, f"{promoted!r} took over, not the replica {replica!r}")
    run.check(bool(failed), "no call failed while the master was down")
    run.check(
        final is not None and _DB_VALUE <= final <= _ceiling(reports),
        f"counter {final} outside {number(_DB_VALUE)}..{number(_ceiling(reports))}",
    )
    run.check(loads(reports) <= 1, f"{loads(reports)} rebuilds, at most 1 expected")
    lost = None if final is None else _DB_VALUE + len(adds) - final
    run.row.facts.update(final=final, adds=len(adds), errors=len(failed), lost=lost)
    run.observe(
        f"{len(failed)} StoreErrors during the failover, {len(values(reports, 'get'))} reads; "
        f"counter {number(final)}, {number(lost)} acknowledged adds lost by the promoted replica"
    )


def _replica_cut_off(run: Run, replicas: int) -> None:
    key, cluster, tickets = _traffic(run, 5.0, replicas=replicas)
    master = cluster.master_of(key)
    replica = cluster.replica_of(master)
    replica.pause()
    cluster.cut_replicas(master)
    time.sleep(0.3)
    master.kill()
    replica.resume()
    promoted = cluster.wait_replaced(master)
    reports, final, adds, failed = _finished(run, key, tickets)
    reported = stat(reports, "under_replicated")
    run.check(promoted is replica, f"{promoted!r} took over, not the replica {replica!r}")
    lost = _DB_VALUE + len(adds) - (final or 0.0)
    if replicas:
        run.check(lost <= reported, f"{lost:g} adds lost, only {reported} reported unreplicated")
    else:
        run.check(lost >= 1, "the replica cut off lost nothing: the fault did not take")
    run.row.facts.update(
        final=final, adds=len(adds), errors=len(failed), lost=lost, reported=reported
    )
    run.observe(
        f"{number(lost)} of {len(adds)} acknowledged adds lost by the promoted replica, "
        f"{reported} writes reported unreplicated; {len(failed)} StoreErrors"
    )


_CUT = (
    "the counter's replica cut off from its master (paused, link killed) 0.3 s before the "
    "master is killed (SIGKILL) and that replica promoted"
)
scenario(
    "cluster-replica-cut-off",
    fault=_CUT,
    expected="the adds the master acknowledged since the cut are lost, silently (counted); "
    "never above DB value + adds",
    needs=("cluster",),
)(functools.partial(_replica_cut_off, replicas=0))
scenario(
    "cluster-replica-cut-off-wait",
    fault=f"{_CUT}; pods WAIT for 1 replica (100 ms)",
    expected="every add the promoted replica lacks was reported unreplicated; never above "
    "DB value + adds",
    needs=("cluster",),
)(functools.partial(_replica_cut_off, replicas=1))
