"""Growth: a long-running worker's rate and resident memory as the sagas it finished pile up.

One process runs N sagas back to back (64 in flight) on a backend and samples,
at checkpoints, its resident set size and its rate over the last window. The
comparison is the process against its younger self: the rate in the window
ending at N (subject) over the rate in the window ending at the first
checkpoint (baseline), goal at least 80%. Beside it, the resident memory at
each checkpoint, which must stay flat: what is finished lives in the saga log's
database (SQLite) or is evicted past the cap (``memory://?max_finished=``).

``python -m benchmarks --only growth`` runs 1,000,000 sagas on SQLite and on
memory (capped at 10,000 finished sagas); ``--quick`` runs 50,000.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.timing import BenchmarkError, Comparison, Config, Series

__all__ = ["run"]

ROOT = Path(__file__).resolve().parent.parent
IN_FLIGHT = 64
WINDOW = 10_000

_CHILD = r"""
import asyncio, json, os, sys, time
from sagakit import Orchestrator, SagaDefinition, Step

async def act(ctx):
    return 1

async def undo(ctx):
    return None

SAGA = SagaDefinition("growth", [Step(n, act, undo) for n in ("a", "b", "c")])
PAGE = os.sysconf("SC_PAGE_SIZE")

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE

async def main(url, total, window, in_flight):
    orchestrator = Orchestrator(url, sagas=[SAGA])
    samples = []
    started = time.perf_counter()
    last = started
    for base in range(0, total, window):
        ids = iter(range(base, base + window))

        async def worker():
            for i in ids:
                outcome = await orchestrator.run(SAGA, f"g-{i}")
                if not outcome.ok:
                    raise SystemExit(f"saga g-{i} ended {outcome.state}")

        await asyncio.gather(*(worker() for _ in range(in_flight)))
        now = time.perf_counter()
        samples.append({"done": base + window, "rate": window / (now - last), "rss": rss()})
        last = now
    await orchestrator.close()
    print(json.dumps(samples))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
"""


def _child(url: str, total: int) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, url, str(total), str(WINDOW), str(IN_FLIGHT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=6 * 3600,
        check=False,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise BenchmarkError(f"growth run on {url} failed:\n{done.stderr[-3000:]}")
    samples: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return samples


def _rows(key: str, title: str, samples: list[dict[str, Any]]) -> Comparison:
    # A window is short (10,000 sagas, well under a second in memory), so one
    # window is at the mercy of the machine's other load: each side is the
    # median of three windows. The first window pays for start-up: skipped.
    young_windows = samples[1:4] if len(samples) > 4 else samples[:1]
    old_windows = samples[-3:]
    young, old = young_windows[-1], old_windows[-1]
    subject = Series(f"median rate of the 3 windows ending at {old['done']:,}")
    baseline = Series(f"median rate of the windows ending at {young['done']:,} and before")
    for series, windows in ((subject, old_windows), (baseline, young_windows)):
        rate = statistics.median(w["rate"] for w in windows)
        series.rates.append(rate)
        series.cpu_rates.append(rate)
    # Resident memory at the young checkpoint and at the end.
    subject.per_unit.append({"rss MB": old["rss"] / 1e6})
    baseline.per_unit.append({"rss MB": young["rss"] / 1e6})
    return Comparison(key, title, "sagas/s", old["done"], subject, baseline, goal=0.8)


def run(config: Config) -> list[Comparison]:
    total = config.size(1_000_000, 50_000)
    comparisons = []
    with tempfile.TemporaryDirectory() as folder:
        sqlite = _child(f"sqlite:///{folder}/growth.db", total)
    comparisons.append(_rows("growth-sqlite", f"growth, SQLite, {total:,} sagas", sqlite))
    memory = _child("memory://?max_finished=10000", total)
    comparisons.append(
        _rows("growth-memory", f"growth, memory:// capped at 10k, {total:,} sagas", memory)
    )
    for name, samples in (("sqlite", sqlite), ("memory", memory)):
        every = samples[:: max(1, len(samples) // 10)]
        trail = ", ".join(f"{s['done'] // 1000}k: {s['rss'] / 1e6:.0f} MB" for s in every)
        print(f"  growth {name} rss: {trail}", file=sys.stderr, flush=True)
    return comparisons
