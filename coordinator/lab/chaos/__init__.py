"""The fault table (docs/design.md, Faults) as scenarios: ``python -m coordinator chaos``.

Every scenario drives *pods*: spawned OS processes, each with its own coordinators, Redis
clients and a :class:`~coordinator.sources.PostgresSource` pool reading a real PostgreSQL row
(``pg_sleep`` in the query makes a slow read hold a real connection). The parent process
injects the fault (SIGKILL or SIGSTOP of a pod, a killed, paused or restarted redis-server,
a stopped PostgreSQL, a TCP proxy that stalls a link or drops a reply) and judges what the
pods report. Each scenario returns a :class:`Row`: what was expected, what was observed, the
DB reads, the fenced writes, the slowest call, and the failed checks. The tests in
``tests/faults`` assert on these rows, so the command and the tests cannot drift apart.

Every call a pod makes is bounded: it ends with a value or an error within its deadline plus
:data:`SLACK`, or it is reported as a hang. Every scenario checks that every call ended with a
value or a *typed* error (:class:`~coordinator.errors.ReseedError`) in time, and that no value
returned was above the DB value plus the increments applied.

Given ``--redis-url``/``--lock-url``/``--pg-dsn`` (a staging deployment), the scenarios that
must kill, pause or restart a server run only on the embedded servers started for whatever
was not given; the others are reported as skipped ("needs embedded ...").
"""

from .command import register
from .common import HANG, LEASE, QUERY, SLACK, TABLE, ChaosError, Op, Status
from .database import Database
from .fleet import Fleet, Ticket
from .messages import Loaded, Outcome, Profile, Report, Work
from .reports import errors, loads, max_wait, outcomes, stat, values
from .table import SCENARIOS, Lab, Row, Run, Scenario, format_rows, run_table, scenario
from .tcp_proxy import TcpProxy

# isort: off
# Imported for their @scenario registrations: the import order is the table's row order.
from . import scenarios_holder  # noqa: F401
from . import scenarios_lock  # noqa: F401
from . import scenarios_store  # noqa: F401
from . import scenarios_db  # noqa: F401
from . import scenarios_writes  # noqa: F401
from . import scenarios_cluster  # noqa: F401
# isort: on

__all__ = [
    "HANG",
    "LEASE",
    "QUERY",
    "SCENARIOS",
    "SLACK",
    "TABLE",
    "ChaosError",
    "Database",
    "Fleet",
    "Lab",
    "Loaded",
    "Op",
    "Outcome",
    "Profile",
    "Report",
    "Row",
    "Run",
    "Scenario",
    "Status",
    "TcpProxy",
    "Ticket",
    "Work",
    "errors",
    "format_rows",
    "loads",
    "max_wait",
    "outcomes",
    "register",
    "run_table",
    "scenario",
    "stat",
    "values",
]
