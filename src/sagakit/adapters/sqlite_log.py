"""The SQLite saga log: durable sagas in one file, for one machine.

``sqlite:///sagas.db`` opens (and creates) ``sagas.db`` relative to the
working directory, ``sqlite:////var/lib/app/sagas.db`` an absolute path (three
slashes then the path, as in SQLAlchemy). Options, in the query string:
``busy_timeout`` (seconds to wait for another process's write lock, default 5)
and ``synchronous`` (``full``, the default, or ``normal``; see below).
``sqlite:///:memory:`` is refused: a log that dies with the process is
``memory://``.

Durability. Each flush returns only once its transaction is committed with
``journal_mode=WAL`` and ``synchronous=FULL``: SQLite syncs the write-ahead log
to disk at every commit, so a record whose flush returned survives a killed
process and a power cut. (``synchronous=normal`` skips that sync and stays
safe against a killed process, not against a power cut: a choice left to the
user, never the default.) A process killed mid-transaction leaves nothing of
it: WAL replays only committed transactions.

Work off the event loop. A dedicated writer thread owns the one connection
and runs every statement; the loop only queues requests and awaits futures. That
thread stays in the process that started it: a forked child opens a log of its own.

Group commit. Requests queue up while the writer thread commits; it then takes
everything queued (up to ``max_batch``) into one ``BEGIN IMMEDIATE``
transaction, each request in its own savepoint, and commits once. So 64 sagas
flushing at once cost a handful of syncs, not 64, with no added delay for a
lone saga. Each saga's flush is checked against its epoch (fencing) and
version in that transaction; one that fails (``LeaseLost``) fails alone.

Several processes may open the same file: every write, claims included, runs
in ``BEGIN IMMEDIATE``, so SQLite's write lock serialises them and
``claim_next`` never hands one saga to two processes. A process waits for that
lock up to ``busy_timeout`` (then :class:`~sagakit.errors.BackendBusy`), trying
again every fraction of a millisecond rather than with SQLite's own growing
sleeps, so that busy processes share the file instead of starving each other. Leases are measured on
``clock`` (default :func:`time.time`), which processes of one machine share.

Every batch checks, before writing and after committing, that the path (and its -wal
and -shm) still names the file the connection opened: SQLite would go on writing to a
deleted or replaced file, every flush lost. Otherwise :class:`~sagakit.errors.BackendRefused`.

The schema is created on first use and its version kept in ``schema_version``;
a newer version, or a file that is not sagakit's, is refused with
:class:`~sagakit.errors.SchemaMismatch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from sagakit.adapters import redact_url
from sagakit.adapters import sqlite_store as store
from sagakit.adapters._options import count, seconds
from sagakit.adapters._sqlite_requests import Request, consume, settle
from sagakit.adapters.sqlite_store import (
    SCHEMA_VERSION,
    Row,
    backend_name,
    begin_write,
    open_connection,
    translate,
)
from sagakit.core.records import (
    SagaRecord,
    SagaStarted,
    SagaStatus,
    valid_id,
)
from sagakit.errors import (
    BackendRefused,
    ConfigurationError,
    DefinitionError,
    LeaseLost,
)
from sagakit.ports.saga_log import (
    Claim,
    Lease,
    LoggedRecord,
    SagaLog,
    SagaSummary,
    check_limit,
    check_ttl,
    wanted_statuses,
)

__all__ = ["SCHEMA_VERSION", "SQLiteJournal", "SQLiteSagaLog", "SQLiteStats"]

_NO_OWNER = "(no owner)"
_logger = logging.getLogger("sagakit.sqlite")


@dataclass
class SQLiteStats:
    """What the writer thread did, for tests and benchmarks."""

    commits: int = 0  # write transactions committed
    requests: int = 0  # requests run (writes and reads)
    rollbacks: int = 0  # transactions that failed whole


class SQLiteJournal:
    """Writes one saga's records under one epoch; see :class:`SQLiteSagaLog`."""

    __slots__ = (
        "_durable",
        "_epoch",
        "_inflight",
        "_lost",
        "_owner",
        "_rows",
        "_statuses",
        "lease",
        "log",
        "saga_id",
    )

    def __init__(
        self, log: SQLiteSagaLog, saga_id: str, epoch: int, version: int, lease: Lease | None
    ) -> None:
        self.log = log
        self.saga_id = saga_id
        self.lease = lease
        self._epoch = epoch
        self._owner = lease.owner if lease is not None else _NO_OWNER
        self._durable = version  # records known to be committed
        self._rows: list[Row] = []  # staged, encoded
        self._statuses: list[SagaStatus | None] = []  # status_after of each staged record
        self._inflight: asyncio.Future[Any] | None = None
        self._lost = False

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def version(self) -> int:
        return self._durable + len(self._rows)

    def stage(self, records: Sequence[SagaRecord]) -> None:
        # Encoded now, so that a value that is not JSON fails here, whole, and the
        # staged batch is never one that no flush could write.
        rows, statuses = store.encode_rows(self.saga_id, records)
        self._rows += rows
        self._statuses += statuses

    async def flush(self) -> None:
        # One flush in flight per journal: a second waits for the first (which goes
        # on even when its caller was cancelled), so versions never overlap.
        while self._inflight is not None:
            await asyncio.wait([self._inflight])
        if self._lost:
            raise LeaseLost(self.saga_id, self._owner, self._epoch)
        count = len(self._rows)
        if not count:
            return
        status = next((s for s in reversed(self._statuses) if s is not None), None)
        request = self.log._request(
            store.flush,
            (self.saga_id, self._owner, self._epoch, self._durable, self._rows[:count], status),
            writes=True,
            on_done=lambda _result, error: self._flushed(count, error),
        )
        self._inflight = request.future
        await asyncio.shield(request.future)

    def _flushed(self, count: int, error: BaseException | None) -> None:
        self._inflight = None
        if error is None:
            self._durable += count
            del self._rows[:count]
            del self._statuses[:count]
        elif isinstance(error, LeaseLost):
            self._lost = True  # epochs only grow: it will never be current again

    def _renewed(self, expires_at: float | None) -> None:
        if expires_at is not None and self.lease is not None:
            self.lease = self.lease._replace(expires_at=expires_at)


