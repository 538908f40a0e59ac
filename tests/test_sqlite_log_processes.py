"""The SQLite saga log shared by processes: claims stay exclusive across them, and a
process killed at any moment leaves a consistent file with every acknowledged write."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from conformance.saga_log import opening

from sagakit.adapters.sqlite_log import SQLiteSagaLog
from sagakit.core.records import SagaStatus, decode_record, status_after

CLAIMER = """
import asyncio, json, os, sys, time
from sagakit.adapters.sqlite_log import SQLiteSagaLog

async def main(path, owner, go):
    log = SQLiteSagaLog(path, busy_timeout=30)
    await log.status("warm-up")  # open the file before the race starts
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    got, idle = [], 0
    while idle < 30:
        claims = await log.claim_next(owner=owner, ttl=600, limit=3)
        got += [c.journal.saga_id for c in claims]
        idle = 0 if claims else idle + 1
        # Flat out, with no pause: processes waiting for the write lock must still get
        # their turn (SQLite's own busy handler would let this one take every saga).
        await asyncio.sleep(0)
    await log.close()
    print(json.dumps(got), flush=True)

asyncio.run(main(*sys.argv[1:]))
"""

WRITER = """
import asyncio, itertools, sys
from sagakit.adapters.sqlite_log import SQLiteSagaLog
from sagakit.core.records import (
    SagaFinished, SagaStarted, SagaStatus, StepCompleted, StepFailed, StepStarted,
    CompensationStarted, CompensationCompleted,
)

async def main(path, run):
    log = SQLiteSagaLog(path, busy_timeout=30)

    async def drive(lane):
        for n in itertools.count():
            saga_id = f"{run}-{lane}-{n}"
            journal = await log.create(
                saga_id, [SagaStarted("order", ("a", "b", "c"), {"n": n}), StepStarted(0)],
                owner=f"w-{run}", ttl=600,
            )
            print(saga_id, journal.version, flush=True)
            batches = [[StepCompleted(0, {"n": n}), StepStarted(1)]]
            if n % 3:
                batches += [[StepCompleted(1, "x" * (n % 500)), StepStarted(2)],
                            [StepCompleted(2, None), SagaFinished(SagaStatus.COMPLETED)]]
            else:
                batches += [[StepFailed(1, "declined"), CompensationStarted(0)],
                            [CompensationCompleted(0), SagaFinished(SagaStatus.COMPENSATED)]]
            for batch in batches:
                journal.stage(batch)
                await journal.flush()
                print(saga_id, journal.version, flush=True)

    await asyncio.gather(*(drive(lane) for lane in range(16)))

