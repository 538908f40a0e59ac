"""The SQLite saga log: the port's conformance suite on files, and what is SQLite's alone
(URLs, the schema and its version, reopening, group commit, errors translated). Tests
with other processes are in tests/test_sqlite_log_processes.py."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conformance.saga_log import FINISHED, SagaLogConformance, opening, typed, write

from sagakit.adapters import open_saga_log
from sagakit.adapters.sqlite_log import SCHEMA_VERSION, SQLiteSagaLog
from sagakit.core.records import SagaStarted, SagaStatus, StepCompleted, StepStarted
from sagakit.errors import (
    BackendBusy,
    BackendRefused,
    ConfigurationError,
    DefinitionError,
    SchemaMismatch,
)
from sagakit.ports.saga_log import Journal, SagaLog


class TestSQLiteSagaLog(SagaLogConformance):
    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path: Path) -> None:
        self.path = tmp_path / "sagas.db"

    async def make_log(self) -> SagaLog:
        return SQLiteSagaLog(self.path)

    async def make_sibling(self, log: SagaLog) -> SagaLog | None:
        return SQLiteSagaLog(self.path)


@pytest.fixture
async def log(tmp_path: Path) -> Any:
    opened = SQLiteSagaLog(tmp_path / "sagas.db")
    yield opened
    await opened.close()


async def started(log: SQLiteSagaLog, saga_id: str = "o-1", **kw: Any) -> Journal:
    journal = await log.create(saga_id, opening(), owner=kw.pop("owner", "w-1"), ttl=60, **kw)
    assert journal is not None
    return journal


# --- URLs -----------------------------------------------------------------------------


def test_url_paths_follow_sqlalchemy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_saga_log("sqlite:///sagas.db")
    assert isinstance(relative, SQLiteSagaLog)
    assert relative.path == tmp_path / "sagas.db"
    spaced = SQLiteSagaLog.from_url("sqlite:///data/my%20sagas.db")
    assert spaced.path == tmp_path / "data" / "my sagas.db"
    absolute = SQLiteSagaLog.from_url(f"sqlite:///{tmp_path}/abs.db")  # "sqlite:///" "/tmp/..."
    assert absolute.path == tmp_path / "abs.db"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert SQLiteSagaLog.from_url("sqlite:///~/home.db").path == tmp_path / "home.db"
    assert not (tmp_path / "sagas.db").exists()  # created on first use, not when opened


def test_url_options(tmp_path: Path) -> None:
    log = SQLiteSagaLog.from_url(f"sqlite:///{tmp_path}/s.db?busy_timeout=0.5&synchronous=normal")
    assert (log.busy_timeout, log.synchronous) == (0.5, "NORMAL")
    default = SQLiteSagaLog.from_url(f"sqlite:///{tmp_path}/s.db")
    assert (default.busy_timeout, default.synchronous) == (5.0, "FULL")


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///:memory:",
        "sqlite://",
        "sqlite:///",
        "sqlite://host/sagas.db",
        "sqlite:///s.db?timeout=3",
        "sqlite:///s.db?busy_timeout=soon",
        "sqlite:///s.db?busy_timeout=-1",
        "sqlite:///s.db?busy_timeout=nan",
        "sqlite:///s.db?synchronous=off",
    ],
)
def test_unusable_urls_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError):
        open_saga_log(url)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("busy_timeout", "5"),
        ("busy_timeout", float("inf")),
        ("max_batch", 0),
        ("max_batch", 2.5),
        ("synchronous", 3),
    ],
)
def test_bad_keyword_options_are_refused(tmp_path: Path, option: str, value: object) -> None:
    """A ConfigurationError naming the option, not a TypeError or AttributeError, nor a
    max_batch of 0 quietly taken as 1."""
    with pytest.raises(ConfigurationError, match=option):
        SQLiteSagaLog(tmp_path / "s.db", **{option: value})  # type: ignore[arg-type]


# --- schema ---------------------------------------------------------------------------


async def test_the_schema_is_created_on_first_use_with_its_version(tmp_path: Path) -> None:
    path = tmp_path / "sagas.db"
    log = SQLiteSagaLog(path)
    assert not path.exists()
    assert await log.status("o-1") is None
    await log.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sagas.db"
    log = SQLiteSagaLog(path)
    await started(log)
    await log.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    newer = SQLiteSagaLog(path)
    with pytest.raises(SchemaMismatch) as excinfo:
        await newer.read("o-1")
    error = excinfo.value
    assert not error.retryable
    assert f"schema version {SCHEMA_VERSION + 1}" in str(error)
    assert "upgrade sagakit" in str(error)
    assert str(path) in str(error)
    with pytest.raises(SchemaMismatch):  # and again: it never half-opens
        await newer.create("o-2", opening(), owner=None, ttl=1)
    await newer.close()


async def test_a_file_that_is_not_a_saga_log_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "app.db"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE sagas (name TEXT)")
    db.commit()
    db.close()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database, it only has the name of one" * 100)
    for path in (foreign, junk):
        log = SQLiteSagaLog(path)
        with pytest.raises(SchemaMismatch) as excinfo:
            await log.status("o-1")
        assert not excinfo.value.retryable
        await log.close()
    assert junk.read_bytes().startswith(b"this is not")  # left as it was


async def test_records_of_an_unknown_kind_are_refused_and_left_for_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "sagas.db"
    log = SQLiteSagaLog(path)
    for saga_id in ("new", "old-1", "old-2"):
        await started(log, saga_id, owner=None)
    db = sqlite3.connect(path)
    db.execute("UPDATE records SET kind = 'saga_paused' WHERE saga_id = 'new' AND seq = 1")
    db.commit()
    db.close()
    with pytest.raises(SchemaMismatch, match="saga_paused"):
        await log.read("new")
    with pytest.raises(SchemaMismatch):
        await log.claim("new", owner="w-1", ttl=60)
    with caplog.at_level(logging.WARNING, logger="sagakit.sqlite"):
        claims = await log.claim_next(owner="w-1", ttl=60, limit=2)
        assert [c.journal.saga_id for c in claims] == ["old-1", "old-2"]
        assert await log.claim_next(owner="w-1", ttl=60, limit=2) == []
    assert [r.getMessage().count("'new'") for r in caplog.records] == [1]  # warned once
    summary = await log.status("new")
    assert summary is not None
    assert summary.owner is None  # not taken: a newer worker may
    db = sqlite3.connect(path)
    db.execute("UPDATE sagas SET status = 'paused' WHERE saga_id = 'new'")
    db.commit()
    db.close()
    with pytest.raises(SchemaMismatch, match="paused") as raised:
        await log.status("new")
    assert raised.value.saga_id == "new"
    # A listing shows the others (it failed whole), and says which it left out.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sagakit.sqlite"):
        assert [s.saga_id for s in await log.list()] == ["old-2", "old-1"]
    assert "'new'" in caplog.text
    assert "paused" in caplog.text
    await log.close()


@pytest.mark.parametrize(
    "payload", ["not json", '{"saga": "order"}', "[1, 2]", '{"step": 0, "attempt": 1, "x": 2}']
)
async def test_a_damaged_record_is_refused_and_does_not_block_claim_next(
    log: SQLiteSagaLog, payload: str
) -> None:
    """A record edited by hand, or damaged: a SchemaMismatch naming the saga, never the
    decoder's KeyError or TypeError, and claim_next takes the sagas behind it."""
    for saga_id in ("bad", "ok"):
        await started(log, saga_id, owner=None)
    db = sqlite3.connect(log.path)
    db.execute("UPDATE records SET payload = ? WHERE saga_id = 'bad' AND seq = 1", (payload,))
    db.commit()
    db.close()
    with pytest.raises(SchemaMismatch, match="damaged"):
        await log.read("bad")
    with pytest.raises(SchemaMismatch):
        await log.claim("bad", owner="w-1", ttl=60)
    claims = await log.claim_next(owner="w-1", ttl=60, limit=2)
    assert [c.journal.saga_id for c in claims] == ["ok"]


