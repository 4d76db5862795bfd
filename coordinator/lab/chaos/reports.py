"""Reading the reports of pods."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from .common import Op
from .messages import Outcome, Report


def outcomes(reports: Sequence[Report], op: Op | None = None) -> list[Outcome]:
    return [o for report in reports for o in report.outcomes if op is None or o.op == op]


def values(reports: Sequence[Report], op: Op | None = None) -> list[float]:
    return [o.value for o in outcomes(reports, op) if o.value is not None]


def errors(reports: Sequence[Report]) -> list[str]:
    return [o.error for o in outcomes(reports) if o.error is not None]


def loads(reports: Sequence[Report], key: str | None = None) -> int:
    return sum(n for report in reports for k, n in report.loads.items() if key in (None, k))


def stat(reports: Sequence[Report], name: str) -> int:
    return sum(report.stats[name] for report in reports)


def max_wait(reports: Sequence[Report]) -> float:
    return max((o.seconds for o in outcomes(reports)), default=0.0)


def same(got: Sequence[float], want: float) -> str:
    counts = Counter(got)
    return f"{len(got)} callers got {want:g}" if set(counts) == {want} else f"values {dict(counts)}"
