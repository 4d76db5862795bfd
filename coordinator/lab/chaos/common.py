"""What every part of the chaos table shares: the source-of-truth query, the bounds and
the names of operations and outcomes."""

from __future__ import annotations

from typing import Literal

from ..cliargs import CommandError

TABLE = "reseed_chaos"
# pg_sleep in FROM runs once per query: the DB delay holds a real connection.
QUERY = f"SELECT spend FROM {TABLE}, pg_sleep($2) WHERE id = $1"

#: Headroom on every "did not hang" bound, for a busy 2-core machine. Never a speed claim.
SLACK = 2.0
#: The short lease of the lease-expiry scenarios.
LEASE = 1.0
HANG = "Hang"  # the error name of a call that outlived its bound

Op = Literal["get", "add", "incr", "reset"]
Status = Literal["pass", "FAIL", "skip"]


class ChaosError(CommandError):
    """The table could not be run: a server is unreachable, or a pod failed as a whole."""
