"""Faults of a Redis Cluster counter store (``chaos --cluster``): the counter's slot
migrated to another master; the counter's master killed and its replica promoted; the same
after the replica was cut off from its master, without and with WAIT for replicas."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

from ..table import number
from .messages import Report
from .reports import errors, loads, outcomes, stat, values
from .table import Run, scenario

_WAIT = 5.0


def _ceiling(reports: Sequence[Report], db_value: float) -> float:
    """The most the counter may hold: the DB value, the adds acknowledged, and the adds that
    raised (a ``StoreError`` on an add means its outcome is unknown)."""
    return db_value + sum(1 for o in outcomes(reports, "add") if o.value is not None or o.error)


@scenario(
    "cluster-slot-migrated",
    fault="the counter's slot migrated to another master mid-traffic (MIGRATING / "
    "IMPORTING for 0.3 s, the counter moved with its companions)",
    expected="no CROSSSLOT; refusals are typed StoreErrors that applied nothing; counter == "
    "DB value + adds acknowledged; no rebuild",
    needs=("cluster",),
)
def _slot_migrated(run: Run) -> None:
    db_value = 100.0
    key = run.key(db_value)
    profile = run.profile(wait=_WAIT)
    pods = run.pods(4, profile)
    run.fleet.finish([run.fleet.start(pods[0], run.work(profile, key))])
    traffic = run.work(profile, key, ops=("get", "add"), callers=4, duration=2.5, pace=0.005)
    tickets = run.fleet.start_together(pods, traffic)
    time.sleep(1.0)
    cluster = run.env.cluster
    assert cluster is not None
    source = cluster.master_of(key)
    target = cluster.migrate(key, hold=0.3)
    reports = run.fleet.finish(tickets)
    final = run.env.counter(key)
    adds, failed = values(reports, "add"), errors(reports)
    crossslot = [error for error in failed if "CROSSSLOT" in error]
    run.judge(reports, ceiling=_ceiling(reports, db_value), deadline=_WAIT, allowed={"StoreError"})
    run.check(target is not source, "the slot did not move")
    run.check(not crossslot, f"{len(crossslot)} CROSSSLOT errors")
    run.check(
        final == db_value + len(adds),
        f"counter {final}, not {number(db_value)} + {len(adds)} adds acknowledged",
    )
    run.check(loads(reports) == 0, f"{loads(reports)} rebuilds of a counter that never vanished")
    run.tally(reports)
    run.row.facts.update(final=final, adds=len(adds), errors=len(failed))
    run.observe(
        f"slot moved {source.port} -> {target.port}: {len(adds)} adds, {len(failed)} refused; "
        f"counter {number(final)} = {number(db_value)} + {len(adds)}"
    )


@scenario(
    "cluster-master-killed",
    fault="the counter's master killed (SIGKILL) mid-traffic; its replica promoted",
    expected="typed StoreErrors during the failover, values after it; the counter never "
    "above DB value + adds (the replica may lack the last ones); at most 1 rebuild",
    needs=("cluster",),
)
def _master_killed(run: Run) -> None:
    db_value = 100.0
    key = run.key(db_value)
    profile = run.profile(wait=_WAIT)
    pods = run.pods(4, profile)
    run.fleet.finish([run.fleet.start(pods[0], run.work(profile, key))])
    cluster = run.env.cluster
    assert cluster is not None
    master = cluster.master_of(key)
    replica = cluster.replica_of(master)
    traffic = run.work(profile, key, ops=("get", "add"), callers=4, duration=6.0, pace=0.005)
    tickets = run.fleet.start_together(pods, traffic)
    time.sleep(1.0)
    master.kill()
    promoted = cluster.wait_replaced(master)
    reports = run.fleet.finish(tickets)
    final = run.env.counter(key)
    adds, failed = values(reports, "add"), errors(reports)
    gets = values(reports, "get")
    run.judge(reports, ceiling=_ceiling(reports, db_value), deadline=_WAIT, allowed={"StoreError"})
    run.check(promoted is replica, f"{promoted!r} took over, not the replica {replica!r}")
    run.check(bool(failed), "no call failed while the master was down")
    run.check(
        final is not None and db_value <= final <= _ceiling(reports, db_value),
        f"counter {final} outside {number(db_value)}..{number(_ceiling(reports, db_value))}",
    )
    run.check(loads(reports) <= 1, f"{loads(reports)} rebuilds, at most 1 expected")
    run.tally(reports)
    lost = None if final is None else db_value + len(adds) - final
    run.row.facts.update(final=final, adds=len(adds), errors=len(failed), lost=lost)
    run.observe(
        f"{len(failed)} StoreErrors during the failover, {len(gets)} reads; counter "
        f"{number(final)}, {number(lost)} acknowledged adds lost by the promoted replica"
    )


def _replica_cut_off(run: Run, replicas: int) -> None:
    db_value = 100.0
    key = run.key(db_value)
    profile = run.profile(wait=_WAIT, replicas=replicas)
    pods = run.pods(4, profile)
    run.fleet.finish([run.fleet.start(pods[0], run.work(profile, key))])
    cluster = run.env.cluster
    assert cluster is not None
    master = cluster.master_of(key)
    replica = cluster.replica_of(master)
    traffic = run.work(profile, key, ops=("get", "add"), callers=4, duration=5.0, pace=0.005)
    tickets = run.fleet.start_together(pods, traffic)
    time.sleep(1.0)
    replica.pause()
    cluster.cut_replicas(master)
    time.sleep(0.3)
    master.kill()
    replica.resume()
    promoted = cluster.wait_replaced(master)
    reports = run.fleet.finish(tickets)
    final = run.env.counter(key)
    adds, failed = values(reports, "add"), errors(reports)
    reported = stat(reports, "under_replicated")
    run.judge(reports, ceiling=_ceiling(reports, db_value), deadline=_WAIT, allowed={"StoreError"})
    run.check(promoted is replica, f"{promoted!r} took over, not the replica {replica!r}")
    lost = db_value + len(adds) - (final or 0.0)
    if replicas:
        run.check(lost <= reported, f"{lost:g} adds lost, only {reported} reported unreplicated")
    else:
        run.check(lost >= 1, "the replica cut off lost nothing: the fault did not take")
    run.tally(reports)
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
