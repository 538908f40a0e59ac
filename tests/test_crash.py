"""Proof under crashes: worker processes SIGKILLed at random moments, sagas still end right.

A few hundred sagas (two in three complete, one in three fails at a step and
compensates) are recorded with ``Orchestrator.start``; ``sagakit worker``
processes run them and are killed at random moments, again and again, then a
last worker runs what is left. At the end: every saga is terminal; each effect
of a completed saga is present exactly once; each compensated saga has exactly
its completed steps undone, newest first, each once; no saga is still leased
to a dead worker.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from crash.sagas import ORDER, STEPS, create_schema

from sagakit import Orchestrator, SagaStatus

ROOT = Path(__file__).resolve().parent.parent
SAGA_COUNT = int(os.environ.get("SAGAKIT_CRASH_SAGAS", "300"))
KILLS = int(os.environ.get("SAGAKIT_CRASH_KILLS", "50"))
LEASE_TTL = 1.0


def _plan(count: int) -> dict[str, str | None]:
    """saga id -> the step it fails at (None: it completes); one in three fails."""
    rng = random.Random(7)
    return {f"order-{i:04d}": (rng.choice(STEPS) if i % 3 == 2 else None) for i in range(count)}


def _worker(url: str, owner: str, logs: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CRASH_EFFECTS_URL": url,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT / "src")]),
        "SAGAKIT_LOG": "WARNING",
    }
    # stderr to a file: a pipe nobody drains could stall the worker, and one
    # left open when the worker is killed is a leaked descriptor.
    with open(logs / f"{owner}.log", "wb") as stderr:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sagakit.cli",
                "worker",
                "--store",
                url,
                "--sagas",
                "crash.sagas:SAGAS",
                "--owner",
                owner,
                "--lease-ttl",
                str(LEASE_TTL),
                # Few at a time, so that the sagas outlast the kills.
                "--concurrency",
                "8",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def _log_of(logs: Path, owner: str) -> str:
    return (logs / f"{owner}.log").read_text(errors="replace")[-3000:]


async def _start_all(url: str, plan: dict[str, str | None]) -> None:
    orchestrator = Orchestrator(url, sagas=[ORDER])
    try:
        for saga_id, fail_at in plan.items():
            await orchestrator.start(ORDER, saga_id, {"fail_at": fail_at} if fail_at else {})
    finally:
        await orchestrator.close()
        await orchestrator.log.close()


async def _summaries(url: str) -> dict[str, Any]:
    orchestrator = Orchestrator(url, sagas=[ORDER])
    try:
        return {s.saga_id: s for s in await orchestrator.list(limit=100_000)}
    finally:
        await orchestrator.close()
        await orchestrator.log.close()


def _effects(url: str) -> tuple[list[tuple[str, str, str, int]], list[tuple[str, str, str, int]]]:
    """(effects ordered by seq, attempts) as (saga_id, step, kind, seq or pid) rows."""
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30) as db:
            effects = db.execute(
                "SELECT saga_id, step, kind, seq FROM effects ORDER BY seq"
            ).fetchall()
            attempts = db.execute("SELECT saga_id, step, kind, pid FROM attempts").fetchall()
        return effects, attempts
    import asyncpg

    async def read() -> tuple[list[Any], list[Any]]:
        connection = await asyncpg.connect(url)
        try:
            effects = await connection.fetch(
                "SELECT saga_id, step, kind, seq FROM effects ORDER BY seq"
            )
            attempts = await connection.fetch("SELECT saga_id, step, kind, pid FROM attempts")
            return [tuple(r) for r in effects], [tuple(r) for r in attempts]
        finally:
            await connection.close()

    return asyncio.run(read())


def _records(url: str, saga_id: str) -> list[Any]:
    """The saga's log, for a failing assertion to show."""

    async def read() -> list[Any]:
        orchestrator = Orchestrator(url)
        try:
            return list(await orchestrator.log.read(saga_id))
        finally:
            await orchestrator.log.close()

    return asyncio.run(read())