# --- reopening --------------------------------------------------------------------------


async def test_a_reopened_file_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "sagas.db"
    log = SQLiteSagaLog(path)
    held = await started(log, "held", owner="w-1")
    await write(held, FINISHED[:2])
    done = await started(log, "done", owner=None)
    await write(done, FINISHED)
    before = {s.saga_id: s for s in await log.list()}
    history = await log.history("held")
    await log.close()

    again = SQLiteSagaLog(f"{path}")
    assert {s.saga_id: s for s in await again.list()} == before
    assert await again.history("held") == history
    assert typed(await again.read("done")) == typed(opening() + FINISHED)
    assert await again.claim("held", owner="w-2", ttl=60) is None  # the lease outlived us
    claim = await again.claim("held", owner="w-1", ttl=60)  # its holder, restarted
    assert claim is not None
    assert claim.journal.lease is not None
    assert held.lease is not None
    assert claim.journal.lease.epoch > held.lease.epoch
    await write(claim.journal, FINISHED[2:])
    assert typed(await again.read("held")) == typed(opening() + FINISHED)
    await again.close()


# --- group commit -----------------------------------------------------------------------


async def test_concurrent_flushes_share_commits(log: SQLiteSagaLog) -> None:
    journals = [await started(log, f"o-{i}") for i in range(64)]
    assert log.stats.commits == 64  # one at a time: one commit each
    before = log.stats.commits
    await asyncio.gather(*(write(j, [StepCompleted(0, i)]) for i, j in enumerate(journals)))
    commits = log.stats.commits - before
    assert 1 <= commits <= 16, commits
    for i in range(64):
        assert typed((await log.read(f"o-{i}"))[-1:]) == typed([StepCompleted(0, i)])


