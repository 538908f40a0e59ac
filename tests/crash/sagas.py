"""The sagas a crash test's worker processes run: every effect recorded in the store's database.

Each action and compensation writes its effect under ``ctx.idempotency_key`` in
an ``effects`` table of the same database as the saga log (insert-if-absent),
and every run of it, re-runs included, in ``attempts``. A worker killed between
an effect and the record of its step makes the step run again: the key makes
the effect land once all the same, and ``attempts`` shows that it did run again.

``CRASH_EFFECTS_URL`` names the database (sqlite:///... or postgresql://...).
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
from typing import Any

from sagakit import SagaDefinition, Step, StepContext

STEPS = ("reserve", "charge", "ship")

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS effects (key TEXT PRIMARY KEY, saga_id TEXT NOT NULL,"
    " step TEXT NOT NULL, kind TEXT NOT NULL, seq {serial})",
    "CREATE TABLE IF NOT EXISTS attempts (saga_id TEXT NOT NULL, step TEXT NOT NULL,"
    " kind TEXT NOT NULL, pid INTEGER NOT NULL)",
)


class Refused(Exception):
    """The failure a saga's input asks for."""


def _url() -> str:
    return os.environ["CRASH_EFFECTS_URL"]


def _sqlite_path(url: str) -> str:
    return url.removeprefix("sqlite:///")


def create_schema(url: str) -> None:
    if url.startswith("sqlite"):
        with sqlite3.connect(_sqlite_path(url), timeout=30) as db:
            for statement in SCHEMA:
                db.execute(statement.format(serial="INTEGER"))
        return
    import asyncpg

    async def create() -> None:
        connection = await asyncpg.connect(url)
        try:
            for statement in SCHEMA:
                await connection.execute(statement.format(serial="BIGSERIAL"))
        finally:
            await connection.close()

    asyncio.run(create())


_pool: Any = None


async def _write(ctx: StepContext, kind: str) -> None:
    url = _url()
    pid = os.getpid()
    if url.startswith("sqlite"):

        def write() -> None:
            with sqlite3.connect(_sqlite_path(url), timeout=30) as db:
                db.execute(
                    "INSERT INTO attempts VALUES (?, ?, ?, ?)", (ctx.saga_id, ctx.step, kind, pid)
                )
                seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM effects").fetchone()[0]
                db.execute(
                    "INSERT OR IGNORE INTO effects VALUES (?, ?, ?, ?, ?)",
                    (ctx.idempotency_key, ctx.saga_id, ctx.step, kind, seq),
                )

        await asyncio.to_thread(write)
        return
    # A step that writes to a database rides out its restarts, as a real one
    # would: retry on a lost or refused connection, with backoff, for up to 60 s.
    delay, deadline = 0.05, asyncio.get_running_loop().time() + 60
    while True:
        try:
            await _write_postgres(url, ctx, kind, pid)
            return
        except _transient() as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            del exc


def _transient() -> tuple[type[BaseException], ...]:
    """What a database restart raises in a client: lost, refused or shut-down connections."""
    import asyncpg

    return (
        OSError,
        asyncpg.PostgresConnectionError,
        asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now
        asyncpg.exceptions.InterfaceError,
        # A pool's connection broken under a statement in flight.
        asyncpg.exceptions.InternalClientError,
    )


async def _write_postgres(url: str, ctx: StepContext, kind: str, pid: int) -> None:
    global _pool
    if _pool is None:
        import asyncpg

        _pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    async with _pool.acquire() as connection, connection.transaction():
        await connection.execute(
            "INSERT INTO attempts VALUES ($1, $2, $3, $4)", ctx.saga_id, ctx.step, kind, pid
        )
        await connection.execute(
            "INSERT INTO effects (key, saga_id, step, kind) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (key) DO NOTHING",
            ctx.idempotency_key,
            ctx.saga_id,
            ctx.step,
            kind,
        )


async def act(ctx: StepContext) -> dict[str, str]:
    # Work that takes a while, so that kills land inside steps as well as between them.
    await asyncio.sleep(random.uniform(0.02, 0.2))
    if ctx.data.get("fail_at") == ctx.step:
        raise Refused(f"{ctx.step} refused, as the saga's input asks")
    await _write(ctx, "do")
    return {"done": ctx.step}


async def undo(ctx: StepContext) -> None:
    await asyncio.sleep(random.uniform(0.02, 0.2))
    await _write(ctx, "undo")


ORDER = SagaDefinition("crash-order", [Step(name, act, undo) for name in STEPS])
SAGAS = [ORDER]
