"""Mass recovery: 4 pods serving 1,000 live counters when the counter store restarts empty.
Coordinated pods read each counter from the DB exactly once, fleet-wide, with no errors."""

from __future__ import annotations

from dataclasses import replace

from coordinator.lab.bench.recovery import QUICK_RECOVERY, mass_recovery
from coordinator.lab.embedded import EmbeddedServers
from coordinator.lab.servers import Servers


def test_a_restarted_store_is_rebuilt_once_per_counter(
    servers: EmbeddedServers, own_servers: EmbeddedServers
) -> None:
    assert servers.postgres is not None
    # The store and the lock masters are this test's own: the store is restarted.
    deployment = Servers(
        own_servers.redis[0].url,
        tuple(server.url for server in own_servers.redis[1:4]),
        servers.postgres.dsn,
    )
    plan = replace(QUICK_RECOVERY, counters=1_000, pods=4, strategies=("coordinated",))
    result = mass_recovery(deployment, own_servers.redis[0], plan, lambda _: None)
    (run,) = result["runs"]
    assert run["recovered"]
    assert run["db_reads_before_restart"] == 0
    assert run["db_reads"] == plan.counters
    assert run["errors"] == 0
    assert run["wrong_values"] == 0
