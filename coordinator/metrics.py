"""Prometheus metrics for coordinators and budget guards (the ``metrics`` extra).

One :class:`PrometheusObserver` per process (per registry) is the intended use: pass it to
every coordinator of the process as ``observer=``, and to the budget guard. Its counters are
the :class:`~coordinator.stats.Stats` fields, so without the extra ``coordinator.stats``
gives the same numbers, per coordinator, without the durations.

=====================================  =========  ==============  ==========================
metric (namespace ``reseed``)          type       labels          meaning
=====================================  =========  ==============  ==========================
``reseed_<stats field>_total``         counter                    one per Stats field
``reseed_loader_seconds``              histogram                  one DB read (loader call)
``reseed_miss_wait_seconds``           histogram  role            a miss until its value
``reseed_budget_refusals_total``       counter    scope           budget checks refused
``reseed_budget_outages_total``        counter    policy          store outages by policy
=====================================  =========  ==============  ==========================
"""

from __future__ import annotations

from dataclasses import fields
from typing import get_args

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
except ImportError as exc:
    raise ImportError(
        "coordinator.metrics needs prometheus-client: "
        "pip install 'reseed-coordinator[metrics]' (or read coordinator.stats instead)"
    ) from exc

from .observe import MissRole
from .stats import Stats

# From a hit-path millisecond to a loader that ran into the default 15 s deadline.
SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0
)

_HELP = {
    "hits": "Reads that found the counter on their first GET.",
    "misses": "Reads that found no counter and took the rebuild path.",
    "joined": "Misses that joined this process's rebuild already in flight.",
    "loader_calls": "Loader calls (DB reads) made by rebuilds; fallback reads excluded.",
    "loader_errors": "Loader calls that failed or timed out.",
    "leases_won": "Redlock lease acquires won (this process rebuilt the counter).",
    "leases_lost": "Lease acquires another holder won; the caller backed off.",
    "lease_extensions": "Lease extensions while a slow loader ran.",
    "seeds_won": "Fenced SET NX writes that stored the rebuilt counter.",
    "seeds_lost": "Rebuilds that found the counter already present when writing.",
    "fenced_writes": "Rebuild writes refused because a newer rebuild or a reset exists.",
    "lock_degraded": "Rebuild attempts made without a lease: no lock quorum.",
    "timeouts": "Calls whose deadline passed.",
    "fallback_reads": "Direct loader reads of the on_timeout='load' fallback.",
    "store_errors": "Calls that failed on a counter store (Redis) error.",
}


class PrometheusObserver:
    """A :class:`~coordinator.observe.Observer` exporting to ``registry`` (default: the
    global ``prometheus_client.REGISTRY``), plus the budget guard's hooks."""

    def __init__(
        self, registry: CollectorRegistry | None = None, namespace: str = "reseed"
    ) -> None:
        self.registry = REGISTRY if registry is None else registry
        self.namespace = namespace
        self._counts: dict[str, Counter] = {}
        try:
            for field in fields(Stats):
                self._counter(field.name)
            self._loader = Histogram(
                "loader_seconds",
                "Duration of one loader call (the DB read of a rebuild), successful or not.",
                namespace=namespace,
                buckets=SECONDS_BUCKETS,
                registry=self.registry,
            )
            self._miss = Histogram(
                "miss_wait_seconds",
                "From a miss to its value: role=loaded ran the loader, role=waited waited "
                "for a rebuild elsewhere (this process or another one).",
                ["role"],
                namespace=namespace,
                buckets=SECONDS_BUCKETS,
                registry=self.registry,
            )
            self._refusals = Counter(
                "budget_refusals",
                "Budget checks refused because spend reached the budget, by scope.",
                ["scope"],
                namespace=namespace,
                registry=self.registry,
            )
            self._outages = Counter(
                "budget_outages",
                "Budget checks that met a counter store outage, by the policy applied.",
                ["policy"],
                namespace=namespace,
                registry=self.registry,
            )
        except ValueError as exc:
            raise ValueError(
                f"{namespace!r} metrics are already registered in this registry: share one "
                f"PrometheusObserver between the coordinators of a process ({exc})"
            ) from exc
        for role in get_args(MissRole):
            self._miss.labels(role=role)  # exported at 0 before the first miss

    def on_count(self, name: str, amount: int = 1) -> None:
        self._counter(name).inc(amount)

    def on_loader(self, seconds: float) -> None:
        self._loader.observe(seconds)

    def on_miss(self, role: MissRole, seconds: float) -> None:
        self._miss.labels(role=role).observe(seconds)

    def on_refusal(self, scope: str) -> None:
        """A budget check refused a request: the entity of ``scope`` reached its budget."""
        self._refusals.labels(scope=scope).inc()

    def on_outage(self, policy: str) -> None:
        """A budget check met a counter store outage and applied ``policy``."""
        self._outages.labels(policy=policy).inc()

    def _counter(self, name: str) -> Counter:
        counter = self._counts.get(name)
        if counter is None:
            # A count the core added after this module was written still gets exported.
            counter = Counter(
                name,
                _HELP.get(name, f"Coordinator stats field {name}."),
                namespace=self.namespace,
                registry=self.registry,
            )
            self._counts[name] = counter
        return counter