async def test_a_request_that_fails_rolls_back_alone(log: SQLiteSagaLog) -> None:
    """A corrupt row makes one saga's flush fail inside a shared transaction; the others
    in that transaction commit."""
    journals = [await started(log, f"o-{i}") for i in range(4)]
    db = sqlite3.connect(log.path)
    # A stray record where o-0's next one goes: its insert will violate the primary key.
    db.execute(
        "INSERT INTO records VALUES ('o-0', 2, 'step_started', 1, '{\"step\":5,\"attempt\":1}', 0)"
    )
    db.commit()
    db.close()

    def busy(db: sqlite3.Connection, now: float) -> None:
        time.sleep(0.1)  # holds the writer thread while the flushes queue up behind it

    hold = asyncio.ensure_future(log._call(busy, writes=False))
    await asyncio.sleep(0.02)
    before = log.stats.commits
    results = await asyncio.gather(
        *(write(j, [StepCompleted(0, "x")]) for j in journals), return_exceptions=True
    )
    await hold
    assert log.stats.commits == before + 1  # one transaction for the four
    assert isinstance(results[0], BackendRefused)
    assert results[1:] == [None, None, None]
    assert len(await log.read("o-1")) == 3
    summary = await log.status("o-0")
    assert summary is not None
    assert summary.records == 2  # the failed flush left its counter alone


async def test_a_value_too_big_for_sqlite_fails_its_own_flush_alone(log: SQLiteSagaLog) -> None:
    """SQLite takes at most 1,000,000,000 bytes in one value (SQLITE_TOOBIG): that saga's
    flush fails, not every other saga's flush in the same group commit. (Tried with a
    1 GB result: all four flushes of the transaction failed, as not retryable.)"""
    journals = [await started(log, f"o-{i}") for i in range(4)]

    def small_limit(db: sqlite3.Connection, now: float) -> None:
        db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 10_000)

    def busy(db: sqlite3.Connection, now: float) -> None:
        time.sleep(0.1)  # holds the writer thread while the flushes queue up behind it

    await log._call(small_limit, writes=False)
    hold = asyncio.ensure_future(log._call(busy, writes=False))
    await asyncio.sleep(0.02)
    results = await asyncio.gather(
        *(
            write(j, [StepCompleted(0, "x" * (20_000 if i == 0 else 10))])
            for i, j in enumerate(journals)
        ),
        return_exceptions=True,
    )
    await hold
    assert isinstance(results[0], BackendRefused)
    assert "too big" in str(results[0])
    assert results[1:] == [None, None, None]
    assert [s.records for s in await log.list()] == [3, 3, 3, 2]


# --- errors ---------------------------------------------------------------------------


async def test_a_write_lock_held_elsewhere_is_busy_and_a_retry_succeeds(tmp_path: Path) -> None:
    path = tmp_path / "sagas.db"
    log = SQLiteSagaLog(path, busy_timeout=0.1)
    journal = await started(log)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        journal.stage(FINISHED[:1])
        with pytest.raises(BackendBusy) as excinfo:
            await journal.flush()
        assert excinfo.value.retryable
        assert isinstance(excinfo.value.__cause__, sqlite3.OperationalError)
        assert journal.version == 3  # kept, to flush again
        assert typed(await log.read("o-1")) == typed(opening())  # reads go on meanwhile
    finally:
        other.execute("ROLLBACK")
        other.close()
    await journal.flush()
    assert typed(await log.read("o-1")) == typed(opening() + FINISHED[:1])
    await log.close()


