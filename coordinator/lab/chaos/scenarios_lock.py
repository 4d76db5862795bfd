"""Faults of the lock masters: one killed, paused or cut off by a stalled link; two killed."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Sequence

from ..pods import Pod
from .messages import Profile, Report
from .reports import loads, max_wait, outcomes, same, stat, values
from .table import Run, scenario
from .tcp_proxy import TcpProxy


def _cold_race(run: Run, profile: Profile, pods: Sequence[Pod], db_value: float) -> list[Report]:
    key = run.key(db_value)
    work = run.work(profile, key, callers=4, db_delay=0.2)
    return run.fleet.finish(run.fleet.start_together(pods, work))


def _one_read_race(run: Run, label: str, reports: Sequence[Report], db_value: float) -> None:
    got, reads = values(reports), loads(reports)
    run.check(got == [db_value] * len(outcomes(reports)), f"{label}: got {dict(Counter(got))}")
    run.check(reads == 1, f"{label}: {reads} DB reads, not 1")
    run.check(stat(reports, "lock_degraded") == 0, f"{label}: the lock degraded")


def _healthy_then_faulted(
    run: Run,
    profile: Profile,
    pods: int,
    db_value: float,
    fault: str,
    inject: Callable[[], None],
    recover: Callable[[], None] = lambda: None,
) -> tuple[list[Report], list[Report]]:
    """A cold race, then another with ``fault`` injected (and recovered from after it): both
    judged, each one DB read; the row takes the faulted race's reads, fenced writes and
    slowest call."""
    fleet = run.pods(pods, profile)
    healthy = _cold_race(run, profile, fleet, db_value)
    inject()
    try:
        faulted = _cold_race(run, profile, fleet, db_value)
    finally:
        recover()
    for label, reports in (("healthy", healthy), (fault, faulted)):
        run.judge(reports, ceiling=db_value, deadline=profile.wait)
        _one_read_race(run, label, reports, db_value)
    run.tally(faulted)
    run.row.max_wait = max_wait(faulted)
    return healthy, faulted


def _median_wait(reports: Sequence[Report]) -> float:
    return statistics.median(o.seconds for o in outcomes(reports))


@scenario(
    "master-killed",
    fault="1 of 3 lock masters killed",
    expected="still 1 DB read per miss, under a lease on the 2 live masters: one seed, none fenced",
    needs=("masters",),
)
def _master_killed(run: Run) -> None:
    profile = run.profile(wait=10.0)
    kill = run.env.masters[0].kill
    healthy, degraded = _healthy_then_faulted(run, profile, 4, 55.0, "1 master down", kill)
    won, fenced = stat(degraded, "seeds_won"), stat(degraded, "fenced_writes")
    run.check((won, fenced) == (1, 0), f"1 master down: {won} seeds won, {fenced} fenced")
    # The waits are reported for a reader, never checked: a busy machine stretches them.
    before, after = _median_wait(healthy), _median_wait(degraded)
    run.row.facts.update(seeds_won=won, healthy_median=before, degraded_median=after)
    run.observe(f"1 DB read, 1 seed; median wait {after:.3f}s vs healthy {before:.3f}s")


def _stalled_master(
    run: Run, stall: Callable[[], None], heal: Callable[[], None], profile: Profile
) -> None:
    healthy, stalled = _healthy_then_faulted(run, profile, 3, 61.0, "stalled master", stall, heal)
    slowest = max_wait(stalled)
    run.row.facts.update(healthy_max=max_wait(healthy), stalled_max=slowest)
    run.observe(
        f"1 DB read; slowest call {slowest:.2f}s (healthy {max_wait(healthy):.2f}s, "
        f"lock timeout {dict(profile.options)['lock_timeout']:g}s)"
    )


@scenario(
    "master-paused",
    fault="1 of 3 lock masters paused (SIGSTOP)",
    expected="costs lock socket timeouts, not a hang: 1 DB read, every call within its deadline",
    needs=("masters",),
)
def _master_paused(run: Run) -> None:
    master = run.env.masters[0]
    _stalled_master(run, master.pause, master.resume, run.profile(wait=5.0, lock_timeout=0.3))


@scenario(
    "master-link-stalled",
    fault="link to 1 of 3 lock masters stalls (TCP proxy holds every byte)",
    expected="costs lock socket timeouts, not a hang: 1 DB read, every call within its deadline",
)
def _master_link_stalled(run: Run) -> None:
    first, *rest = run.env.servers.lock_urls
    with TcpProxy.to(first) as proxy:
        profile = run.profile(lock_urls=[proxy.url, *rest], wait=5.0, lock_timeout=0.3)
        _stalled_master(run, proxy.stall, proxy.heal, profile)


@scenario(
    "majority-killed",
    fault="2 of 3 lock masters killed",
    expected="degraded per-pod reads (<= 1 per pod) within the deadline, still fenced: one seed",
    needs=("masters",),
)
def _majority_killed(run: Run) -> None:
    db_value, wait, pods = 13.5, 5.0, 4
    profile = run.profile(wait=wait)
    fleet = run.pods(pods, profile)
    run.env.masters[0].kill()
    run.env.masters[1].kill()
    reports = _cold_race(run, profile, fleet, db_value)
    run.judge(reports, ceiling=db_value, deadline=wait)
    got, reads, won, present, fenced = run.seeded_once(reports, db_value, pods)
    run.check(stat(reports, "lock_degraded") >= 1, "the lock never degraded")
    run.row.facts.update(db_value=db_value, seeds_won=won, seeds_present=present)
    run.observe(
        f"{same(got, db_value)}; {reads} DB reads ({won} seeded, {present} found it, "
        f"{fenced} fenced)"
    )
