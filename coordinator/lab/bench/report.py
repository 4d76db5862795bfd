"""What the bench derives from its measurements (ratios against the peers and the targets),
and its text table and plot, both drawn from its JSON document."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..table import format_table
from .recovery import format_recovery

TARGETS = {
    "coordinated_db_reads_per_miss": 1.0,
    "coordinated_p99_over_per_process_p99": 1.2,
    "get_over_raw_get": 1.1,
}
TARGET_PODS = 8


# -- derived numbers ----------------------------------------------------------------------


def _find(cells: Sequence[dict[str, Any]], strategy: str, pods: int, delay: float) -> Any:
    return next(
        cell
        for cell in cells
        if (cell["strategy"], cell["pods"], cell["db_delay_ms"]) == (strategy, pods, delay)
    )


def _quotient(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def _compare(
    cells: Sequence[dict[str, Any]],
    over: str,
    under: str,
    key: tuple[int, float, str, str],
) -> dict[str, float | None]:
    """``over``'s latency statistic over ``under``'s, for ``key`` = (pods, delay, group,
    statistic): of the pooled samples, and the median of the ratios of the repetitions
    (each pair ran back to back, so it shares the machine's load of the moment)."""
    pods, delay, group, stat = key
    a, b = _find(cells, over, pods, delay), _find(cells, under, pods, delay)
    pairs = [
        x / y
        for x, y in zip(a["per_round"][group][stat], b["per_round"][group][stat], strict=True)
        if x is not None and y
    ]
    return {
        "pooled": _quotient(a["latency"][group][stat], b["latency"][group][stat]),
        "paired": round(statistics.median(pairs), 3) if pairs else None,
    }


def _target_pods(pods: Sequence[int]) -> int:
    return TARGET_PODS if TARGET_PODS in pods else max(pods)


def seed_wakeup(
    cells: Sequence[dict[str, Any]], pod_counts: Sequence[int], delays: Sequence[float]
) -> list[dict[str, Any]]:
    """Losers' latency without the seed wake-up over with it, at the target pod count."""
    pods = _target_pods(pod_counts)
    return [
        {
            "pods": pods,
            "db_delay_ms": delay,
            "wake_losers": _find(cells, "coordinated", pods, delay)["latency"]["losers"],
            "nowake_losers": _find(cells, "coordinated-nowake", pods, delay)["latency"]["losers"],
            **{
                f"{stat}_nowake_over_wake": _compare(
                    cells,
                    "coordinated-nowake",
                    "coordinated",
                    (pods, delay, "losers", f"{stat}_ms"),
                )
                for stat in ("p50", "p99")
            },
        }
        for delay in delays
    ]


def targets(
    cells: Sequence[dict[str, Any]],
    pod_counts: Sequence[int],
    delays: Sequence[float],
    hot: dict[str, Any],
) -> dict[str, Any]:
    """The measurements that the goals are stated in, next to the goals."""
    pods = _target_pods(pod_counts)
    reads = {
        f"{cell['pods']} pods, {cell['db_delay_ms']:g} ms": cell["db_reads_per_miss"]
        for cell in cells
        if cell["strategy"] == "coordinated"
    }
    p99 = {
        f"{delay:g} ms": _compare(
            cells, "coordinated", "per-process", (pods, delay, "all", "p99_ms")
        )
        for delay in delays
    }
    limit = TARGETS["coordinated_p99_over_per_process_p99"]
    hot_ratio = hot["by_concurrency"][0]["ratio"]
    return {
        "coordinated_db_reads_per_miss": {
            "target": TARGETS["coordinated_db_reads_per_miss"],
            "measured": reads,
            "met": all(value == 1 for value in reads.values()),
        },
        "coordinated_p99_over_per_process_p99": {
            "target": limit,
            "pods": pods,
            "measured": p99,
            "met": all(
                ratio["pooled"] is not None and ratio["pooled"] <= limit for ratio in p99.values()
            ),
        },
        "get_over_raw_get": {
            "target": TARGETS["get_over_raw_get"],
            "concurrency": hot["by_concurrency"][0]["concurrency"],
            "measured": hot_ratio,
            "met": hot_ratio <= TARGETS["get_over_raw_get"],
        },
    }


# -- table and plot -----------------------------------------------------------------------


STYLES = {  # strategy: (colour, marker, line, what its latency curve shows)
    "naive": ("tab:red", "x", "--", "all callers"),
    "per-process": ("tab:orange", "s", "-", "all callers"),
    "coordinated": ("tab:blue", "o", "-", "losers"),
    "coordinated-nowake": ("tab:cyan", "^", "--", "losers"),
}
# Under per-process and naive every pod reads the DB, so they have (nearly) no losers: their
# curves show all callers, which is what a coordinated loser is to be compared with.
PLOTTED = {"all callers": "all", "losers": "losers"}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _stampede(document: dict[str, Any]) -> list[str]:
    header = (
        "pods", "strategy", "DB reads", "x db", "p50", "p99", "win p50", "win p99",
        "lose p50", "lose p99", "n win/lose", "CPU ms", "cmds st/lk", "errors",
    )  # fmt: skip
    plan = document["plan"]
    lines = [
        f"Cold stampede: {plan['callers']} callers per pod, {plan['reps']} rounds per cell, "
        "strategies alternating. Per cold miss: DB reads, final counter / DB value (max),",
        "latency in ms from the common start (all callers; the winner pod's callers; the "
        "others), the pods' CPU time, and the commands the counter store / lock masters ran.",
    ]
    for delay in plan["db_delays_ms"]:
        rows = []
        for cell in document["cold_stampede"]:
            if cell["db_delay_ms"] != delay:
                continue
            latency = cell["latency"]
            final = cell["final_over_db_max"]
            rows.append(
                (
                    str(cell["pods"]),
                    cell["strategy"],
                    f"{cell['db_reads_per_miss']:g}",
                    "-" if final is None else f"{final:g}",
                    _ms(latency["all"]["p50_ms"]),
                    _ms(latency["all"]["p99_ms"]),
                    _ms(latency["winners"]["p50_ms"]),
                    _ms(latency["winners"]["p99_ms"]),
                    _ms(latency["losers"]["p50_ms"]),
                    _ms(latency["losers"]["p99_ms"]),
                    f"{latency['winners']['n']}/{latency['losers']['n']}",
                    _ms(cell["pods_cpu_ms_per_miss"]),
                    f"{cell['store_commands_per_miss']:.0f}/{cell['lock_commands_per_miss']:.0f}",
                    str(cell["errors"]),
                )
            )
        table = format_table(header, rows, right=[i for i in range(len(header)) if i != 1])
        lines += ["", f"DB delay {delay:g} ms", table]
    return lines


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _pair(ratio: dict[str, float | None]) -> str:
    return f"{_ratio(ratio['pooled'])} (paired by round {_ratio(ratio['paired'])})"


def _summary(document: dict[str, Any]) -> list[str]:
    lines = ["", "Seed wake-up (losers' latency without it / with it):"]
    lines += [
        f"  {row['pods']} pods, DB delay {row['db_delay_ms']:g} ms: "
        f"p50 {_pair(row['p50_nowake_over_wake'])}, p99 {_pair(row['p99_nowake_over_wake'])}"
        for row in document["seed_wakeup"]
    ]
    lines += ["", "Hot path (one process; us: a call's mean latency with that many in flight):"]
    lines += [
        f"  concurrency {row['concurrency']:>2}: get {row['get_calls_per_s']} calls/s "
        f"({row['get_us']} us), raw GET {row['raw_get_calls_per_s']} calls/s "
        f"({row['raw_get_us']} us), get / raw GET {_ratio(row['ratio'])}"
        for row in document["hot_path"]["by_concurrency"]
    ]
    lock = document["lock_cost"]
    lines += ["", "Lease acquire+release:"]
    lines += [
        f"  {row['config']}: p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
        f"{row['cycles_per_s']} cycles/s, {row['failed']} not won (n {row['n']})"
        for row in lock["by_config"]
    ]
    lines += [f"  {name}: {_ratio(value)}" for name, value in lock["ratios"].items()]
    lines += [f"  {note}" for note in lock["notes"]]
    targets = document["targets"]
    reads = targets["coordinated_db_reads_per_miss"]
    p99 = targets["coordinated_p99_over_per_process_p99"]
    hot = targets["get_over_raw_get"]
    lines += [
        "",
        "Against the targets:",
        f"  coordinated DB reads per cold miss (target {reads['target']:g}): "
        f"{min(reads['measured'].values()):g}..{max(reads['measured'].values()):g}",
        f"  coordinated p99 / per-process p99 at {p99['pods']} pods (target <= "
        f"{p99['target']:g}): "
        + ", ".join(f"{delay} {_pair(value)}" for delay, value in p99["measured"].items()),
        f"  get / raw GET at concurrency {hot['concurrency']} (target <= {hot['target']:g}): "
        f"{_ratio(hot['measured'])}",
    ]
    machine, versions = document["machine"], document["versions"]
    lines += [
        "",
        f"{machine['cores']} cores ({machine['cpu']}), load average "
        f"{machine['load_average_before']} before, {machine['load_average_after']} after; "
        f"{document['duration_s']:g} s",
        "versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()),
    ]
    lines += document.get("notes", [])
    return lines


def format_report(document: dict[str, Any]) -> str:
    recovery = document.get("mass_recovery")
    lines = _stampede(document)
    if recovery is not None:
        lines += format_recovery(recovery)
    return "\n".join(lines + _summary(document))


def plot(document: dict[str, Any], path: Path) -> str | None:
    """Draw the cold stampede into ``path``; None, or why nothing was drawn."""
    try:
        from matplotlib.figure import Figure  # the optional [bench] extra
    except ImportError:
        return "no plot: matplotlib is not installed (pip install 'reseed-coordinator[bench]')"
    cells = document["cold_stampede"]
    delays = document["plan"]["db_delays_ms"]
    pods = document["plan"]["pods"]
    figure = Figure(figsize=(15, 4.2 * len(delays)), layout="constrained")
    grid = figure.subplots(len(delays), 3, squeeze=False)
    for row, delay in zip(grid, delays, strict=True):
        reads, p50, p99 = row
        for strategy, (colour, marker, line, shown) in STYLES.items():
            mine = sorted(
                (c for c in cells if c["strategy"] == strategy and c["db_delay_ms"] == delay),
                key=lambda c: c["pods"],
            )
            x = [c["pods"] for c in mine]
            style = {"color": colour, "marker": marker, "linestyle": line}
            reads.plot(x, [c["db_reads_per_miss"] for c in mine], label=strategy, **style)
            for axes, name in ((p50, "p50_ms"), (p99, "p99_ms")):
                y = [c["latency"][PLOTTED[shown]][name] for c in mine]
                axes.plot(x, y, label=f"{strategy} ({shown})", **style)
        reads.set_title(f"DB reads per cold miss, DB delay {delay:g} ms")
        p50.set_title(f"cold-read latency p50, DB delay {delay:g} ms")
        p99.set_title(f"cold-read latency p99, DB delay {delay:g} ms")
        reads.set_ylabel("DB reads")
        for axes in row:
            axes.set_xscale("log", base=2)
            axes.set_xticks(pods, [str(p) for p in pods])
            axes.set_xlabel("pods")
            axes.grid(True, alpha=0.3)
        for axes in (p50, p99):
            axes.set_ylabel("ms")
            axes.set_ylim(bottom=0)
        reads.set_ylim(bottom=0)
    grid[0][0].legend()
    grid[0][1].legend(fontsize="small")
    figure.suptitle(
        f"reseed-coordinator bench ({document['plan']['callers']} callers per pod, "
        f"{document['machine']['cores']} cores, {document['started_at']})"
    )
    figure.savefig(path, dpi=90)
    return None
