"""The printed table and the JSON file of one run."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

from benchmarks.timing import Comparison, Config, Series

__all__ = ["environment", "table", "write_json"]


def environment(config: Config) -> dict[str, object]:
    """Where and how the figures were measured: they mean nothing without it."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "quick": config.quick,
        "repeats": config.repeats,
        "statistic": (
            f"best of {config.repeats} interleaved repeats per side; "
            "ratio = best subject / best baseline (wall clock)"
        ),
    }


def _goal(comparison: Comparison) -> tuple[str, str]:
    if comparison.goal is None:
        return "-", "-"
    wall, cpu = comparison.goal_met, comparison.goal_met_cpu
    # When the two clocks disagree the run was too disturbed to decide: say so
    # rather than pick one.
    goal = f">= {comparison.goal:.0%}"
    if wall == cpu:
        return goal, "yes" if wall else "NO"
    return goal, "wall only" if wall else "cpu only"


def table(comparisons: list[Comparison], env: dict[str, object]) -> str:
    """A plain-text table, pasteable as-is into BENCHMARKS.md."""
    header = (
        "benchmark",
        "unit",
        "size",
        "sagakit",
        "baseline",
        "ratio",
        "pair ratios",
        "cpu ratio",
        "goal",
        "met",
    )
    rows = [header]
    for c in comparisons:
        pairs = c.pair_ratios
        rows.append(
            (
                c.title,
                c.unit,
                f"{c.size:,}",
                f"{c.subject.best:,.0f}",
                f"{c.baseline.best:,.0f}",
                f"{c.ratio:.1%}",
                f"{min(pairs):.1%}-{max(pairs):.1%}",
                f"{c.cpu_ratio:.1%}",
                *_goal(c),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    # Text columns flush left, figures flush right.
    left = {0, 1}
    lines = [
        "  ".join(
            cell.ljust(widths[i]) if i in left else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    legend = [
        f"date {env['date']}, Python {env['python']}, {env['cores']} cores, {env['platform']}",
        f"{env['statistic']}",
        "pair ratios: min-max over back-to-back pairs; cpu ratio: the same by CPU time"
        " (a cross-check that other load on the machine barely moves)",
    ]
    sides = [f"  {c.title}: {c.subject.label} vs {c.baseline.label}" for c in comparisons]
    return "\n".join(
        [
            *legend,
            "",
            *lines,
            *_details(comparisons),
            "",
            "what is measured (sagakit vs baseline):",
            *sides,
        ]
    )


def _side_details(series: Series) -> str:
    parts = []
    if series.p50:
        # The best repeat's figures, as for the rates.
        parts.append(f"p50 {min(series.p50) * 1e3:.2f} ms, p99 {min(series.p99) * 1e3:.2f} ms")
    if series.per_unit:
        keys = sorted({k for counters in series.per_unit for k in counters})
        for key in keys:
            values = [c[key] for c in series.per_unit if key in c]
            parts.append(f"{key} {statistics.median(values):.2f}")
    return "; ".join(parts)


def _details(comparisons: list[Comparison]) -> list[str]:
    """Latencies and work per unit, for the benchmarks that measure them."""
    lines = []
    for c in comparisons:
        subject, baseline = _side_details(c.subject), _side_details(c.baseline)
        if subject or baseline:
            lines.append(f"  {c.title}: sagakit {subject or '-'} | baseline {baseline or '-'}")
    return ["", "latency (best repeat) and work per unit (median):", *lines] if lines else []


def write_json(path: Path, comparisons: list[Comparison], env: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {**env, "benchmarks": [c.to_json() for c in comparisons]}
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
