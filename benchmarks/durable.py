"""Durable sagas: sagakit on memory, SQLite and PostgreSQL against DBOS Transact.

The peer is DBOS Transact (``dbos`` on PyPI, a benchmark-only dependency)
running the same saga as a workflow of ``@DBOS.step``s with a hand-written
undo list, on the same PostgreSQL server: what a team would write today
instead of using sagakit. Each side runs in a process of its own per
measurement (:mod:`benchmarks.durable_peer`), on a database created for that
measurement, so that neither pays for what an earlier one left.

Per saga: three steps; every third saga fails at its last step, so its two
completed steps are compensated. Figures: sagas per second, p50/p99 latency
from ``run`` to outcome, and, on PostgreSQL, commits per saga as the server
counts them (``pg_stat_database.xact_commit``), on both sides.

The server is the one ``SAGAKIT_BENCH_POSTGRES_URL`` names, by default this
machine's ``postgresql://postgres@127.0.0.1:5432/postgres`` (the user must be
able to create databases).

Goals (issue 7): with 64 in flight, sagakit on PostgreSQL at least 10x DBOS's
rate with p99 under 50 ms; one at a time at least DBOS's rate; SQLite within
2x of PostgreSQL.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from benchmarks.timing import BenchmarkError, Comparison, Config, Series, Timing

__all__ = ["run"]

ROOT = Path(__file__).resolve().parent.parent
IN_FLIGHT = 64
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def _server() -> str:
    return os.environ.get("SAGAKIT_BENCH_POSTGRES_URL", DEFAULT_SERVER)


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def _admin(url: str, *statements: str) -> list[Any]:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        results = []
        for statement in statements:
            results.append(await connection.fetchval(statement))
        return results
    finally:
        await connection.close()


def _fresh_database(name: str) -> str:
    asyncio.run(
        _admin(_server(), f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}")
    )
    return _with_database(_server(), name)


def _commits(name: str) -> float:
    # Stats are flushed when the peer's backends exit: the peer has exited.
    value = asyncio.run(
        _admin(
            _server(),
            "SELECT pg_stat_clear_snapshot()",
            f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{name}'",
        )
    )[1]
    return float(value or 0)


def _peer(peer: str, url: str, count: int, in_flight: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.durable_peer", peer, url, str(count), str(in_flight)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise BenchmarkError(f"{peer} on {url} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    expected_compensated = count // 3
    states = result["states"]
    if states.get("compensated", 0) != expected_compensated or sum(states.values()) != count:
        raise BenchmarkError(f"{peer} on {url}: sagas ended as {states}, count {count}")
    return result


def _measure(peer: str, backend: str, count: int, in_flight: int) -> Callable[[], Timing]:
    def measure() -> Timing:
        counters: dict[str, float] | None = None
        if backend == "postgres":
            name = f"sagakit_bench_{peer}"
            url = _fresh_database(name)
            before = _commits(name)
            result = _peer(peer, url, count, in_flight)
            time.sleep(0.2)
            counters = {"commits": _commits(name) - before}
        elif backend == "sqlite":
            with tempfile.TemporaryDirectory() as folder:
                result = _peer(peer, f"sqlite:///{folder}/sagas.db", count, in_flight)
        else:
            result = _peer(peer, "memory://", count, in_flight)
        if counters is not None and "commits" in counters:
            # The warm-up's commits are the server's too; count only the timed sagas' share.
            counters["commits"] *= count / (count + 20)
        return Timing(result["wall"], result["cpu"], result["latencies"], counters)

    return measure


def _sizes(config: Config, backend: str, in_flight: int) -> int:
    if backend == "memory":
        return config.size(5_000, 500)
    if in_flight == 1:
        return config.size(1_000, 100)
    return config.size(3_000, 300)


def _dbos_size(config: Config, in_flight: int) -> int:
    return config.size(300 if in_flight == 1 else 1_000, 60 if in_flight == 1 else 200)


def run(
    config: Config, backends: tuple[str, ...] = ("memory", "sqlite", "postgres")
) -> list[Comparison]:
    """For each number in flight: DBOS on PostgreSQL once per repeat, and sagakit on each
    backend beside it, interleaved; every row's ratio is against that DBOS series."""
    try:
        asyncio.run(_admin(_server(), "SELECT 1"))
    except Exception as exc:
        raise BenchmarkError(
            f"durable benchmark needs a PostgreSQL server ({_server()}): {exc}; "
            "set SAGAKIT_BENCH_POSTGRES_URL"
        ) from exc
    comparisons: list[Comparison] = []
    for in_flight in (1, IN_FLIGHT):
        label = "one at a time" if in_flight == 1 else f"{in_flight} in flight"
        dbos = Series("DBOS Transact workflow, PostgreSQL")
        dbos_size = _dbos_size(config, in_flight)
        rows = []
        for backend in backends:
            size = _sizes(config, backend, in_flight)
            row = Comparison(
                key=f"durable-{backend}-{in_flight}",
                title=f"durable sagas, {backend}, {label}",
                unit="sagas/s",
                size=size,
                subject=Series(f"Orchestrator.run on {backend}"),
                baseline=dbos,
                goal=(10.0 if in_flight > 1 else 1.0) if backend == "postgres" else None,
            )
            rows.append((row, _measure("sagakit", backend, size, in_flight)))
        for repeat in range(config.repeats):
            sides: list[tuple[Series, int, Callable[[], Timing], str]] = [
                (dbos, dbos_size, _measure("dbos", "postgres", dbos_size, in_flight), "dbos")
            ]
            sides += [(row.subject, row.size, m, row.key) for row, m in rows]
            for series, size, measure, key in sides if repeat % 2 == 0 else sides[::-1]:
                gc.collect()
                timing = measure()
                series.add(size, timing)
                print(
                    f"  {key} #{repeat + 1}: {size / timing.wall:,.0f} sagas/s",
                    file=sys.stderr,
                    flush=True,
                )
        comparisons.extend(row for row, _ in rows)
    return comparisons
