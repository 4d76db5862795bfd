"""Observability on real servers: the Prometheus exposition after races (one process, then
several), and the log lines the core emits for the events an operator must see."""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import fields

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from coordinator import Loader, ReseedCoordinator, lock
from coordinator.lab.embedded import EmbeddedServers
from coordinator.lab.pods import Barrier, Fleet, Link
from coordinator.metrics import PrometheusObserver
from coordinator.observe import MissRole
from coordinator.stats import Stats

CoordFactory = Callable[..., ReseedCoordinator]
DB_VALUE = 100.0
LOAD_SECONDS = 0.3  # long enough that every racer misses while the winner loads
TIMEOUT = 60.0  # bounds every wait on a child process


def samples(exposition: str | bytes) -> dict[str, float]:
    """Every sample of a text exposition, as ``name{label="value",...}`` -> value."""
    text = exposition.decode() if isinstance(exposition, bytes) else exposition
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{name}="{value}"' for name, value in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


async def slow_value() -> float:
    await asyncio.sleep(LOAD_SECONDS)
    return DB_VALUE


async def race(
    coordinators: Sequence[ReseedCoordinator], key: str, loader: Loader, callers: int
) -> list[float]:
    """``callers`` concurrent gets of ``key`` on every coordinator."""
    return await asyncio.gather(*(c.get(key, loader) for c in coordinators for _ in range(callers)))


async def test_exposition_after_a_race_shows_one_loader_call(
    make_coordinator: CoordFactory,
) -> None:
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    loads = Counter[str]()

    async def counted() -> float:
        loads["cold"] += 1
        return await slow_value()

    coordinators = [make_coordinator(observer=observer) for _ in range(4)]
    assert await race(coordinators, "cold", counted, callers=5) == [DB_VALUE] * 20
    scraped = samples(generate_latest(registry))
    assert loads["cold"] == scraped["reseed_loader_calls_total"] == 1
    assert scraped["reseed_leases_won_total"] == scraped["reseed_seeds_won_total"] == 1
    assert scraped["reseed_loader_seconds_count"] == 1
    assert scraped["reseed_loader_seconds_sum"] >= LOAD_SECONDS * 0.9
    assert scraped['reseed_loader_seconds_bucket{le="0.1"}'] == 0
    assert scraped['reseed_loader_seconds_bucket{le="+Inf"}'] == 1
    misses = scraped["reseed_misses_total"]
    assert scraped['reseed_miss_wait_seconds_count{role="loaded"}'] == 1
    assert scraped['reseed_miss_wait_seconds_count{role="waited"}'] == misses - 1
    # The stats of the coordinators add up to the exposition, field by field.
    for field in fields(Stats):
        total = sum(getattr(c.stats, field.name) for c in coordinators)
        assert scraped[f"reseed_{field.name}_total"] == total, field.name


def test_names_types_and_budget_labels() -> None:
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry, namespace="proxy")
    observer.on_refusal("team")
    observer.on_refusal("team")
    observer.on_outage("fail_open")
    types = {
        family.name: family.type
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        if not family.name.endswith("_created")  # prometheus_client's creation timestamps
    }
    assert types == {
        **{f"proxy_{field.name}": "counter" for field in fields(Stats)},
        "proxy_budget_refusals": "counter",
        "proxy_budget_outages": "counter",
        "proxy_loader_seconds": "histogram",
        "proxy_miss_wait_seconds": "histogram",
    }
    scraped = samples(generate_latest(registry))
    assert scraped['proxy_budget_refusals_total{scope="team"}'] == 2
    assert scraped['proxy_budget_outages_total{policy="fail_open"}'] == 1
    roles: tuple[MissRole, ...] = ("loaded", "waited")
    for role in roles:  # exported before the first miss, so rate() works from the start
        assert scraped[f'proxy_miss_wait_seconds_count{{role="{role}"}}'] == 0


def test_a_second_observer_on_one_registry_is_refused_clearly() -> None:
    registry = CollectorRegistry()
    PrometheusObserver(registry)
    with pytest.raises(ValueError, match="share one PrometheusObserver"):
        PrometheusObserver(registry)
    PrometheusObserver(registry, namespace="other")


