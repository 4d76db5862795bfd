"""Counters a coordinator keeps about its own work (a snapshot is ``coordinator.stats``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Stats:
    hits: int = 0  # get found the counter on its first GET
    misses: int = 0  # get found no counter and went to the rebuild path
    joined: int = 0  # misses that joined this process's rebuild already in flight
    loader_calls: int = 0  # DB reads through the protocol (fallback reads excluded)
    loader_errors: int = 0
    leases_won: int = 0
    leases_lost: int = 0  # acquire attempts another holder won; the caller backed off
    lease_extensions: int = 0
    seeds_won: int = 0  # fenced SET NX wrote the counter
    seeds_lost: int = 0  # the counter was present when the winner tried to write
    fenced_writes: int = 0  # the write was refused: a newer token or a reset exists
    lock_degraded: int = 0  # attempts made without a lease: no lock quorum
    timeouts: int = 0  # calls whose deadline passed
    fallback_reads: int = 0  # direct loader reads of the on_timeout="load" fallback
    store_errors: int = 0
    under_replicated: int = 0  # writes no replica acknowledged in time (``replicas`` > 0)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