asyncio.run(main(*sys.argv[1:]))
"""


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def test_processes_racing_claim_next_never_share_a_saga(tmp_path: Path) -> None:
    path, go = tmp_path / "sagas.db", tmp_path / "go"
    log = SQLiteSagaLog(path)
    ids = [f"o-{i:03}" for i in range(300)]
    for saga_id in ids:
        assert await log.create(saga_id, opening(), owner=None, ttl=60) is not None
    claimers = [spawn(CLAIMER, str(path), f"p-{i}", str(go)) for i in range(3)]
    try:
        for claimer in claimers:
            assert claimer.stdout is not None
            assert claimer.stdout.readline().strip() == "ready", claimer.stderr
        go.touch()
        # And this process claims too, through a log of its own.
        mine: list[str] = []
        while claims := await log.claim_next(owner="here", ttl=600, limit=3):
            mine += [c.journal.saga_id for c in claims]
            await asyncio.sleep(0)
        taken = {"here": mine}
        for i, claimer in enumerate(claimers):
            out, err = claimer.communicate(timeout=60)
            assert claimer.returncode == 0, err
            taken[f"p-{i}"] = json.loads(out.strip().splitlines()[-1])
    finally:
        for claimer in claimers:
            claimer.kill()
            claimer.wait()
    every = [saga_id for got in taken.values() for saga_id in got]
    assert sorted(every) == ids  # each saga claimed exactly once
    assert sum(1 for got in taken.values() if got) >= 3, taken  # the lock was shared
    for owner, got in taken.items():
        for saga_id in got[:5]:
            summary = await log.status(saga_id)
            assert summary is not None
            assert summary.owner == owner
    await log.close()


def check_consistent(path: Path, acknowledged: dict[str, int]) -> tuple[int, int]:
    """Every saga's records contiguous, its version their count, its status theirs, and
    every flush a writer saw return is there. Returns (sagas, finished sagas)."""
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        sagas = db.execute("SELECT saga_id, status, version, owner FROM sagas").fetchall()
        finished = 0
        for saga_id, status, version, owner in sagas:
            rows = db.execute(
                "SELECT seq, kind, schema_version, payload FROM records WHERE saga_id = ?"
                " ORDER BY seq",
                (saga_id,),
            ).fetchall()
            assert [row[0] for row in rows] == list(range(len(rows))), saga_id
            assert version == len(rows), saga_id
            expected = SagaStatus.RUNNING
            for _seq, kind, schema, payload in rows:
                expected = status_after(decode_record(kind, schema, payload)) or expected
            assert status == expected, saga_id
            if expected.is_final:
                finished += 1
                assert owner is None, saga_id
            assert version >= acknowledged.pop(saga_id, 0), saga_id
        assert acknowledged == {}, "acknowledged sagas missing from the file"
        orphans = db.execute(
            "SELECT count(*) FROM records WHERE saga_id NOT IN (SELECT saga_id FROM sagas)"
        ).fetchone()
        assert orphans == (0,)
        return len(sagas), finished
    finally:
        db.close()


async def test_a_process_killed_mid_flush_leaves_a_consistent_file(tmp_path: Path) -> None:
    path = tmp_path / "sagas.db"
    rng = random.Random(7)
    acknowledged: dict[str, int] = {}
    for run in range(8):
        writer = spawn(WRITER, str(path), f"r{run}")
        assert writer.stdout is not None
        first = writer.stdout.readline()
        assert first, writer.stderr.read() if writer.stderr else ""
        await asyncio.sleep(rng.uniform(0.05, 0.6))
        writer.send_signal(signal.SIGKILL)
        # Read on through the reader readline() used: communicate() reads the pipe's
        # descriptor directly, skipping what readline() had buffered past the first
        # line, so its output could start in the middle of a line.
        out = writer.stdout.read()
        writer.communicate(timeout=30)  # stderr, and the exit status
        assert writer.returncode == -signal.SIGKILL
        # The kill may cut the writer's last line short (a print's pieces are
        # separate writes once its pipe buffer fills): only whole lines count.
        lines = [first, *out.split("\n")[:-1]] if first.endswith("\n") else []
        for line in lines:
            if line.strip():
                saga_id, version = line.split()
                acknowledged[saga_id] = max(acknowledged.get(saga_id, 0), int(version))
        sagas, finished = check_consistent(path, dict(acknowledged))
        assert sagas >= len(acknowledged)
    assert finished > 0
    # And the log, opened again once the dead writers' leases ran out, claims what they left.
    log = SQLiteSagaLog(path, clock=lambda: time.time() + 601)
    leftovers = await log.list(status=[SagaStatus.RUNNING, SagaStatus.COMPENSATING], limit=10)
    assert leftovers, "every run was killed while sagas were in flight"
    claims = await log.claim_next(owner="w-1", ttl=60, limit=1000)
    assert {c.journal.saga_id for c in claims} >= {s.saga_id for s in leftovers}
    for claim in claims:
        assert claim.journal.version == len(claim.records)
    await log.close()


def test_a_log_used_in_a_forked_child_says_so_rather_than_hanging(tmp_path: Path) -> None:
    """The writer thread does not survive a fork: the child's calls used to wait for ever
    on a queue nobody serves. The child must open a log of its own."""
    log = SQLiteSagaLog(tmp_path / "sagas.db")
    assert asyncio.run(log.create("o-1", opening(), owner=None, ttl=60)) is not None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:

            async def child() -> str:
                try:
                    await asyncio.wait_for(log.read("o-1"), 5)
                except Exception as exc:
                    return f"{type(exc).__name__}: {exc}"
                return "read"

            os.write(write, asyncio.run(child()).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as answer:
        said = answer.read()
    assert said.startswith("ConfigurationError"), said
    assert "fork" in said
    records = asyncio.run(log.read("o-1"))  # the parent's log is unharmed
    assert len(records) == 2
    asyncio.run(log.close())