def test_without_the_extra_the_import_error_names_the_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "coordinator.metrics")
    with pytest.raises(ImportError, match=r"pip install 'reseed-coordinator\[metrics\]'"):
        importlib.import_module("coordinator.metrics")


# -- several processes, each with its own registry -------------------------------------


async def scraping_pod(
    link: Link, store_url: str, lock_urls: list[str], key: str, start: Barrier
) -> None:
    """A pod: race on ``key`` after the barrier; send the exposition."""
    registry = CollectorRegistry()
    async with ReseedCoordinator.from_urls(
        store_url, lock_urls=lock_urls, observer=PrometheusObserver(registry)
    ) as coordinator:
        await asyncio.to_thread(start.wait, TIMEOUT)
        await race([coordinator], key, slow_value, callers=4)
    link.send(generate_latest(registry).decode())


async def test_processes_scraped_separately_add_up_to_one_loader_call(
    servers: EmbeddedServers, store: Redis
) -> None:
    pods = 3
    key = f"cold:{uuid.uuid4().hex}"
    with Fleet("scraping-pod-") as fleet:
        start = fleet.barrier(pods)
        args = (servers.redis[0].url, [s.url for s in servers.redis[1:4]], key, start)
        members = [fleet.spawn(scraping_pod, *args) for _ in range(pods)]
        expositions = await asyncio.to_thread(fleet.answers, members, TIMEOUT)
    scraped = [samples(text) for text in expositions]
    assert sum(s["reseed_loader_calls_total"] for s in scraped) == 1
    assert sum(s["reseed_hits_total"] + s["reseed_misses_total"] for s in scraped) == pods * 4
    assert float(await store.get(key) or 0) == DB_VALUE


# -- log lines ---------------------------------------------------------------------------


def problems(records: Sequence[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if r.levelno >= logging.WARNING]


async def test_dead_lock_masters_log_one_warning_per_failed_acquire(
    own_servers: EmbeddedServers,
    make_own_coordinator: CoordFactory,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    # The master-error report is rate limited process-wide: start this test's window fresh.
    monkeypatch.setattr(lock.master_errors, "_reported_at", -math.inf)
    coordinator = make_own_coordinator()
    own_servers.redis[3].kill()  # a minority down: acquires still win; one report says so
    assert await coordinator.get("one-down", slow_value) == DB_VALUE
    reported = problems(caplog.records)
    assert [getattr(r, "outcome", None) for r in reported] == ["master_error"]
    own_servers.redis[2].kill()  # a majority down: each attempt degrades, one warning each
    for key in ("two-down:a", "two-down:b"):
        assert await coordinator.get(key, slow_value) == DB_VALUE
    warnings = problems(caplog.records)[len(reported) :]
    assert coordinator.stats.lock_degraded == 2
    assert [(r.name, r.levelname) for r in warnings] == [("coordinator.lock", "WARNING")] * 2
    assert all(getattr(r, "outcome", None) == "degraded" for r in warnings)
    assert "lock quorum unavailable" in warnings[0].getMessage()
    # pottery's ERROR with a traceback per failed master call is filtered at its source.
    assert not [r for r in caplog.records if r.exc_info]


async def test_a_fenced_write_is_logged_with_key_and_token(
    make_coordinator: CoordFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="coordinator")
    coordinator = make_coordinator()
    loading, proceed = asyncio.Event(), asyncio.Event()

    async def stalled() -> float:
        loading.set()
        await proceed.wait()
        return DB_VALUE

    rebuild = asyncio.create_task(coordinator.get("fenced", stalled))
    await asyncio.wait_for(loading.wait(), 10)
    await coordinator.reset("fenced")  # a budget reset while the rebuild holds its DB read
    proceed.set()
    assert await rebuild == DB_VALUE
    [record] = [r for r in caplog.records if r.name == "coordinator.coordinator"]
    assert (record.levelname, record.getMessage()) == ("INFO", "fenced write refused")
    assert record.key == "fenced"
    assert isinstance(record.token, int)
    assert coordinator.stats.fenced_writes == 1
