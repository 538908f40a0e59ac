"""Measurement primitives shared by the benchmarks: interleaved repeats and their summary.

Every measurement records two clocks. Wall-clock time is what throughput means
and gives the headline figures. CPU time (the process's own, or its child's) is
recorded beside it as a cross-check: on a shared 2-core VM, time spent waiting
for a core that another process holds inflates the wall clock but not the CPU
clock, so a CPU ratio far from the wall ratio says the run was disturbed.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter, process_time
from typing import NamedTuple

__all__ = [
    "BenchmarkError",
    "Comparison",
    "Config",
    "Measure",
    "Series",
    "Stopwatch",
    "Timing",
    "compare",
    "percentile",
]


class BenchmarkError(Exception):
    """A subject produced wrong results: its speed would be meaningless, so stop loudly."""


@dataclass(frozen=True)
class Config:
    """Sizes and repeats of one run; ``quick`` shrinks the sizes for a smoke test."""

    quick: bool = False
    repeats: int = 3

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


class Timing(NamedTuple):
    """Seconds one measurement's timed region took, by the wall and the CPU clock.

    A measurement may add each unit's latency in seconds (a saga from start to
    outcome, an order from publish to its final event) and counters of the
    work it caused (``{"commits": 1234.0}``), which the report divides by size.
    """

    wall: float
    cpu: float
    latencies: list[float] | None = None
    counters: dict[str, float] | None = None


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile by the nearest-rank method (0.99: p99)."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))
    return ordered[rank]


class Stopwatch:
    """Both clocks of this process, read when created and at :meth:`stop`."""

    def __init__(self) -> None:
        self._wall, self._cpu = perf_counter(), process_time()

    def stop(self) -> Timing:
        return Timing(perf_counter() - self._wall, process_time() - self._cpu)


# One measurement: does the work once and returns how long its timed region took.
Measure = Callable[[], Timing]


@dataclass
class Series:
    """The rates (units per second) of one side of a comparison, one per repeat."""

    label: str
    rates: list[float] = field(default_factory=list)
    cpu_rates: list[float] = field(default_factory=list)
    # Per repeat, when the measurement gave them: p50 and p99 latency in
    # seconds, and counters per unit (commits per saga, say).
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    per_unit: list[dict[str, float]] = field(default_factory=list)

    def add(self, size: int, timing: Timing) -> None:
        self.rates.append(size / timing.wall)
        self.cpu_rates.append(size / timing.cpu)
        if timing.latencies:
            self.p50.append(percentile(timing.latencies, 0.50))
            self.p99.append(percentile(timing.latencies, 0.99))
        if timing.counters:
            self.per_unit.append({f"{k}/unit": v / size for k, v in timing.counters.items()})

    @property
    def best_p99(self) -> float | None:
        return min(self.p99) if self.p99 else None

    @property
    def best_p50(self) -> float | None:
        return min(self.p50) if self.p50 else None

    @property
    def best(self) -> float:
        # Best, not mean: other load on the VM only ever slows a run down, so the
        # fastest repeat is the closest to what the code itself costs.
        return max(self.rates)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_best(self) -> float:
        return max(self.cpu_rates)


@dataclass
class Comparison:
    """A subject measured against a baseline, each ``repeats`` times, interleaved."""

    key: str
    title: str
    unit: str
    size: int
    subject: Series
    baseline: Series
    goal: float | None = None  # minimum subject/baseline ratio, when one is set

    @property
    def ratio(self) -> float:
        """Best subject rate over best baseline rate (wall clock): the headline figure."""
        return self.subject.best / self.baseline.best

    @property
    def cpu_ratio(self) -> float:
        """The same ratio by the CPU clock: the cross-check that load barely moves."""
        return self.subject.cpu_best / self.baseline.cpu_best

    @property
    def pair_ratios(self) -> list[float]:
        # Each pair ran back to back, so its ratio shares the VM's speed of the
        # moment; their spread shows how far to trust the headline ratio.
        return [s / b for s, b in zip(self.subject.rates, self.baseline.rates, strict=True)]

    @property
    def goal_met(self) -> bool | None:
        return None if self.goal is None else self.ratio >= self.goal

    @property
    def goal_met_cpu(self) -> bool | None:
        return None if self.goal is None else self.cpu_ratio >= self.goal

    def to_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "title": self.title,
            "unit": self.unit,
            "size": self.size,
            "subject": _series_json(self.subject),
            "baseline": _series_json(self.baseline),
            "ratio": self.ratio,
            "ratio_statistic": "best subject rate / best baseline rate, wall clock",
            "pair_ratios": self.pair_ratios,
            "cpu_ratio": self.cpu_ratio,
            "goal": self.goal,
            "goal_met": self.goal_met,
            "goal_met_cpu": self.goal_met_cpu,
        }


def _series_json(series: Series) -> dict[str, object]:
    return {
        "label": series.label,
        "rates": series.rates,
        "best": series.best,
        "median": series.median,
        "cpu_rates": series.cpu_rates,
        "cpu_best": series.cpu_best,
        "p50_seconds": series.p50,
        "p99_seconds": series.p99,
        "per_unit": series.per_unit,
    }


def compare(
    config: Config,
    *,
    key: str,
    title: str,
    unit: str,
    size: int,
    subject: tuple[str, Measure],
    baseline: tuple[str, Measure],
    goal: float | None = None,
) -> Comparison:
    """Measure ``subject`` and ``baseline`` ``config.repeats`` times each, interleaved.

    The order alternates (baseline first, then subject first, ...) so that a
    drift of the VM's speed during the run does not favour either side.
    """
    result = Comparison(key, title, unit, size, Series(subject[0]), Series(baseline[0]), goal=goal)
    sides = [(result.baseline, baseline[1]), (result.subject, subject[1])]
    for repeat in range(config.repeats):
        for series, measure in sides if repeat % 2 == 0 else sides[::-1]:
            # Garbage left by the previous measurement must not be collected on
            # this one's clock.
            gc.collect()
            timing = measure()
            series.add(size, timing)
            print(
                f"  {key}: {series.label} #{repeat + 1}: {size / timing.wall:,.0f} {unit}"
                f" (cpu {size / timing.cpu:,.0f})",
                file=sys.stderr,
                flush=True,
            )
    return result