class SQLiteSagaLog:
    """A :class:`~sagakit.ports.saga_log.SagaLog` in an SQLite file; see the module docstring."""

    durable = True

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout: float = 5.0,
        synchronous: str = "full",
        clock: Callable[[], float] = time.time,
        max_batch: int = 256,
    ) -> None:
        if str(path) in ("", ":memory:") or str(path).startswith("file:"):
            raise ConfigurationError(
                f"sqlite saga log path {str(path)!r}: give a file path"
                " (memory:// is the log that lives in the process)"
            )
        if not isinstance(synchronous, str) or synchronous.lower() not in ("full", "normal"):
            raise ConfigurationError(
                f"synchronous must be full or normal, not {synchronous!r:.100}"
            )
        busy_timeout = seconds("busy_timeout", busy_timeout, zero=True)
        max_batch = count("max_batch", max_batch, least=1)
        # Resolved now: a later chdir must not move the log.
        self.path = Path(path).expanduser().absolute()
        self.busy_timeout = busy_timeout
        self.synchronous = synchronous.upper()
        self.max_batch = max_batch
        self.stats = SQLiteStats()
        self._clock = clock
        self._queue: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0  # the process the writer thread runs in
        self._lock = threading.Lock()
        self._closed = False
        self._unreadable: set[str] = set()  # warned about once each (a bounded set)
        self._abandoned: set[asyncio.Future[Any]] = set()  # leases of callers gone, and
        # their give-backs

    @classmethod
    def from_url(cls, url: str) -> SQLiteSagaLog:
        parts = urlsplit(url)
        if parts.netloc:
            raise ConfigurationError(
                f"saga log URL {redact_url(url)!r}: sqlite:///relative.db or"
                " sqlite:////absolute.db (three slashes before the path;"
                f" {redact_url(url).partition('://')[2].partition('/')[0]!r} looks like a host)"
            )
        path = unquote(parts.path[1:])  # drop the slash that ends "sqlite://"
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = set(options) - {"busy_timeout", "synchronous"}
        if unknown:
            raise ConfigurationError(
                f"saga log URL {redact_url(url)!r}: unknown option(s) {', '.join(sorted(unknown))}"
                " (sqlite:// takes busy_timeout and synchronous)"
            )
        try:
            busy_timeout = float(options.get("busy_timeout", "5"))
        except ValueError:
            raise ConfigurationError(
                f"saga log URL {redact_url(url)!r}: busy_timeout must be a number of seconds"
            ) from None
        return cls(path, busy_timeout=busy_timeout, synchronous=options.get("synchronous", "full"))

    # --- the writer thread ------------------------------------------------------------

    def _request(
        self,
        run: Callable[..., Any],
        args: tuple[Any, ...],
        *,
        writes: bool,
        on_done: Callable[[Any, BaseException | None], None] | None = None,
    ) -> Request:
        request = Request(run, args, writes, on_done)
        if self._thread is not None and self._pid != os.getpid():  # else: waits for ever
            raise ConfigurationError(
                f"{backend_name(self.path)}: this log was opened before a fork, and its writer"
                " thread stayed in the parent; open a log in each process"
            )
        with self._lock:
            if self._closed:
                raise BackendRefused(backend_name(self.path), "the saga log is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name=f"sagakit-sqlite:{self.path.name}", daemon=True
                )
                self._thread.start()
                self._pid = os.getpid()
            self._queue.put(request)
        return request

    async def _call(self, run: Callable[..., Any], *args: Any, writes: bool = True) -> Any:
        return await self._request(run, args, writes=writes).future

    async def _leasing(
        self,
        held: Callable[[Any], list[tuple[str, int]]],
        run: Callable[..., Any],
        *args: Any,
    ) -> Any:
        """A call that takes leases; ``held`` names them (saga id, epoch) in its result."""
        request = self._request(run, args, writes=True)
        try:
            return await asyncio.shield(request.future)
        except asyncio.CancelledError:
            # The leases are taken all the same, and nobody will drive those sagas:
            # give them back as soon as they are known, not when they expire.
            self._abandoned.add(request.future)
            request.future.add_done_callback(lambda future: self._give_back(future, held))
            request.future.add_done_callback(self._abandoned.discard)
            raise

    def _give_back(
        self, future: asyncio.Future[Any], held: Callable[[Any], list[tuple[str, int]]]
    ) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        leases = held(future.result())
        if not leases:
            return
        with contextlib.suppress(BackendRefused):  # closed meanwhile: they expire instead
            request = self._request(store.release_all, (leases,), writes=True)
            request.future.add_done_callback(consume)
            self._abandoned.add(request.future)
            request.future.add_done_callback(self._abandoned.discard)

    def _serve(self) -> None:
        connection: sqlite3.Connection | None = None
        opened: store.FileId = ()  # the files the connection has open
        stop = False
        try:
            while not stop:
                batch: list[Request] = []
                item = self._queue.get()
                while item is not None:
                    batch.append(item)
                    if len(batch) >= self.max_batch:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                stop = item is None
                if not batch:
                    continue
                try:
                    if connection is None:
                        connection = open_connection(self.path, self.busy_timeout, self.synchronous)
                        opened = store.file_id(self.path)
                    done = self._run(connection, batch, opened)
                except Exception as exc:  # a failing clock, a bug: never a caller left waiting
                    if connection is not None and connection.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            connection.execute("ROLLBACK")
                    done = [(r, None, exc) for r in batch]
                self._answer(done)
        finally:
            if connection is not None:
                connection.close()

    def _run(
        self, db: sqlite3.Connection, batch: list[Request], opened: store.FileId
    ) -> list[tuple[Request, Any, BaseException | None]]:
        writes = any(r.writes for r in batch)
        done: list[tuple[Request, Any, BaseException | None]] = []
        try:
            if writes:
                begin_write(db, self.busy_timeout)
            else:
                db.execute("BEGIN")
            store.check_in_place(self.path, opened)
            now = self._clock()  # one moment per transaction: a batch's records share it
            for request in batch:
                if len(batch) > 1:
                    db.execute("SAVEPOINT request")
                try:
                    result = request.run(db, now, *request.args)
                except Exception as exc:
                    # Its own data (a constraint, SQLITE_TOOBIG) fails a request alone;
                    if isinstance(exc, sqlite3.Error) and not isinstance(
                        exc, sqlite3.IntegrityError | sqlite3.DataError
                    ):
                        raise  # I/O, a full disk, damage: the transaction is gone, for all
                    if len(batch) > 1:
                        db.execute("ROLLBACK TO request")
                        db.execute("RELEASE request")
                    else:
                        db.execute("ROLLBACK")
                    done.append((request, None, _as_error(exc, self.path)))
                    continue
                if len(batch) > 1:
                    db.execute("RELEASE request")
                done.append((request, result, None))
            if db.in_transaction:
                db.execute("COMMIT")
                if writes:
                    self.stats.commits += 1
                    # Moved while committing: those records are not in the log at path.
                    store.check_in_place(self.path, opened)
            self.stats.requests += len(batch)
        except sqlite3.Error as exc:
            self.stats.rollbacks += 1
            if db.in_transaction:
                # A failing ROLLBACK: the connection will say so again on the next request.
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            error = translate(exc, self.path)
            return [(r, None, error) for r in batch]
        return done

    def _answer(self, done: list[tuple[Request, Any, BaseException | None]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, Any, Any]]] = {}
        for item in done:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(settle, items)

    # --- the port -------------------------------------------------------------------

    async def create(
        self,
        saga_id: str,
        opening: Sequence[SagaRecord],
        *,
        owner: str | None,
        ttl: float,
    ) -> SQLiteJournal | None:
        store.check_id(saga_id)
        if owner is not None:
            store.check_owner(owner)
        check_ttl(ttl)
        started = opening[0] if opening else None
        if type(started) is not SagaStarted:
            raise DefinitionError(
                "opening", f"a saga's log opens with SagaStarted, not {started!r:.100}"
            )
        store.check_saga(started.saga)
        rows, statuses = store.encode_rows(saga_id, opening)
        status = next((s for s in reversed(statuses) if s is not None), SagaStatus.RUNNING)
        made = await self._leasing(
            lambda made: [] if made is None or owner is None else [(saga_id, made[0])],
            store.create,
            saga_id,
            started.saga,
            rows,
            status,
            owner,
            ttl,
        )
        if made is None:
            return None
        epoch, expires_at = made
        lease = None if owner is None else Lease(owner, epoch, expires_at)
        return SQLiteJournal(self, saga_id, epoch, len(rows), lease)

    async def claim(self, saga_id: str, *, owner: str, ttl: float) -> Claim | None:
        store.check_owner(owner)
        check_ttl(ttl)
        if not valid_id(saga_id):
            return None  # no such saga can be in the log
        taken = await self._leasing(
            lambda taken: [] if taken is None else [(saga_id, taken[0])],
            store.claim,
            saga_id,
            owner,
            ttl,
        )
        return None if taken is None else self._claimed(saga_id, owner, *taken)

    async def claim_next(self, *, owner: str, ttl: float, limit: int) -> list[Claim]:
        store.check_owner(owner)
        check_ttl(ttl)
        limit = min(check_limit(limit), 2**63 - 1)  # SQLite's integers are 64-bit
        if limit == 0:
            return []
        taken, unreadable = await self._leasing(
            lambda result: [(saga_id, epoch) for saga_id, epoch, *_ in result[0]],
            store.claim_next,
            owner,
            ttl,
            limit,
        )
        for saga_id in unreadable:
            if saga_id not in self._unreadable and len(self._unreadable) < 1000:
                self._unreadable.add(saga_id)
                _logger.warning(
                    "saga %r in %s has records this sagakit cannot read (newer, or damaged); left",
                    saga_id,
                    self.path,
                )
        return [self._claimed(saga_id, owner, *rest) for saga_id, *rest in taken]

    def _claimed(
        self, saga_id: str, owner: str, epoch: int, expires_at: float, records: list[SagaRecord]
    ) -> Claim:
        lease = Lease(owner, epoch, expires_at)
        return Claim(records, SQLiteJournal(self, saga_id, epoch, len(records), lease))

    async def renew(self, journals: Sequence[Any], *, ttl: float) -> list[str]:
        check_ttl(ttl)
        mine = [self._mine(journal) for journal in journals]
        if not mine:
            return []
        expiries: list[float | None] = await self._call(
            store.renew, [(j.saga_id, j.epoch) for j in mine], ttl
        )
        for journal, expires_at in zip(mine, expiries, strict=True):
            journal._renewed(expires_at)
        return [
            j.saga_id for j, expires_at in zip(mine, expiries, strict=True) if expires_at is None
        ]

    async def release(self, journal: Any) -> None:
        mine = self._mine(journal)
        await self._call(store.release, mine.saga_id, mine.epoch)

    def _mine(self, journal: Any) -> SQLiteJournal:
        if not isinstance(journal, SQLiteJournal) or journal.log is not self:
            raise TypeError(f"not a journal of this saga log: {journal!r}")
        return journal

    async def read(self, saga_id: str) -> list[SagaRecord]:
        return [entry.record for entry in await self.history(saga_id)]

    async def history(self, saga_id: str) -> list[LoggedRecord]:
        if not valid_id(saga_id):
            return []  # no such saga can be in the log (and sqlite3 cannot encode some)
        rows = await self._call(store.history, saga_id, writes=False)
        return [LoggedRecord(seq, record, at) for seq, record, at in rows]

    async def status(self, saga_id: str) -> SagaSummary | None:
        if not valid_id(saga_id):
            return None
        row = await self._call(store.status, saga_id, writes=False)
        return None if row is None else store.summary(row)

    async def list(
        self,
        *,
        status: SagaStatus | str | Sequence[SagaStatus | str] | None = None,
        limit: int = 100,
    ) -> list[SagaSummary]:
        limit = min(check_limit(limit), 2**63 - 1)  # SQLite's integers are 64-bit
        wanted = wanted_statuses(status)
        if limit == 0 or wanted == []:
            return []
        rows = await self._call(store.list_sagas, wanted, limit, writes=False)
        return store.listed(rows, _logger)

    async def close(self) -> None:
        # Claims whose callers were cancelled (a worker stopping) still give their leases
        # back, which a closed log would refuse. Bounded: a file locked by another
        # process for long lets those leases expire instead.
        deadline = time.monotonic() + 10
        while self._abandoned and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._abandoned), timeout=left)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._queue.put(None)
        if thread is not None:
            await asyncio.to_thread(thread.join)


# --- errors -----------------------------------------------------------------------------


def _as_error(exc: Exception, path: Path) -> BaseException:
    return translate(exc, path) if isinstance(exc, sqlite3.Error) else exc


if TYPE_CHECKING:  # the port, checked by mypy
    _port: SagaLog = SQLiteSagaLog("sagas.db")