_OUT_OF_DESCRIPTORS = """
import asyncio, os, resource, sys
from sagakit.adapters.sqlite_log import SQLiteSagaLog
from sagakit.errors import BackendUnavailable

async def main():
    log = SQLiteSagaLog(sys.argv[1])
    held = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass  # every descriptor the process may have is taken
    try:
        await log.list()
    except BackendUnavailable as exc:
        print("unavailable", exc.retryable)
    for fd in held:
        os.close(fd)
    print("listed", await log.list())
    await log.close()

resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
asyncio.run(main())
"""


def test_a_file_that_cannot_be_opened_for_now_is_unavailable_until_it_can(tmp_path: Path) -> None:
    """SQLITE_CANTOPEN for a passing cause (the process out of file descriptors) stays
    retryable, and the same log works once it can open the file; a folder that is not
    there is not such a cause (test_a_folder_that_is_not_there_is_a_configuration_error)."""
    done = subprocess.run(
        [sys.executable, "-c", _OUT_OF_DESCRIPTORS, str(tmp_path / "sagas.db")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["unavailable True", "listed []"]


@pytest.mark.parametrize("how", ["deleted", "moved", "replaced", "wal deleted"])
async def test_a_file_deleted_or_replaced_under_the_log_fails_writes_rather_than_losing_them(
    tmp_path: Path, how: str
) -> None:
    """The connection would go on writing to the file it opened: after an unlink, an
    inode nobody will ever read again; after a rename, not the log at this path. Every
    flush "succeeded", and the next process found none of it."""
    path = tmp_path / "sagas.db"
    log = SQLiteSagaLog(path)
    journal = await started(log)
    aside = tmp_path / "aside.db"
    if how == "deleted":
        for name in ("sagas.db", "sagas.db-wal", "sagas.db-shm"):
            (tmp_path / name).unlink()
    elif how == "wal deleted":  # a killed process would leave its records nowhere
        (tmp_path / "sagas.db-wal").unlink()
    else:
        path.rename(aside)
        if how == "replaced":  # by another log's file, as a restore from a backup would
            (tmp_path / "other").mkdir()
            other = SQLiteSagaLog(tmp_path / "other" / "sagas.db")
            await started(other, "o-other")
            await other.close()
            (tmp_path / "other" / "sagas.db").rename(path)
    journal.stage(FINISHED[:2])
    with pytest.raises(BackendRefused, match="deleted or replaced") as raised:
        await journal.flush()
    assert not raised.value.retryable
    assert journal.version == 4  # staged records are kept
    with pytest.raises(BackendRefused, match="deleted or replaced"):
        await log.create("o-2", opening(), owner=None, ttl=60)
    if how == "moved":  # put back: the log goes on where it was
        aside.rename(path)
        await journal.flush()
        assert typed(await log.read("o-1")) == typed(opening() + FINISHED[:2])
    await log.close()
    if how != "replaced":  # (a file replaced under SQLite meets the old one's -wal: sqlite.org)
        again = SQLiteSagaLog(path)
        expected = {"deleted": [], "moved": ["o-1"], "wal deleted": ["o-1"]}[how]
        assert [s.saga_id for s in await again.list()] == expected
        await again.close()


async def test_a_closed_log_refuses_and_finishes_what_it_accepted(log: SQLiteSagaLog) -> None:
    journals = [await started(log, f"o-{i}") for i in range(8)]
    tasks = [asyncio.create_task(write(j, FINISHED)) for j in journals]
    await asyncio.sleep(0)  # each task has queued its flush
    await log.close()
    await asyncio.gather(*tasks)
    await log.close()  # twice is fine
    with pytest.raises(BackendRefused, match="closed"):
        await log.read("o-1")
    reopened = SQLiteSagaLog(log.path)
    finished = await reopened.list(status=SagaStatus.COMPLETED)
    assert len(finished) == 8
    await reopened.close()


async def test_a_cancelled_flush_still_lands_and_the_journal_knows(log: SQLiteSagaLog) -> None:
    journal = await started(log)
    journal.stage(FINISHED[:2])
    task = asyncio.create_task(journal.flush())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await write(journal, FINISHED[2:])  # waits for the first, then writes after it
    assert typed(await log.read("o-1")) == typed(opening() + FINISHED)
    assert journal.version == 6


# --- hostile input ----------------------------------------------------------------------


async def test_odd_saga_ids_and_large_values_round_trip(log: SQLiteSagaLog) -> None:
    big = {"blob": "x" * 5_000_000, "deep": [[[[[[[[1]]]]]]]]}
    for saga_id in ("\u2603 \U0001f600", "x" * 1024, "\u00e9" * 512, "'; DROP TABLE sagas; --"):
        records = [SagaStarted("order", ("a",), big), StepStarted(0)]
        journal = await log.create(saga_id, records, owner=None, ttl=60)
        assert journal is not None
        assert typed(await log.read(saga_id)) == typed(records)
    assert await log.read("a") == []
    assert len(await log.list()) == 4
    # What PostgreSQL cannot keep, SQLite refuses too (the rule of every backend).
    for saga_id in ("a\x00b", "x" * 1025, "\u00e9" * 513):
        with pytest.raises(DefinitionError):
            await log.create(saga_id, [SagaStarted("order", ("a",), {})], owner=None, ttl=60)
    assert len(await log.list()) == 4


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda log: log.create("", opening(), owner=None, ttl=1), "saga_id"),
        (lambda log: log.create("\ud800", opening(), owner=None, ttl=1), "saga_id"),
        (lambda log: log.create(7, opening(), owner=None, ttl=1), "saga_id"),
        (lambda log: log.create("o", [StepStarted(0)], owner=None, ttl=1), "opening"),
        (lambda log: log.create("o", [], owner=None, ttl=1), "opening"),
        (lambda log: log.create("o", opening(), owner="", ttl=1), "owner"),
        (lambda log: log.claim("o", owner="w", ttl=0), "ttl"),
        (lambda log: log.claim("o", owner="w", ttl=float("nan")), "ttl"),
        (lambda log: log.claim("o", owner="w", ttl=float("inf")), "ttl"),
        (lambda log: log.claim_next(owner="w", ttl=-1, limit=1), "ttl"),
        (lambda log: log.claim_next(owner="w", ttl=1, limit=-1), "limit"),
        (lambda log: log.list(limit=-1), "limit"),
    ],
)
async def test_bad_arguments_are_refused_before_any_work(
    log: SQLiteSagaLog, call: Any, field: str
) -> None:
    with pytest.raises(DefinitionError) as excinfo:
        await call(log)
    assert excinfo.value.field == field
    assert log.stats.requests == 0


