"""The printed table and the JSON file of one run."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

from benchmarks.timing import Comparison, Config

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
    return "\n".join([*legend, "", *lines, "", "what is measured (sagakit vs baseline):", *sides])


def write_json(path: Path, comparisons: list[Comparison], env: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {**env, "benchmarks": [c.to_json() for c in comparisons]}
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