def _wait_all_terminal(url: str, count: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        summaries = asyncio.run(_summaries(url))
        done = sum(1 for s in summaries.values() if s.status.is_final)
        if done == count or time.monotonic() > deadline:
            return summaries
        time.sleep(0.5)


def _check(url: str, plan: dict[str, str | None], summaries: dict[str, Any]) -> list[Any]:
    assert set(summaries) == set(plan)
    unfinished = {i: s.status for i, s in summaries.items() if not s.status.is_final}
    assert not unfinished, f"sagas not terminal: {unfinished}"
    effects, attempts = _effects(url)
    done: dict[str, list[str]] = defaultdict(list)
    undone: dict[str, list[str]] = defaultdict(list)
    for saga_id, step, kind, _ in effects:
        (done if kind == "do" else undone)[saga_id].append(step)
    for saga_id, fail_at in plan.items():
        summary = summaries[saga_id]
        assert summary.owner is None, f"{saga_id} still leased to {summary.owner}"
        if fail_at is None:
            assert summary.status is SagaStatus.COMPLETED, (saga_id, _records(url, saga_id))
            assert done[saga_id] == list(STEPS), (saga_id, done[saga_id])
            assert undone[saga_id] == [], (saga_id, undone[saga_id])
        else:
            assert summary.status is SagaStatus.COMPENSATED, (saga_id, _records(url, saga_id))
            completed = list(STEPS[: STEPS.index(fail_at)])
            assert sorted(done[saga_id]) == sorted(completed), (saga_id, done[saga_id])
            # Undone exactly the completed steps, each once, newest first.
            assert undone[saga_id] == completed[::-1], (saga_id, undone[saga_id])
    return attempts


def _kill_repeatedly(
    url: str,
    kills: int,
    rng: random.Random,
    logs: Path,
    others: list[tuple[str, subprocess.Popen[bytes]]],
) -> int:
    killed = 0
    for n in range(kills):
        owner = f"doomed-{n}"
        worker = _worker(url, owner, logs)
        time.sleep(rng.uniform(0.2, 1.2))
        if worker.poll() is not None:
            raise AssertionError(
                f"worker exited by itself ({worker.returncode}): {_log_of(logs, owner)}"
            )
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        killed += 1
        for name, other in others:
            assert other.poll() is None, (
                f"{name}, whom nobody killed, exited: {_log_of(logs, name)}"
            )
    return killed


# A worker takes this long at most to start and install its signal handlers.
STARTUP = 3.0


def _stop(name: str, worker: subprocess.Popen[bytes], logs: Path, started: float) -> None:
    # SIGTERM before the worker installed its handler would kill it outright.
    time.sleep(max(0.0, started + STARTUP - time.monotonic()))
    worker.send_signal(signal.SIGTERM)
    try:
        code = worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
        raise AssertionError(f"{name} did not stop within 30 s of SIGTERM") from None
    assert code == 0, f"{name} exited {code} on SIGTERM: {_log_of(logs, name)}"


@pytest.fixture
def sqlite_store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sagas.db'}"


def _run_crash_scenario(url: str, workers: int, logs: Path) -> tuple[list[Any], list[int]]:
    plan = _plan(SAGA_COUNT)
    create_schema(url)
    asyncio.run(_start_all(url, plan))
    rng = random.Random(11)
    began = time.monotonic()
    steady = [(f"steady-{i}", _worker(url, f"steady-{i}", logs)) for i in range(workers - 1)]
    try:
        assert _kill_repeatedly(url, KILLS, rng, logs, steady) == KILLS
        last, last_began = _worker(url, "last", logs), time.monotonic()
        try:
            summaries = _wait_all_terminal(url, len(plan), timeout=120)
        finally:
            _stop("last", last, logs, last_began)
    finally:
        for name, worker in steady:
            _stop(name, worker, logs, began)
    summaries = asyncio.run(_summaries(url))
    return _check(url, plan, summaries), [worker.pid for _, worker in steady]


def test_sqlite_worker_killed_again_and_again(sqlite_store: str, tmp_path: Path) -> None:
    _run_crash_scenario(sqlite_store, workers=1, logs=tmp_path)
    # The kills did land inside sagas: steps were announced again as a second
    # (or later) attempt, and the checks above found their effects single all the same.
    assert _rerun_steps(sqlite_store) > 0, "no kill landed inside a step"


def _rerun_steps(url: str) -> int:
    """How many step or compensation runs were announced as a re-run (attempt > 1)."""

    async def count() -> int:
        orchestrator = Orchestrator(url)
        try:
            total = 0
            for summary in await orchestrator.list(limit=100_000):
                for record in await orchestrator.log.read(summary.saga_id):
                    if getattr(record, "attempt", 1) > 1:
                        total += 1
            return total
        finally:
            await orchestrator.close()

    return asyncio.run(count())


def test_postgres_workers_share_work_while_one_is_killed(postgres_url: str, tmp_path: Path) -> None:
    attempts, steady = _run_crash_scenario(postgres_url, workers=3, logs=tmp_path)
    pids = {pid for *_, pid in attempts}
    # The work was shared: both workers that nobody killed ran steps.
    assert set(steady) <= pids, f"workers {set(steady) - pids} ran nothing"


def test_workers_ride_out_a_database_restart(
    private_postgres: Any, private_postgres_url: str, tmp_path: Path
) -> None:
    """The database itself goes down mid-run and comes back: workers reconnect with
    backoff (no worker exits), and every saga still ends right."""
    url = private_postgres_url
    plan = _plan(SAGA_COUNT)
    create_schema(url)
    asyncio.run(_start_all(url, plan))
    began = time.monotonic()
    workers = [(f"steady-{i}", _worker(url, f"steady-{i}", tmp_path)) for i in range(2)]
    try:
        time.sleep(1.5)  # mid-run: the workers are into the sagas
        with private_postgres.stopped():
            time.sleep(2.0)
            for name, worker in workers:
                assert worker.poll() is None, f"{name} exited: {_log_of(tmp_path, name)}"
        summaries = _wait_all_terminal(url, len(plan), timeout=120)
        assert all(s.status.is_final for s in summaries.values())
    finally:
        for name, worker in workers:
            _stop(name, worker, tmp_path, began)
    _check(url, plan, asyncio.run(_summaries(url)))