async def test_a_journal_of_another_log_is_refused(log: SQLiteSagaLog, tmp_path: Path) -> None:
    other = SQLiteSagaLog(tmp_path / "other.db")
    theirs = await started(other)
    with pytest.raises(TypeError):
        await log.renew([theirs], ttl=60)
    with pytest.raises(TypeError):
        await log.release(theirs)
    await other.close()


async def test_leases_follow_the_injected_clock(tmp_path: Path) -> None:
    now = [1_000.0]
    log = SQLiteSagaLog(tmp_path / "sagas.db", clock=lambda: now[0])
    journal = await started(log)
    assert journal.lease is not None
    assert journal.lease.expires_at == 1_060.0
    assert await log.claim("o-1", owner="w-2", ttl=60) is None
    now[0] = 1_060.0
    claim = await log.claim("o-1", owner="w-2", ttl=60)
    assert claim is not None
    assert claim.journal.lease is not None
    assert claim.journal.lease.expires_at == 1_120.0
    assert [e.recorded_at for e in await log.history("o-1")] == [1_000.0, 1_000.0]
    now[0] = 1_100.0
    assert await log.renew([claim.journal], ttl=60) == []
    assert claim.journal.lease.expires_at == 1_160.0
    await log.close()


async def test_a_failing_clock_fails_the_call_not_the_log(tmp_path: Path) -> None:
    broken = [True]

    def clock() -> float:
        if broken[0]:
            raise OSError("no time")
        return 1_000.0

    log = SQLiteSagaLog(tmp_path / "sagas.db", clock=clock)
    with pytest.raises(OSError, match="no time"):
        await log.create("o-1", opening(), owner=None, ttl=60)
    broken[0] = False
    assert await log.status("o-1") is None  # nothing half-written
    assert await log.create("o-1", opening(), owner=None, ttl=60) is not None
    await log.close()


