"""The random chaos's checker: what the pods logged, what they sampled and what the servers
hold at quiescence, judged.

1. **calls**: every call ended with a value or a typed ``ReseedError`` within its bound (no
   ``Hang``, no untyped exception, no pod dying on its own);
2. **counters = DB**: at quiescence every present counter equals its entity's DB spend
   exactly, the outbox is empty, and a rebuild of every counter gives the DB spend;
3. **once per request id**: no request id was recorded as new twice, every new record is
   in ``spend_ledger`` with its cost and entities, and the spend of every entity that is
   never reset equals the sum of its ledger rows;
4. **never above the DB**: no sampled counter exceeded the DB spend read after it (samples
   that overlap a reset of the entity are set aside). Counters below the DB spend read
   before them are lag, counted apart with the largest lag and how long it lasted.

Exit status 0 only if all four hold.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..table import format_table, number
from .workload import Call, ResetBegun, Sample

#: How long after a pod's death its reset may still take effect (PostgreSQL rolls back a
#: dead client's transaction as soon as its socket closes; this is headroom).
DEATH_GRACE = 5.0


@dataclass(frozen=True)
class LedgerRow:
    request_id: str
    cost: float
    entities: tuple[str, ...]


@dataclass(frozen=True)
class Final:
    """The servers at quiescence, by entity ref."""

    counters: Mapping[str, float | None]  # before any rebuild
    spends: Mapping[str, float]
    rebuilt: Mapping[str, float]  # what a check read after rebuilding the missing ones
    outbox_left: int
    drained: int  # outbox rows the final drain applied
    ledger: Sequence[LedgerRow]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Lag:
    """Counters sampled against the DB spend read after them."""

    samples: int = 0  # (sample, counter present) pairs compared
    caught_up: int = 0  # between the DB spend read before the GET and the one after
    below: int = 0  # lag: below the spend committed before the GET
    above: int = 0  # a lie: above the spend committed after the GET
    straddled: int = 0  # set aside: a reset of the entity overlapped the sample
    absent: int = 0
    largest: float = 0.0
    largest_seconds: float = 0.0  # how long the episode of the largest lag lasted
    longest_seconds: float = 0.0  # the longest episode of any lag
    above_examples: list[str] = field(default_factory=list)


def judge_calls(calls: Sequence[Call], pod_failures: Sequence[str]) -> Check:
    bad = [c for c in calls if c.error is not None and not c.typed]
    untyped = Counter(f"{c.op}: {c.error}" for c in bad)
    ok = not untyped and not pod_failures
    detail = (
        f"{len(calls)} calls; untyped or hung: {dict(untyped) or 0}; "
        f"pods failed on their own: {len(pod_failures)}"
    )
    said = sorted({c.message for c in bad if c.message})
    if said:
        detail += f"; e.g. {'; '.join(said[:2])}"
    if pod_failures:
        detail += f" ({'; '.join(pod_failures[:3])})"
    return Check("calls end in time, with a value or a typed error", ok, detail)


def judge_final(final: Final) -> Check:
    wrong = {
        ref: (counter, final.spends[ref])
        for ref, counter in final.counters.items()
        if counter is not None and counter != final.spends[ref]
    }
    rebuilt = {
        ref: (value, final.spends[ref])
        for ref, value in final.rebuilt.items()
        if value != final.spends[ref]
    }
    present = sum(value is not None for value in final.counters.values())
    ok = not wrong and not rebuilt and final.outbox_left == 0
    detail = (
        f"{present}/{len(final.counters)} counters present, {len(wrong)} differ from the DB"
        f"{_pairs(wrong)}; after rebuilding, {len(rebuilt)} differ{_pairs(rebuilt)}; "
        f"outbox rows left {final.outbox_left} (final drain applied {final.drained})"
    )
    return Check("counters equal the DB spend at quiescence", ok, detail)


def _pairs(found: Mapping[str, tuple[float | None, float]]) -> str:
    shown = ", ".join(f"{ref} {number(got)} vs DB {number(db)}" for ref, (got, db) in found.items())
    return f" ({shown})" if shown else ""


def judge_ledger(calls: Sequence[Call], final: Final, steady: Sequence[str]) -> Check:
    """``steady``: the entities no reset touches, whose spend is exactly their ledger sum."""
    records = [c for c in calls if c.op == "record" and c.error is None and c.value]
    new = Counter(c.request_id for c in records if c.value and c.value.startswith("new"))
    twice = sorted(str(rid) for rid, count in new.items() if count > 1)
    ledger = {row.request_id: row for row in final.ledger}
    repeated = len(final.ledger) - len(ledger)
    missing, different = [], []
    for call in records:
        row = ledger.get(str(call.request_id))
        if row is None:
            missing.append(str(call.request_id))
        elif row.cost != call.cost or sorted(row.entities) != sorted(call.entities):
            different.append(str(call.request_id))
    sums: dict[str, float] = defaultdict(float)
    for row in final.ledger:
        for ref in row.entities:
            sums[ref] += row.cost
    off = {ref: (sums[ref], final.spends[ref]) for ref in steady if sums[ref] != final.spends[ref]}
    duplicates = sum(1 for c in records if c.value and c.value.startswith("duplicate"))
    ok = not (twice or repeated or missing or different or off)
    detail = (
        f"{len(ledger)} ledger rows, {len(records)} records ({duplicates} duplicates); "
        f"recorded as new twice: {len(twice)}{_listed(twice)}; ledger rows repeated: {repeated}; "
        f"records missing from the ledger: {len(missing)}{_listed(missing)}; "
        f"with another cost or entities: {len(different)}{_listed(different)}; "
        f"never-reset entities whose spend is not their ledger sum: {len(off)}{_pairs(off)}"
    )
    return Check("each request id applied once", ok, detail)


def _listed(items: Sequence[str]) -> str:
    return f" ({', '.join(items[:3])})" if items else ""


def reset_windows(
    calls: Sequence[Call], begun: Sequence[ResetBegun], deaths: Mapping[str, float]
) -> dict[str, list[tuple[float, float]]]:
    """Per entity, the spans in which a reset may have taken effect: from its start to its
    end, or, for a reset whose pod died in it, to the death plus :data:`DEATH_GRACE` (a
    pod that never reported it and never died: to the end of time)."""
    windows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    ended: dict[tuple[str, str], list[Call]] = defaultdict(list)
    for call in calls:
        if call.op == "reset":
            ended[(call.pod, call.entities[0])].append(call)
    for begin in begun:
        done = ended[(begin.pod, begin.entity)]
        match = next((c for c in done if c.start >= begin.start - 1e-3), None)
        if match is not None:
            done.remove(match)
            windows[begin.entity].append((begin.start, match.end))
        else:
            death = deaths.get(begin.pod)
            windows[begin.entity].append(
                (begin.start, math.inf if death is None else death + DEATH_GRACE)
            )
    return windows


def judge_samples(
    samples: Sequence[Sample],
    refs: Sequence[str],
    windows: Mapping[str, list[tuple[float, float]]],
    started: float,
) -> tuple[Check, Lag]:
    """``started``: the wall clock at the run's start (offset 0 of its fault schedule)."""
    lag = Lag()
    for index, ref in enumerate(refs):
        episode: tuple[float, float, float] | None = None  # first start, last end, largest
        for sample in sorted(samples, key=lambda s: s.start):
            counter, before, after = (
                sample.counters[index],
                sample.before[index],
                sample.after[index],
            )
            if any(start <= sample.end and sample.start <= end for start, end in windows[ref]):
                lag.straddled += 1
                continue
            if counter is None:
                lag.absent += 1
                _close(lag, episode)
                episode = None
                continue
            lag.samples += 1
            if counter > after:
                lag.above += 1
                if len(lag.above_examples) < 5:
                    lag.above_examples.append(
                        f"{ref}: counter {number(counter)} > DB {number(after)} "
                        f"({sample.pod} at {sample.start - started:.2f}s)"
                    )
                _close(lag, episode)
                episode = None
            elif counter < before:
                lag.below += 1
                gap = before - counter
                first = sample.start if episode is None else episode[0]
                largest = gap if episode is None else max(episode[2], gap)
                episode = (first, sample.end, largest)
            else:
                lag.caught_up += 1
                _close(lag, episode)
                episode = None
        _close(lag, episode)
    detail = (
        f"{lag.samples} counter samples: {lag.caught_up} caught up, {lag.below} below the DB "
        f"read before (lag), {lag.above} above the DB read after; {lag.straddled} set aside "
        "(a reset overlapped)"
    )
    if lag.above_examples:
        detail += f"; e.g. {'; '.join(lag.above_examples[:3])}"
    return Check("no counter ever observed above the DB spend", lag.above == 0, detail), lag


