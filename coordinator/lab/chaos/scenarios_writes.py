"""Writes that must not land or must land once: a rebuild doomed by a budget reset, an
increment whose reply is lost."""

from __future__ import annotations

import time

from ..pods import Pod
from ..table import number
from .common import LEASE, SLACK
from .fleet import Ticket
from .messages import Profile
from .reports import errors, loads, max_wait, values
from .table import Run, scenario
from .tcp_proxy import TcpProxy


def _doomed_rebuild(run: Run, profile: Profile, spent: float) -> tuple[str, Ticket, Pod, Pod]:
    """A rebuild that read ``spent`` and holds it, then a budget reset by another pod: the
    key, the doomed rebuild's ticket, its pod, and a third pod."""
    key = run.key(spent)
    holder, resetter, other = run.pods(3, profile)
    doomed = run.fleet.start(holder, run.work(profile, key, stall=True))
    run.fleet.loaded(doomed)
    run.db.put(key, 0.0)  # the budget period rolls over: spend back to zero, then the reset
    reset = run.fleet.finish([run.fleet.start(resetter, run.work(profile, key, ops=("reset",)))])
    run.judge(reset, ceiling=0.0, deadline=profile.wait)
    return key, doomed, holder, other


@scenario(
    "reset-during-rebuild",
    fault="budget reset (another pod) while a rebuild holds the pre-reset read",
    expected="the pre-reset read never written (fenced); the counter restarts from the "
    "reset; readers after the reset (other pods) never wait on the doomed lease",
)
def _reset_during_rebuild(run: Run) -> None:
    spent, wait = 500.0, 10.0
    profile = run.profile(lease=LEASE, lease_extensions=3, wait=wait)
    key, doomed, holder, reader = _doomed_rebuild(run, profile, spent)
    with run.env.watch(key) as seen:
        # The readers' rebuild reads the DB while the doomed holder still holds its lease,
        # then holds too: when the doomed write comes, the key is absent and only the fence
        # can stop it.
        after = run.fleet.start(reader, run.work(profile, key, callers=4, stall=True))
        run.fleet.loaded(after, timeout=wait)
        fenced = run.fleet.stats(holder, profile)["fenced_writes"]
        run.fleet.release(doomed)
        run.fleet.until(holder, profile, "fenced_writes", fenced + 1, timeout=wait)
        absent = run.env.counter(key)
        run.fleet.release(after)
        reports = run.fleet.finish([doomed, after])
        stale, fresh = reports
        adds = run.fleet.finish(
            [run.fleet.start(reader, run.work(profile, key, ops=("incr",) * 2))]
        )
    final = run.env.counter(key)
    run.judge([fresh, *adds], ceiling=2.0, deadline=wait)
    run.judge([stale], ceiling=spent, deadline=wait)  # it started before the reset
    run.check(absent is None, f"the key held {absent} when the doomed write was fenced")
    run.check(spent not in seen, f"the pre-reset read {spent:g} was written")
    run.check(values([fresh]) == [0.0] * 4, f"readers after the reset got {values([fresh])}")
    run.check(loads([fresh]) == 1, f"readers after the reset read the DB {loads([fresh])} times")
    run.check(
        fresh.stats["leases_lost"] == 0,
        "readers after the reset lost a lease attempt to the doomed holder",
    )
    run.check(sorted(values(adds)) == [1.0, 2.0], f"increments after the reset: {values(adds)}")
    run.check(final == 2.0, f"counter {final}, not 0 + 2 increments")
    run.tally(reports)
    run.row.facts.update(final=final, seen=sorted({v for v in seen if v is not None}))
    run.observe(
        f"pre-reset read never written ({stale.stats['fenced_writes']} fenced); readers after "
        f"the reset read 0 while the doomed lease was held, 0 leases lost; counter "
        f"{number(final)} = 0 + 2"
    )


@scenario(
    "reset-reader-in-holder-pod",
    fault="budget reset (another pod) while a rebuild holds the pre-reset read; a reader in "
    "the rebuilding pod after the reset",
    expected="the reader gets the post-reset value, within the doomed holder's lease",
)
def _reset_reader_in_holder_pod(run: Run) -> None:
    spent, lease, extensions, wait = 500.0, 0.5, 1, 10.0
    profile = run.profile(lease=lease, lease_extensions=extensions, wait=wait)
    key, doomed, holder, _ = _doomed_rebuild(run, profile, spent)
    bound = lease * (extensions + 1)
    late = run.fleet.start(holder, run.work(profile, key, callers=2))
    # The doomed loader outlives its lease and extensions (and SLACK) before it returns.
    time.sleep(bound + SLACK + 0.5)
    run.fleet.release(doomed)
    (stale,) = run.fleet.finish([doomed])
    (reader,) = run.fleet.finish([late])
    run.judge([stale], ceiling=spent, deadline=wait)
    run.judge([reader], ceiling=0.0, deadline=wait)
    got = values([reader])
    run.check(got == [0.0, 0.0], f"readers after the reset got {got}, not the reset value 0")
    run.check(
        max_wait([reader]) <= bound + SLACK,
        f"readers after the reset waited {max_wait([reader]):.2f}s behind the doomed rebuild "
        f"(its lease: {bound:g}s)",
    )
    run.tally([stale], db_reads=loads([stale, reader]))
    run.row.facts.update(returned=got, joined=reader.stats["joined"])
    run.observe(f"readers got {got} after {max_wait([reader]):.2f}s")


@scenario(
    "store-reply-lost",
    fault="store replies to increments lost after the store ran them (TCP proxy drops the link)",
    expected="each increment applied exactly once; a lost reply surfaces as a typed StoreError",
    needs=("single-store",),
)
def _store_reply_lost(run: Run) -> None:
    db_value, rounds = 20.0, 5
    key = run.key(db_value)
    with TcpProxy.to(run.env.servers.redis_url) as proxy:
        profile = run.profile(store_url=proxy.url, wait=5.0)
        (pod,) = run.pods(1, profile)
        warm = run.fleet.finish([run.fleet.start(pod, run.work(profile, key, ops=("get", "add")))])
        reports = []
        for _ in range(rounds):
            # Increments are scripts (EVALSHA); the warm counter's reads are plain GETs.
            proxy.drop_replies(1, to=b"EVALSHA")
            incr = run.work(profile, key, ops=("incr",))
            reports += run.fleet.finish([run.fleet.start(pod, incr)])
        dropped = proxy.dropped
    final = run.env.counter(key)
    # Every increment reached the store once through the proxy, which dropped its reply.
    exact = db_value + 1 + rounds
    run.judge(reports, ceiling=exact, deadline=5.0, allowed={"StoreError"})
    run.check(values(warm) == [db_value, db_value + 1], f"warm-up got {values(warm)}")
    run.check(dropped == rounds, f"{dropped} replies dropped, not {rounds}")
    run.check(
        final == exact,
        f"counter {final} after {rounds} increments of 1 from {db_value + 1:g}, not {exact:g}: "
        f"applied {(final or 0) - db_value - 1:g} times",
    )
    run.row.db_reads = loads(warm)
    run.row.fenced_writes = 0
    run.row.facts.update(final=final, exact=exact, returned=values(reports))
    run.observe(
        f"{dropped} replies dropped: {len(values(reports))} increments returned, "
        f"{errors(reports).count('StoreError')} StoreErrors; "
        f"counter {number(final)} (exactly {number(exact)})"
    )