async def test_claims_whose_caller_was_cancelled_are_given_back(log: SQLiteSagaLog) -> None:
    for i in range(3):
        await log.create(f"o-{i}", opening(), owner=None, ttl=60)
    for call in (
        log.claim_next(owner="w-1", ttl=60, limit=10),
        log.claim("o-0", owner="w-1", ttl=60),
        log.create("o-new", opening(), owner="w-1", ttl=60),
    ):
        task = asyncio.create_task(call)
        await asyncio.sleep(0)  # queued on the writer thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(50):
            if all(s.owner is None for s in await log.list()):
                break
            await asyncio.sleep(0.01)
        assert [s.owner for s in await log.list()] == [None] * len(await log.list())
    claims = await log.claim_next(owner="w-2", ttl=60, limit=10)
    assert [c.journal.saga_id for c in claims] == ["o-0", "o-1", "o-2", "o-new"]


async def test_a_busy_timeout_past_sqlites_range_waits_the_longest_it_can(
    tmp_path: Path,
) -> None:
    """Over 24.8 days in milliseconds, SQLite's busy_timeout (a C int) read 0: no wait."""
    log = SQLiteSagaLog(tmp_path / "sagas.db", busy_timeout=1e7)

    def busy_timeout(db: sqlite3.Connection, now: float) -> int:
        value: int = db.execute("PRAGMA busy_timeout").fetchone()[0]
        return value

    assert await log._call(busy_timeout, writes=True) == 2**31 - 1  # after a write's reset
    assert await log._call(busy_timeout, writes=False) == 2**31 - 1
    await log.close()


@pytest.mark.parametrize(("url_option", "expected"), [("", 2), ("?synchronous=normal", 1)])
async def test_the_connection_runs_wal_with_the_synchronous_level_asked(
    tmp_path: Path, url_option: str, expected: int
) -> None:
    log = SQLiteSagaLog.from_url(f"sqlite:///{tmp_path}/sagas.db{url_option}")

    def settings(db: sqlite3.Connection, now: float) -> tuple[Any, ...]:
        return tuple(
            db.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("journal_mode", "synchronous", "busy_timeout")
        )

    # Private, on purpose: what the writer thread's own connection runs with.
    assert await log._call(settings, writes=False) == ("wal", expected, 5000)
    await log.close()


@pytest.mark.parametrize("parent", ["no/such/dir", "a-file"])
async def test_a_folder_that_is_not_there_is_a_configuration_error(
    tmp_path: Path, parent: str
) -> None:
    """It was SQLITE_CANTOPEN, a retryable BackendUnavailable: a worker retried for ever,
    a warning a second. Creating the folder mends the same log."""
    (tmp_path / "a-file").write_text("")
    path = tmp_path / parent / "sagas.db"
    log = SQLiteSagaLog.from_url(f"sqlite:///{path}")
    try:
        with pytest.raises(ConfigurationError, match=re.escape(str(path.parent))):
            await log.list()
        with pytest.raises(ConfigurationError):
            await log.claim_next(owner="w-1", ttl=60, limit=1)
        if parent != "a-file":
            path.parent.mkdir(parents=True)
            assert await log.list() == []
    finally:
        await log.close()


@pytest.mark.parametrize("where", ["folder", "/dev/null"])
async def test_a_path_naming_a_folder_or_a_device_is_a_configuration_error(
    tmp_path: Path, where: str
) -> None:
    """CANTOPEN for a folder, an fsync I/O error for /dev/null: both were retryable,
    and a worker retried them for ever."""
    path = tmp_path if where == "folder" else Path(where)
    log = SQLiteSagaLog.from_url(f"sqlite:///{path}")
    try:
        with pytest.raises(ConfigurationError, match=re.escape(str(path))):
            await log.claim_next(owner="w-1", ttl=60, limit=1)
    finally:
        await log.close()


async def test_close_waits_for_cancelled_claims_to_give_their_leases_back(
    tmp_path: Path,
) -> None:
    """A worker stopping cancels its claim_next and closes its log. The claim, waiting
    for another process's write lock, went on once it had it, but its give-back found
    the log closed: the saga stayed leased to a worker gone until the lease expired."""
    path = tmp_path / "sagas.db"
    log = SQLiteSagaLog(path)
    await started(log, "o-1", owner=None)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing
    task = asyncio.create_task(log.claim_next(owner="w-1", ttl=60, limit=5))
    await asyncio.sleep(0.1)  # the claim waits for the write lock
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    closing = asyncio.create_task(log.close())
    await asyncio.sleep(0.1)
    other.execute("COMMIT")
    other.close()
    await asyncio.wait_for(closing, 10)
    reader = SQLiteSagaLog(path)
    try:
        summary = await reader.status("o-1")
        assert summary is not None
        assert summary.owner is None
    finally:
        await reader.close()