def _close(lag: Lag, episode: tuple[float, float, float] | None) -> None:
    if episode is not None:
        first, last, largest = episode
        seconds = last - first
        lag.longest_seconds = max(lag.longest_seconds, seconds)
        if largest > lag.largest:
            lag.largest, lag.largest_seconds = largest, seconds


@dataclass
class Verdict:
    """The whole report of a random run (``--json`` prints :meth:`as_dict`)."""

    seed: int
    seconds: float
    pods: int
    entities: list[str]
    schedule: list[dict[str, Any]]
    faults: dict[str, int]
    fault_errors: list[str]
    skipped: dict[str, int]
    pods_started: int
    calls: dict[str, int]
    errors: dict[str, int]
    lag: Lag
    loader_calls: int
    misses: int
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def reads_per_miss(self) -> float | None:
        return None if not self.misses else self.loader_calls / self.misses

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "reads_per_miss": self.reads_per_miss}


def format_verdict(verdict: Verdict) -> str:
    lag = verdict.lag
    figures = [
        ("seed", str(verdict.seed)),
        ("seconds", number(verdict.seconds)),
        ("pods (started)", f"{verdict.pods} ({verdict.pods_started})"),
        ("calls", _counts(verdict.calls)),
        ("faults injected", _counts(verdict.faults)),
        ("faults that failed to inject", str(len(verdict.fault_errors))),
        ("faults skipped (no handle)", _counts(verdict.skipped)),
        ("errors by type", _counts(verdict.errors)),
        ("counters above DB", str(lag.above)),
        ("counters below DB (lag)", str(lag.below)),
        (
            "largest lag (DB - counter)",
            f"{number(lag.largest)}, lasting {lag.largest_seconds:.3f}s",
        ),
        ("longest lag", f"{lag.longest_seconds:.3f}s"),
        (
            "DB reads per cold miss",
            f"{_ratio(verdict.reads_per_miss)} ({verdict.loader_calls} reads / "
            f"{verdict.misses} misses)",
        ),
    ]
    checks = [(c.name, "pass" if c.ok else "FAIL", c.detail) for c in verdict.checks]
    return "\n\n".join(
        [
            format_table(("figure", "value"), figures, widths=(28, 90)),
            format_table(("check", "result", "detail"), checks, widths=(34, 6, 80), spaced=True),
            f"schedule (seed {verdict.seed}): "
            + ", ".join(
                f"{f['at']:g}s {f['kind']}[{f['target']}]"
                + (f" {f['duration']:g}s" if f["duration"] else "")
                for f in verdict.schedule
            ),
            "PASS" if verdict.passed else "FAIL",
        ]
    )


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items())) or "none"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
