"""Faults of the lease holder: killed, paused past its lease, slower than its lease."""

from __future__ import annotations

import time

from ..table import number
from .common import LEASE
from .reports import loads, same, stat, values
from .table import Run, scenario


@scenario(
    "holder-killed",
    fault="lease holder SIGKILLed mid-rebuild",
    expected="another pod rebuilds after the lease: 1 extra DB read, every caller the DB value",
)
def _holder_killed(run: Run) -> None:
    db_value, wait = 42.5, 10.0
    key = run.key(db_value)
    profile = run.profile(lease=LEASE, lease_extensions=3, wait=wait)
    holder, *others = run.pods(3, profile)
    doomed = run.fleet.start(holder, run.work(profile, key, stall=True))
    run.fleet.loaded(doomed)
    waiting = [run.fleet.start(pod, run.work(profile, key, callers=4)) for pod in others]
    # Let the others meet the live lease, so that they must wait out a dead holder.
    time.sleep(LEASE / 2)
    holder.kill()
    reports = run.fleet.finish(waiting)
    run.judge(reports, ceiling=db_value, deadline=wait)
    got, extra, final = values(reports), loads(reports), run.env.counter(key)
    run.check(got == [db_value] * 8, f"callers got {got}, not 8 x {db_value}")
    run.check(extra == 1, f"{extra} DB reads after the holder died, not 1")
    run.check(final == db_value, f"counter {final}, not {db_value}")
    run.tally(reports, db_reads=1 + extra)
    run.row.facts.update(
        db_value=db_value, final=final, extra_reads=extra, leases_lost=stat(reports, "leases_lost")
    )
    run.observe(f"{same(got, db_value)}; {extra} extra DB read; counter {number(final)}")


@scenario(
    "holder-paused",
    fault="holder SIGSTOPped past its lease, SIGCONT after a newer rebuild took its token",
    expected="its write fenced out (the key still absent, so only the fence stops it); "
    "the counter keeps the newer value",
)
def _holder_paused(run: Run) -> None:
    old, new, wait = 10.0, 250.0, 30.0
    key = run.key(old)
    profile = run.profile(lease=LEASE, lease_extensions=3, wait=wait)
    paused, newer = run.pods(2, profile)
    stale = run.fleet.start(paused, run.work(profile, key, stall=True))
    run.fleet.loaded(stale)
    # Frozen, its lease keeper stops extending: the lease lapses within LEASE.
    paused.pause()
    try:
        run.db.put(key, new)
        # The newer rebuild wins the lapsed lease, takes a newer token, reads, and holds:
        # when the paused holder seeds, the key is absent and its token is not the newest.
        fresh = run.fleet.start(newer, run.work(profile, key, stall=True))
        run.fleet.loaded(fresh, timeout=LEASE + 15.0)
    finally:
        paused.resume()
    run.fleet.release(stale)
    (late,) = run.fleet.finish([stale])
    written = run.env.counter(key)
    run.fleet.release(fresh)
    (won,) = run.fleet.finish([fresh])
    reports = [late, won]
    run.judge(reports, ceiling=new, deadline=wait)
    final = run.env.counter(key)
    run.check(late.stats["fenced_writes"] == 1, f"paused holder: stats {late.stats}")
    run.check(late.stats["seeds_won"] == 0, "the paused holder's stale write landed")
    run.check(written is None, f"the paused holder wrote {written}")
    run.check(values([won]) == [new], f"the newer rebuild returned {values([won])}")
    run.check(won.stats["seeds_won"] == 1, f"newer rebuild: stats {won.stats}")
    run.check(final == new, f"counter {final}, not the newer {new}")
    run.tally(reports)
    run.row.facts.update(
        old=old, new=new, final=final, stale_returned=values([late]), written_by_stale=written
    )
    run.observe(
        f"stale write fenced ({late.stats['fenced_writes']}), counter {number(final)} "
        f"(stale read {old:g}, newer {new:g})"
    )


def _slow_loader(run: Run, *, pods: int, extensions: int, lease: float, delay: float) -> None:
    db_value, wait = 7.25, 15.0
    key = run.key(db_value)
    profile = run.profile(lease=lease, lease_extensions=extensions, wait=wait)
    fleet = run.pods(pods, profile)
    tickets = run.fleet.start_together(fleet, run.work(profile, key, callers=4, db_delay=delay))
    reports = run.fleet.finish(tickets)
    run.judge(reports, ceiling=db_value, deadline=wait)
    got, reads, *_ = run.seeded_once(reports, db_value, pods)
    final = run.env.counter(key)
    run.check(final == db_value, f"counter {final}, not {db_value}")
    run.row.facts.update(db_value=db_value, final=final, pods=pods)
    run.observe(f"{same(got, db_value)}; {reads} DB reads for {pods} pods; counter {number(final)}")


@scenario(
    "slow-loader",
    fault=f"loader slower than the lease and its extensions ({LEASE / 2:g}s x 2 < 1.5s)",
    expected="bounded extra DB reads (<= 1 per pod), every caller the DB value, one seed",
)
def _slow_loader_few(run: Run) -> None:
    _slow_loader(run, pods=3, extensions=1, lease=LEASE / 2, delay=1.5)


@scenario(
    "slow-loader-many-pods",
    fault="loader slower than the lease (0.4s < 1s), 6 pods x 4 callers",
    expected="no livelock: <= 1 DB read per pod, every caller the DB value, one seed",
)
def _slow_loader_many(run: Run) -> None:
    _slow_loader(run, pods=6, extensions=0, lease=0.4, delay=1.0)
