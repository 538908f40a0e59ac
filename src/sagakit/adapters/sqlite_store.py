"""The SQLite saga log's store: its schema, connection settings, statements and error
translation.

Kept apart from :mod:`sagakit.adapters.sqlite_log` (the log, its journals and its
writer thread) so that each stays short. Everything here runs on that writer thread.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sagakit.core.records import (
    OfItsKind,
    SagaRecord,
    SagaStarted,
    SagaStatus,
    decode_record,
    encode_record,
    status_after,
)
from sagakit.core.records import check_id as check_text
from sagakit.errors import (
    BackendBusy,
    BackendError,
    BackendRefused,
    BackendUnavailable,
    ConfigurationError,
    DefinitionError,
    LeaseLost,
    SagaError,
    SagaLogConflict,
    SchemaMismatch,
)
from sagakit.ports.saga_log import SagaSummary

__all__ = [
    "SCHEMA_VERSION",
    "FileId",
    "Row",
    "backend_name",
    "begin_write",
    "check_in_place",
    "file_id",
    "open_connection",
    "translate",
]

Row = tuple[str, int, str]  # (kind, schema version, JSON payload) as stored
FileId = tuple[tuple[int, int] | None, ...]  # (device, inode) of the file and its -wal, -shm
UNFINISHED = (SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value)
_SUMMARY = (
    "SELECT saga_id, saga, status, version, owner, lease_expires_at, created_at, updated_at"
    " FROM sagas"
)

# The schema this sagakit writes; a file with a newer one is refused. Bump it with a
# migration from every older version when a table changes.
SCHEMA_VERSION = 1

# ``id`` orders sagas by creation (claim_next takes the oldest, list shows the newest);
# an explicit INTEGER PRIMARY KEY, unlike a bare rowid, survives VACUUM unchanged.
# ``version`` is the number of records, ``epoch`` the fencing token bumped by each
# claim; a finished saga has no owner. ``records`` is clustered by (saga_id, seq), so
# reading one saga's log is one range scan.
_SCHEMA = f"""
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version (version) VALUES ({SCHEMA_VERSION});
CREATE TABLE sagas (
    id INTEGER PRIMARY KEY,
    saga_id TEXT NOT NULL UNIQUE,
    saga TEXT NOT NULL,
    status TEXT NOT NULL,
    version INTEGER NOT NULL,
    owner TEXT,
    epoch INTEGER NOT NULL,
    lease_expires_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX sagas_by_status ON sagas (status, id);
CREATE TABLE records (
    saga_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    schema_version INTEGER NOT NULL,
    payload TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (saga_id, seq)
) WITHOUT ROWID;
"""

_OURS = frozenset({"schema_version", "sagas", "records"})


def backend_name(path: Path) -> str:
    return f"sqlite:///{path}"


def open_connection(path: Path, busy_timeout: float, synchronous: str) -> sqlite3.Connection:
    """A connection to ``path`` in WAL mode with the schema in place; BackendError otherwise."""
    unusable = _not_a_file(path)
    if unusable is not None:
        raise unusable
    try:
        # isolation_level=None: transactions are begun explicitly (BEGIN IMMEDIATE for
        # writes), never implicitly by the driver.
        db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    except sqlite3.Error as exc:
        raise (_not_a_file(path) or translate(exc, path)) from exc  # gone meanwhile
    try:
        db.execute(f"PRAGMA busy_timeout = {_millis(busy_timeout)}")
        (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise BackendRefused(
                backend_name(path),
                f"SQLite cannot use write-ahead logging here (journal_mode stays {mode}):"
                " is the file on a network file system?",
            )
        db.execute(f"PRAGMA synchronous = {synchronous}")
        _ensure_schema(db, path)
    except BaseException as exc:
        db.close()
        if isinstance(exc, sqlite3.Error):
            raise translate(exc, path) from exc
        raise
    return db


def _not_a_file(path: Path) -> ConfigurationError | None:
    """The error for a path that can never be a saga log: its folder is not there, or it
    names a folder or a device. No retry helps, where SQLite says only CANTOPEN (or, for
    /dev/null, an I/O error), retryable for their other causes, such as a process out of
    file descriptors."""
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        problem = f"the folder {folder} {what}"
    elif path.is_dir():
        problem = f"{path} is a folder; name a file in it"
    elif path.exists() and not path.is_file():
        problem = f"{path} is not a regular file"
    else:
        return None
    return ConfigurationError(f"{backend_name(path)}: {problem}; give another path")


def file_id(path: Path) -> FileId:
    """The files ``path`` and its ``-wal`` and ``-shm`` name now (None: no such file)."""
    found: list[tuple[int, int] | None] = []
    for name in (str(path), f"{path}-wal", f"{path}-shm"):
        try:
            stat = os.stat(name)
        except OSError:
            found.append(None)
        else:
            found.append((stat.st_dev, stat.st_ino))
    return tuple(found)


def check_in_place(path: Path, opened: FileId) -> None:
    """BackendRefused unless ``path`` (and its -wal and -shm) still name the files the
    connection opened.

    SQLite goes on using the files it opened: the database deleted, every commit would go
    to a file nobody will read again; renamed or replaced, to a file that is no longer the
    log at ``path``; the -wal deleted (taken for a temporary file), to a write-ahead log
    that a killed process leaves nowhere. Each flush would "succeed" and be lost. (SQLite's
    own check, SQLITE_READONLY_DBMOVED, does not cover WAL mode.)
    """
    now = file_id(path)
    for suffix, was, is_ in zip(("", "-wal", "-shm"), opened, now, strict=True):
        if is_ != was and (was is not None or not suffix):
            raise BackendRefused(
                backend_name(path),
                f"{path.name}{suffix} was deleted or replaced while this log had it open;"
                " nothing is written any more, since it would be lost: put the file back,"
                " or stop every process using it and open the log again",
            )


def _ensure_schema(db: sqlite3.Connection, path: Path) -> None:
    # BEGIN IMMEDIATE: two processes opening a new file at once create it once.
    db.execute("BEGIN IMMEDIATE")
    try:
        tables = {
            name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if "schema_version" not in tables:
            if tables & _OURS:
                raise SchemaMismatch(
                    backend_name(path),
                    f"the file has table(s) {', '.join(sorted(tables & _OURS))} but no"
                    " schema_version: it is not a sagakit saga log",
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("COMMIT")
            return
        try:
            versions = db.execute("SELECT version FROM schema_version").fetchall()
        except sqlite3.OperationalError as exc:
            raise SchemaMismatch(
                backend_name(path), f"its schema_version table is not sagakit's: {exc}"
            ) from exc
        if len(versions) != 1 or type(versions[0][0]) is not int:
            raise SchemaMismatch(
                backend_name(path), f"its schema_version table holds {versions!r}, not a version"
            )
        version = versions[0][0]
        if version > SCHEMA_VERSION:
            raise SchemaMismatch(
                backend_name(path),
                f"the saga log has schema version {version}; this sagakit knows up to"
                f" {SCHEMA_VERSION}: upgrade sagakit to open it",
            )
        if version < 1:
            raise SchemaMismatch(backend_name(path), f"unknown schema version {version}")
        db.execute("COMMIT")
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")


def _millis(seconds: float) -> int:
    # SQLite keeps a C int: past 2**31 - 1 ms (24.8 days) it would wait not at all.
    return min(int(seconds * 1000), 2**31 - 1)


def begin_write(db: sqlite3.Connection, busy_timeout: float) -> None:
    """``BEGIN IMMEDIATE``, trying for the write lock again every fraction of a millisecond.

    SQLite's own busy handler sleeps longer and longer between tries (up to 100 ms),
    while a process that holds the lock takes it again microseconds after each commit:
    with several busy processes on one file, one could wait for seconds. Short random
    sleeps catch the gaps between the other processes' transactions.
    """
    deadline = time.monotonic() + busy_timeout
    db.execute("PRAGMA busy_timeout = 0")  # this loop waits instead; reads keep SQLite's
    try:
        while True:
            try:
                db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if _primary(exc) not in (_BUSY, _LOCKED) or time.monotonic() >= deadline:
                    raise
            time.sleep(random.uniform(0.0, 0.0005))
    finally:
        db.execute(f"PRAGMA busy_timeout = {_millis(busy_timeout)}")


def _primary(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


# SQLite's primary result codes (https://sqlite.org/rescode.html).
_PERM, _BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT = 3, 5, 6, 8, 10, 11
_FULL, _CANTOPEN, _PROTOCOL, _TOOBIG, _AUTH, _NOTADB = 13, 14, 15, 18, 23, 26


def translate(exc: sqlite3.Error, path: Path) -> BackendError:
    """The sagakit error for a driver error; it keeps the driver's as ``__cause__``."""
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    primary = _primary(exc)
    message = f"{exc} ({name})"
    where = backend_name(path)
    error: BackendError
    if primary in (_BUSY, _LOCKED) or (primary is None and "locked" in str(exc)):
        error = BackendBusy(where, f"{message}: another process holds the write lock")
    elif primary in (_IOERR, _CANTOPEN, _FULL, _PROTOCOL):
        error = BackendUnavailable(where, message)
    elif primary == _NOTADB:
        error = SchemaMismatch(where, f"{message}: the file is not an SQLite database")
    elif primary == _TOOBIG:
        error = BackendRefused(where, f"{message}: a value over SQLite's 1 GB limit")
    elif primary == _CORRUPT:
        error = BackendRefused(where, f"{message}: the database file is damaged")
    else:  # permissions, read-only files, constraint violations, misuse: no retry helps
        error = BackendRefused(where, message)
    error.__cause__ = exc
    return error


# --- statements, run on the writer thread as (db, now, *args) ---------------------------


def create(
    db: sqlite3.Connection,
    now: float,
    saga_id: str,
    saga: str,
    rows: list[Row],
    status: SagaStatus,
    owner: str | None,
    ttl: float,
) -> tuple[int, float] | None:
    expires_at = None if owner is None else now + ttl
    final = status.is_final
    cursor = db.execute(
        "INSERT INTO sagas (saga_id, saga, status, version, owner, epoch, lease_expires_at,"
        " created_at, updated_at) VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?)"
        " ON CONFLICT (saga_id) DO NOTHING",
        (
            saga_id,
            saga,
            status.value,
            len(rows),
            None if final else owner,
            None if final else expires_at,
            now,
            now,
        ),
    )
    if cursor.rowcount != 1:
        return None
    insert_records(db, now, saga_id, 0, rows)
    return 1, (now + ttl)


def insert_records(
    db: sqlite3.Connection, now: float, saga_id: str, first: int, rows: list[Row]
) -> None:
    db.executemany(
        "INSERT INTO records (saga_id, seq, kind, schema_version, payload, recorded_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [(saga_id, first + i, kind, v, payload, now) for i, (kind, v, payload) in enumerate(rows)],
    )


def flush(
    db: sqlite3.Connection,
    now: float,
    saga_id: str,
    owner: str,
    epoch: int,
    version: int,
    rows: list[Row],
    status: SagaStatus | None,
) -> None:
    found = db.execute(
        "SELECT epoch, version, status FROM sagas WHERE saga_id = ?", (saga_id,)
    ).fetchone()
    if found is None or found[0] != epoch:
        raise LeaseLost(saga_id, owner, epoch, "claimed by another")
    if found[2] not in UNFINISHED:
        raise LeaseLost(saga_id, owner, epoch, "the saga is finished")
    if found[1] != version:  # one writer per epoch: only a corrupt log gets here
        raise SagaLogConflict(saga_id, version, found[1])
    if status is not None and status.is_final:
        db.execute(
            "UPDATE sagas SET version = ?, status = ?, owner = NULL, lease_expires_at = NULL,"
            " updated_at = ? WHERE saga_id = ?",
            (version + len(rows), status.value, now, saga_id),
        )
    else:
        db.execute(
            "UPDATE sagas SET version = ?, status = coalesce(?, status), updated_at = ?"
            " WHERE saga_id = ?",
            (version + len(rows), None if status is None else status.value, now, saga_id),
        )
    insert_records(db, now, saga_id, version, rows)


def read_records(db: sqlite3.Connection, saga_id: str) -> list[SagaRecord]:
    return [
        decode_record(kind, v, payload)
        for kind, v, payload in db.execute(
            "SELECT kind, schema_version, payload FROM records WHERE saga_id = ? ORDER BY seq",
            (saga_id,),
        )
    ]


def take(
    db: sqlite3.Connection, now: float, saga_id: str, owner: str, ttl: float
) -> tuple[int, float, list[SagaRecord]]:
    records = read_records(db, saga_id)  # first: a log this sagakit cannot read is not taken
    db.execute(
        "UPDATE sagas SET owner = ?, epoch = epoch + 1, lease_expires_at = ? WHERE saga_id = ?",
        (owner, now + ttl, saga_id),
    )
    (epoch,) = db.execute("SELECT epoch FROM sagas WHERE saga_id = ?", (saga_id,)).fetchone()
    return epoch, now + ttl, records


def claim(
    db: sqlite3.Connection, now: float, saga_id: str, owner: str, ttl: float
) -> tuple[int, float, list[SagaRecord]] | None:
    found = db.execute(
        "SELECT 1 FROM sagas WHERE saga_id = ? AND status IN (?, ?)"
        " AND (owner IS NULL OR owner = ? OR lease_expires_at <= ?)",
        (saga_id, *UNFINISHED, owner, now),
    ).fetchone()
    return None if found is None else take(db, now, saga_id, owner, ttl)


def claim_next(
    db: sqlite3.Connection, now: float, owner: str, ttl: float, limit: int
) -> tuple[list[tuple[str, int, float, list[SagaRecord]]], list[str]]:
    """The sagas taken, and those passed over because their log is newer than this sagakit
    (left for a worker that can read them, and never in the way of the ones behind)."""
    taken: list[tuple[str, int, float, list[SagaRecord]]] = []
    unreadable: list[str] = []
    after = -1
    while len(taken) < limit:
        page = db.execute(
            "SELECT id, saga_id FROM sagas WHERE status IN (?, ?) AND id > ?"
            " AND (owner IS NULL OR lease_expires_at <= ?) ORDER BY id LIMIT ?",
            (*UNFINISHED, after, now, limit - len(taken)),
        ).fetchall()
        if not page:
            break
        after = page[-1][0]
        for _id, saga_id in page:
            try:
                taken.append((saga_id, *take(db, now, saga_id, owner, ttl)))
            except SchemaMismatch:
                unreadable.append(saga_id)
    return taken, unreadable


def renew(
    db: sqlite3.Connection, now: float, held: list[tuple[str, int]], ttl: float
) -> list[float | None]:
    expiries: list[float | None] = []
    for saga_id, epoch in held:
        cursor = db.execute(
            "UPDATE sagas SET lease_expires_at = ? WHERE saga_id = ? AND epoch = ?"
            " AND owner IS NOT NULL AND status IN (?, ?)",
            (now + ttl, saga_id, epoch, *UNFINISHED),
        )
        expiries.append(now + ttl if cursor.rowcount == 1 else None)
    return expiries


def release(db: sqlite3.Connection, now: float, saga_id: str, epoch: int) -> None:
    db.execute(
        "UPDATE sagas SET owner = NULL, lease_expires_at = NULL WHERE saga_id = ? AND epoch = ?",
        (saga_id, epoch),
    )


def release_all(db: sqlite3.Connection, now: float, leases: list[tuple[str, int]]) -> None:
    for saga_id, epoch in leases:
        release(db, now, saga_id, epoch)


def history(db: sqlite3.Connection, now: float, saga_id: str) -> list[tuple[int, Any, float]]:
    return [
        (seq, decode_record(kind, v, payload), at)
        for seq, kind, v, payload, at in db.execute(
            "SELECT seq, kind, schema_version, payload, recorded_at FROM records"
            " WHERE saga_id = ? ORDER BY seq",
            (saga_id,),
        )
    ]


def status(db: sqlite3.Connection, now: float, saga_id: str) -> tuple[Any, ...] | None:
    row: tuple[Any, ...] | None = db.execute(f"{_SUMMARY} WHERE saga_id = ?", (saga_id,)).fetchone()
    return row


def list_sagas(
    db: sqlite3.Connection, now: float, wanted: list[str] | None, limit: int
) -> list[tuple[Any, ...]]:
    if wanted is None:
        return db.execute(f"{_SUMMARY} ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    marks = ", ".join("?" * len(wanted))
    return db.execute(
        f"{_SUMMARY} WHERE status IN ({marks}) ORDER BY id DESC LIMIT ?", (*wanted, limit)
    ).fetchall()


def summary(row: tuple[Any, ...]) -> SagaSummary:
    saga_id, saga, status, version, owner, expires_at, created_at, updated_at = row
    try:
        known = SagaStatus(status)
    except ValueError:
        raise SchemaMismatch(
            "sqlite",
            f"saga {saga_id!r} has status {status!r}, unknown to this sagakit:"
            " written by a newer one, or edited by hand",
            saga_id=saga_id,
        ) from None
    return SagaSummary(saga_id, saga, known, version, owner, expires_at, created_at, updated_at)


def listed(rows: list[tuple[Any, ...]], logger: logging.Logger) -> list[SagaSummary]:
    """The summaries of ``rows``, less those with a status this sagakit does not know
    (logged): one saga a listing cannot show must not hide the others, and the listing
    is how an operator finds what is wrong. ``status`` of that saga raises."""
    found = []
    for row in rows:
        try:
            found.append(summary(row))
        except SchemaMismatch as exc:
            logger.warning("not listed: %s", exc)
    return found


def encode_rows(saga_id: str, records: Sequence[SagaRecord]) -> tuple[list[Row], list[Any]]:
    """The rows to store for ``records``, and the status after each; SagaError when a value
    in them is not JSON (raised when staged, so that no flush holds a batch it cannot write)."""
    rows: list[Row] = []
    statuses: list[SagaStatus | None] = []
    for record in records:
        if not isinstance(record, OfItsKind):
            raise DefinitionError("records", f"must be saga records, not {record!r:.100}")
        try:
            kind, version, payload = encode_record(record)
        except (TypeError, ValueError) as exc:
            step = getattr(record, "step", None)
            where = "its input" if type(record) is SagaStarted else f"{record.KIND} of step {step}"
            raise SagaError(saga_id, f"{where} is not a JSON value: {exc}") from exc
        rows.append((kind, version, payload.decode()))
        statuses.append(status_after(record))
    return rows, statuses


# --- arguments, checked on the caller's side before any work --------------------------


def check_id(saga_id: object) -> None:
    check_text("saga_id", saga_id)


def check_owner(owner: object) -> None:
    check_text("owner", owner)


def check_saga(name: object) -> None:
    check_text("saga", name)
