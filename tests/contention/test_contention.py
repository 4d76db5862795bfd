"""Lock contention across real processes: P pods (spawned OS processes, each with its own
coordinator and PostgreSQL pool) x C concurrent callers, released together onto cold or hot
counters whose values are PostgreSQL rows. The pods are ``coordinator.lab.chaos`` pods, shared by
the whole module (spawned once, up to 16). The servers are healthy, so the pods' clients are
``PATIENT``: on a busy machine a descheduled server must not be declared dead here.

Every call is also judged as in the fault table (``Run.judge``): it ended with a value (or a
typed error) within its deadline, never above the DB value plus the increments applied.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import pytest
from patience import PATIENT

from coordinator.lab.chaos import (
    Lab,
    Profile,
    Report,
    Run,
    loads,
    outcomes,
    stat,
    values,
)
from coordinator.lab.embedded import EmbeddedServers
from coordinator.lab.servers import Deployment

WAIT = 15.0
CALLERS = 8
SWEEP = [1, 4, 8, 16]


@pytest.fixture(scope="module")
def lab(servers: EmbeddedServers) -> Iterator[Lab]:
    with Lab(Deployment.embedded(servers)) as lab:
        yield lab


@pytest.fixture
def run(lab: Lab, request: pytest.FixtureRequest) -> Iterator[Run]:
    trial = lab.trial(request.node.name)
    yield trial
    assert trial.row.failures == []


def expire(run: Run, key: str) -> float | None:
    """GETDEL from outside, as a TTL expiry or an eviction would: the value it had."""
    with run.env.client() as client:
        raw = client.getdel(key)
    return None if raw is None else float(raw)


def patient(run: Run, **options: float) -> Profile:
    """The pods' options: the deadline, ``PATIENT`` client timeouts, and ``options``."""
    return run.profile(wait=WAIT, **PATIENT, **options)


def race(
    run: Run, pods: int, *keys: str, lease: float = 10.0, lease_extensions: int = 3, **work: object
) -> list[Report]:
    """``pods`` pods released together onto ``keys``; their reports."""
    profile = patient(run, lease=lease, lease_extensions=lease_extensions)
    fleet = run.pods(pods, profile)
    return run.fleet.finish(run.fleet.start_together(fleet, run.work(profile, *keys, **work)))


def by_key(reports: Sequence[Report], key: str, op: str | None = None) -> list[float]:
    return [
        o.value
        for o in outcomes(reports)
        if o.key == key and o.value is not None and op in (None, o.op)
    ]


@pytest.mark.parametrize("pods", SWEEP)
def test_a_cold_key_is_read_once_fleet_wide_per_cold_window(run: Run, pods: int) -> None:
    key = run.key()
    for db_value in (100.0, 250.5):  # the second window: the counter expired, spend grew
        run.db.put(key, db_value)
        expire(run, key)
        reports = race(run, pods, key, callers=CALLERS, db_delay=0.1)
        run.judge(reports, ceiling=db_value, deadline=WAIT)
        assert loads(reports) == 1
        assert values(reports) == [db_value] * (pods * CALLERS)
        assert stat(reports, "seeds_won") == 1
        assert run.env.counter(key) == db_value


@pytest.mark.parametrize("pods", SWEEP)
def test_many_cold_keys_are_each_read_once_fleet_wide(run: Run, pods: int) -> None:
    db_values = {run.key(10.0 + i): 10.0 + i for i in range(8)}
    keys = tuple(db_values)
    reports = race(run, pods, *keys, callers=2 * len(keys), db_delay=0.1)
    run.judge(reports, ceiling=max(db_values.values()), deadline=WAIT)
    for key, db_value in db_values.items():
        assert loads(reports, key) == 1, key
        assert by_key(reports, key) == [db_value] * (2 * pods)
        assert run.env.counter(key) == db_value
    assert stat(reports, "seeds_won") == len(keys)


@pytest.mark.parametrize("pods", [4, 8])
def test_lease_expiry_rounds_read_boundedly_and_never_overshoot_the_db(run: Run, pods: int) -> None:
    # The loader (0.7 s) outlives the lease (0.3 s, no extension): each holder is overtaken.
    key = run.key()
    for db_value in (40.0, 65.0):
        run.db.put(key, db_value)
        expire(run, key)
        with run.env.watch(key) as seen:
            reports = race(run, pods, key, callers=4, db_delay=0.7, lease=0.3, lease_extensions=0)
        run.judge(reports, ceiling=db_value, deadline=WAIT)
        # Bounded: a pod's callers share its one flight, and a flight reads at most once.
        assert 1 <= loads(reports) <= pods
        assert values(reports) == [db_value] * (4 * pods)
        assert stat(reports, "seeds_won") == 1
        assert set(seen) <= {None, db_value}
        assert run.env.counter(key) == db_value


def expire_repeatedly(run: Run, keys: Sequence[str], seconds: float) -> dict[str, list[float]]:
    """GETDEL the keys in turn, one every 50 ms, for ``seconds``: each counter's value at
    the moment it vanished (one entry per incarnation)."""
    vanished: dict[str, list[float]] = {key: [] for key in keys}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for key in keys:
            value = expire(run, key)
            if value is not None:
                vanished[key].append(value)
            time.sleep(0.05)
    return vanished


@pytest.mark.parametrize("pods", [4, 16])
def test_hot_keys_expiring_while_increments_flow_lose_and_inflate_nothing(
    run: Run, pods: int
) -> None:
    db_values = {run.key(1000.0 * i): 1000.0 * i for i in (1, 2, 3)}
    keys = tuple(db_values)
    profile = patient(run, lease=5.0)
    fleet = run.pods(pods, profile)
    work = run.work(profile, *keys, ops=("get", "add"), callers=6, duration=2.0, pace=0.005)
    tickets = run.fleet.start_together(fleet, work)
    vanished = expire_repeatedly(run, keys, 2.0)
    reports = run.fleet.finish(tickets)
    for key in keys:
        last = expire(run, key)
        vanished[key] += [] if last is None else [last]

    run.judge(reports, ceiling=max(db_values.values()) + len(outcomes(reports)), deadline=WAIT)
    for key, db_value in db_values.items():
        incarnations = vanished[key]
        applied = len(by_key(reports, key, "add"))  # each by 1.0
        assert incarnations, f"{key} was never seeded"
        # Every counter began as one seed of the DB value and then took increments; every
        # one ended in a GETDEL. So the values they vanished with add up to exactly the
        # seeds plus every increment applied: none lost, none counted twice, no snapshot
        # added on top of a counter.
        assert sum(incarnations) == len(incarnations) * db_value + applied
        assert all(db_value <= v <= db_value + applied for v in by_key(reports, key))
    seeds = sum(len(incarnations) for incarnations in vanished.values())
    assert stat(reports, "seeds_won") == seeds
    assert loads(reports) == seeds  # one DB read per cold window, fleet-wide
