"""The SQLite saga log's schema, its connection settings, and its error translation.

Kept apart from :mod:`sagakit.adapters.sqlite_log` (the log itself) so that each
stays short; only the writer thread of that module calls :func:`open_connection`.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sagakit.errors import (
    BackendBusy,
    BackendError,
    BackendRefused,
    BackendUnavailable,
    SchemaMismatch,
)

__all__ = ["SCHEMA_VERSION", "backend_name", "open_connection", "translate"]

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
    try:
        # isolation_level=None: transactions are begun explicitly (BEGIN IMMEDIATE for
        # writes), never implicitly by the driver.
        db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    except sqlite3.Error as exc:
        raise translate(exc, path) from exc
    try:
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
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


# SQLite's primary result codes (https://sqlite.org/rescode.html).
_PERM, _BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT = 3, 5, 6, 8, 10, 11
_FULL, _CANTOPEN, _PROTOCOL, _AUTH, _NOTADB = 13, 14, 15, 23, 26


def translate(exc: sqlite3.Error, path: Path) -> BackendError:
    """The sagakit error for a driver error; it keeps the driver's as ``__cause__``."""
    code = getattr(exc, "sqlite_errorcode", None)
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    primary = code & 0xFF if isinstance(code, int) else None
    message = f"{exc} ({name})"
    where = backend_name(path)
    error: BackendError
    if primary in (_BUSY, _LOCKED) or (primary is None and "locked" in str(exc)):
        error = BackendBusy(where, f"{message}: another process holds the write lock")
    elif primary in (_IOERR, _CANTOPEN, _FULL, _PROTOCOL):
        error = BackendUnavailable(where, message)
    elif primary == _NOTADB:
        error = SchemaMismatch(where, f"{message}: the file is not an SQLite database")
    elif primary == _CORRUPT:
        error = BackendRefused(where, f"{message}: the database file is damaged")
    else:  # permissions, read-only files, constraint violations, misuse: no retry helps
        error = BackendRefused(where, message)
    error.__cause__ = exc
    return error
