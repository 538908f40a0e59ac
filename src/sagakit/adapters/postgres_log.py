"""The PostgreSQL saga log: ``postgresql://user:password@host:port/database``.

Many worker processes, on many machines, share one database: a saga is leased
to one worker at a time (owner, expiry on the server's clock, a fencing epoch
bumped by every claim and checked by every write), and ``claim_next`` hands
sagas out with ``FOR UPDATE SKIP LOCKED``, so concurrent workers never get the
same one.

Group commit: journals' flushes (and new sagas' creates) wait in one queue; one
writer takes everything queued and writes it in ONE statement, so one commit:
an ``INSERT ... ON CONFLICT DO NOTHING`` for the new sagas, an ``UPDATE ...
FROM unnest(...)`` that checks each saga's epoch and record count, and an
``INSERT ... SELECT FROM unnest(...)`` of the records of the sagas that passed.
A saga that fails its check (another worker claimed it) fails only its own
flush, with :class:`~sagakit.errors.LeaseLost`. While one batch commits, the
next one gathers, so 64 sagas in flight share a handful of commits where one at
a time each still gets its own at once.

Driver: asyncpg, chosen by measurement on the development machine (2 cores,
PostgreSQL 15, ``/work/notes/H2b-driver-bench.py``): with 16 clients and
``synchronous_commit=off`` (the driver's own cost showing, not the disk's),
asyncpg made 22,000 one-row commits/s against psycopg 3's 9,800, and 64-row
``unnest`` inserts ran at 128,000 rows/s against 46,000 (its binary array
encoding). With fsync on, one client commits about 2,400/s with either: the
disk, not the driver, is the limit there, which group commit addresses.

Options in the URL's query, beside asyncpg's own: ``pool_size`` (connections,
default 10), ``connect_timeout`` and ``command_timeout`` (seconds, default 10
and 60). Any other query parameter is a server setting (asyncpg's rule), e.g.
``?search_path=sagas`` to keep the tables in a schema of their own.

The schema (tables ``sagakit_sagas``, ``sagakit_records``,
``sagakit_schema_version``) is created on first use, under an advisory lock, so
that workers starting together create it once; a schema newer than this
sagakit is refused with :class:`~sagakit.errors.SchemaMismatch`. Payloads are
``json`` (not ``jsonb``): kept byte for byte, key order included, and ``\\u0000``
in a string is accepted, where ``jsonb`` rejects it.

Errors: connection lost or refused, server shutting down or starting, timeouts
become :class:`~sagakit.errors.BackendUnavailable`; serialization failures,
deadlocks and lock timeouts :class:`~sagakit.errors.BackendBusy` (a batch is
retried a few times first); bad credentials or missing privileges
:class:`~sagakit.errors.BackendRefused`. The pool reconnects by itself: a log
whose server restarted works again without being reopened. A flush whose
commit was cut off (its outcome unknown) is settled on the next flush by
reading the saga's record count back, under the same epoch, so records are
never written twice and a worker does not mistake its own write for a lost
lease.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]

from sagakit.core.records import (
    SagaRecord,
    SagaStarted,
    SagaStatus,
    decode_record,
    encode_record,
    status_after,
)
from sagakit.errors import (
    BackendBusy,
    BackendError,
    BackendRefused,
    BackendUnavailable,
    ConfigurationError,
    LeaseLost,
    SagaError,
    SchemaMismatch,
)
from sagakit.ports.saga_log import Claim, Lease, LoggedRecord, SagaLog, SagaSummary

from . import _postgres_sql as sql

__all__ = ["PostgresSagaLog", "PostgresStats", "from_url"]

BACKEND = "postgresql"
_MAX_BATCH = 512  # operations per group commit: bounded statements, bounded memory
_BUSY_RETRIES = 3  # a batch that hit a deadlock or serialization failure is tried again


@dataclass
class PostgresStats:
    """What the log sent to the server (for tests and benchmarks)."""

    statements: int = 0  # SQL statements executed
    commits: int = 0  # transactions that wrote
    batches: int = 0  # group commits
    flushes: int = 0  # journal flushes and creates those batches carried


# --- errors ---------------------------------------------------------------------------

_UNAVAILABLE_STATES = {"57P01", "57P02", "57P03", "53300", "08000", "08001", "08003", "08004"}
_UNAVAILABLE_STATES |= {"08006", "08007", "08P01"}
_BUSY_STATES = {"40001", "40P01", "55P03", "57014"}


def _translate(exc: BaseException) -> BackendError:
    """The sagakit error for a driver error (with the driver's as its cause)."""
    state = getattr(exc, "sqlstate", None) or ""
    message = f"{type(exc).__name__}: {exc}"
    error: BackendError
    if isinstance(exc, asyncpg.PostgresConnectionError) or state in _UNAVAILABLE_STATES:
        error = BackendUnavailable(BACKEND, message)
    elif isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError):
        # Refused, reset, DNS, timeouts; InterfaceError: "connection is closed".
        error = BackendUnavailable(BACKEND, message)
    elif state in _BUSY_STATES or state.startswith(("40", "53")):
        error = BackendBusy(BACKEND, message)
    elif state.startswith(("28", "42501", "3D")):
        error = BackendRefused(BACKEND, message)
    else:
        error = BackendError(BACKEND, message)
    error.__cause__ = exc
    return error


_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


# --- journals -------------------------------------------------------------------------


class _Pending:
    """Records staged, encoded at once (a value that is not JSON fails ``stage``)."""

    __slots__ = ("rows", "status")

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, str]] = []  # (kind, version, payload)
        self.status: list[SagaStatus | None] = []  # the status after each row, if it changes


class _Journal:
    """Writes one saga's records under one epoch; see the port."""

    def __init__(
        self, log: PostgresSagaLog, saga_id: str, epoch: int, version: int, lease: Lease | None
    ) -> None:
        self._log = log
        self.saga_id = saga_id
        self.epoch = epoch
        self.lease = lease
        self.durable_version = version
        self.pending = _Pending()
        self.lost: str | None = None  # why this journal may not write any more
        self.final_staged = False
        # The last batch carrying this journal was cut off: it may have committed.
        self.uncertain = False

    @property
    def version(self) -> int:
        return self.durable_version + len(self.pending.rows)

    def _lease_lost(self, detail: str) -> LeaseLost:
        owner = self.lease.owner if self.lease is not None else "(no owner)"
        return LeaseLost(self.saga_id, owner, self.epoch, detail)

    def stage(self, records: Sequence[SagaRecord]) -> None:
        if self.lost is not None:
            raise self._lease_lost(self.lost)
        if self.final_staged:
            raise self._lease_lost("the saga is finished")
        encoded = [_encode(self.saga_id, record) for record in records]
        self.pending.rows += encoded
        for record in records:
            status = status_after(record)
            self.pending.status.append(status)
            if status is not None and status.is_final:
                self.final_staged = True

    async def flush(self) -> None:
        while self.pending.rows:
            if self.lost is not None:
                raise self._lease_lost(self.lost)
            # Shielded: a cancelled caller stops waiting, the batch goes on.
            await asyncio.shield(self._log._committer.flush(self))


def _encode(saga_id: str, record: SagaRecord) -> tuple[str, int, str]:
    try:
        kind, version, payload = encode_record(record)
    except (TypeError, ValueError) as exc:
        if isinstance(record, SagaStarted):
            raise SagaError(saga_id, f"its input is not a JSON value: {exc}") from exc
        step = getattr(record, "step", None)
        raise SagaError(
            saga_id, f"the result of step {step} is not a JSON value: {exc}", step=str(step)
        ) from exc
    return kind, version, payload.decode()


def _status_of(statuses: Sequence[SagaStatus | None]) -> SagaStatus | None:
    for status in reversed(statuses):
        if status is not None:
            return status
    return None


# --- group commit -----------------------------------------------------------------------


class _Create:
    __slots__ = ("future", "owner", "rows", "saga", "saga_id", "status", "ttl")

    def __init__(
        self, saga_id: str, saga: str, rows: list[tuple[str, int, str]], status: SagaStatus
    ) -> None:
        self.saga_id = saga_id
        self.saga = saga
        self.rows = rows
        self.status = status
        self.owner: str | None = None
        self.ttl = 0.0
        # (created, lease expiry): not created when the saga id is taken.
        self.future: asyncio.Future[tuple[bool, float | None]] = (
            asyncio.get_running_loop().create_future()
        )


class _Committer:
    """Gathers creates and flushes; one batch at a time, each in one statement."""

    def __init__(self, log: PostgresSagaLog) -> None:
        self._log = log
        self._creates: list[_Create] = []
        self._flushes: dict[_Journal, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None

    def _kick(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def flush(self, journal: _Journal) -> asyncio.Future[None]:
        future = self._flushes.get(journal)
        if future is None:
            future = self._flushes[journal] = asyncio.get_running_loop().create_future()
            self._kick()
        return future

    def create(self, op: _Create) -> asyncio.Future[tuple[bool, float | None]]:
        self._creates.append(op)
        self._kick()
        return op.future

    async def drain(self) -> None:
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        while self._creates or self._flushes:
            creates, flushes = self._take()
            try:
                await self._commit(creates, flushes)
            except BaseException as exc:  # never leave a caller waiting for ever
                error = (
                    exc if isinstance(exc, Exception) else BackendUnavailable(BACKEND, "stopped")
                )
                for op in creates:
                    _fail(op.future, error)
                for future in flushes.values():
                    _fail(future, error)
                if not isinstance(exc, Exception):
                    raise

    def _take(self) -> tuple[list[_Create], dict[_Journal, asyncio.Future[None]]]:
        """The next batch: at most one operation per saga (a later one waits its turn)."""
        seen: set[str] = set()
        creates: list[_Create] = []
        flushes: dict[_Journal, asyncio.Future[None]] = {}
        rest: list[_Create] = []
        for op in self._creates:
            if op.saga_id in seen or len(seen) >= _MAX_BATCH:
                rest.append(op)
            else:
                seen.add(op.saga_id)
                creates.append(op)
        self._creates = rest
        for journal in list(self._flushes):
            if journal.saga_id in seen or len(seen) >= _MAX_BATCH:
                continue
            seen.add(journal.saga_id)
            flushes[journal] = self._flushes.pop(journal)
        return creates, flushes

    async def _commit(
        self, creates: list[_Create], flushes: dict[_Journal, asyncio.Future[None]]
    ) -> None:
        log = self._log
        sizes: dict[_Journal, int] = {}
        for journal, future in list(flushes.items()):
            if journal.lost is not None:
                _fail(future, journal._lease_lost(journal.lost))
                del flushes[journal]
            elif not journal.pending.rows:
                _done(future, None)
                del flushes[journal]
            else:
                sizes[journal] = len(journal.pending.rows)
        if not creates and not sizes:
            return
        args = _batch_arguments(creates, sizes)
        attempt = 0
        while True:
            attempt += 1
            try:
                rows = await log._execute_batch(args, len(creates) + len(sizes))
                break
            except BackendError as error:
                if isinstance(error, BackendBusy) and attempt < _BUSY_RETRIES:
                    await asyncio.sleep(0.005 * attempt)
                    continue
                for op in creates:
                    _fail(op.future, _copy(error))
                for journal in sizes:
                    journal.uncertain = journal.uncertain or isinstance(error, BackendUnavailable)
                    _fail(flushes[journal], _copy(error))
                return
        written = {row["saga_id"]: row["expires_at"] for row in rows}
        for op in creates:
            _done(op.future, (op.saga_id in written, written.get(op.saga_id)))
        failed: list[_Journal] = []
        for journal, n in sizes.items():
            if journal.saga_id in written:
                _advance(journal, n)
                _done(flushes[journal], None)
            else:
                failed.append(journal)
        if failed:
            await self._settle(failed, sizes, flushes)

    async def _settle(
        self,
        failed: list[_Journal],
        sizes: dict[_Journal, int],
        flushes: dict[_Journal, asyncio.Future[None]],
    ) -> None:
        """Why these journals failed their check: a lost lease, or their own earlier write."""
        try:
            rows = await self._log._fetch(sql.SAGA_STATES, [j.saga_id for j in failed])
        except BackendError as error:
            for journal in failed:
                _fail(flushes[journal], _copy(error))
            return
        states = {row["saga_id"]: row for row in rows}
        for journal in failed:
            row = states.get(journal.saga_id)
            future = flushes[journal]
            if row is None:
                journal.lost = "the saga is no longer in the log"
            elif row["epoch"] != journal.epoch:
                journal.lost = f"claimed by another worker (epoch {row['epoch']})"
            else:
                landed = row["version"] - journal.durable_version
                if journal.uncertain and 0 < landed <= sizes[journal]:
                    # The cut-off batch did commit: those records are ours, in place.
                    _advance(journal, landed)
                    _done(future, None)
                    continue
                if SagaStatus(row["status"]).is_final:
                    journal.lost = "the saga is finished"
                else:
                    journal.lost = (
                        f"the log holds {row['version']} records, "
                        f"this journal expected {journal.durable_version}"
                    )
            _fail(future, journal._lease_lost(journal.lost))


def _advance(journal: _Journal, n: int) -> None:
    journal.durable_version += n
    pending = journal.pending
    del pending.rows[:n]
    del pending.status[:n]
    journal.uncertain = False
    if journal.final_staged and not pending.rows:
        journal.lost = "the saga is finished"


def _batch_arguments(creates: list[_Create], sizes: dict[_Journal, int]) -> list[Any]:
    c_ids, c_sagas, c_status, c_versions, c_owners, c_ttls = [], [], [], [], [], []
    r_ids: list[str] = []
    r_seqs: list[int] = []
    r_kinds: list[str] = []
    r_versions: list[int] = []
    r_payloads: list[str] = []

    def records(saga_id: str, first: int, rows: Sequence[tuple[str, int, str]]) -> None:
        for offset, (kind, version, payload) in enumerate(rows):
            r_ids.append(saga_id)
            r_seqs.append(first + offset)
            r_kinds.append(kind)
            r_versions.append(version)
            r_payloads.append(payload)

    for op in creates:
        c_ids.append(op.saga_id)
        c_sagas.append(op.saga)
        c_status.append(str(op.status))
        c_versions.append(len(op.rows))
        c_owners.append(op.owner)
        c_ttls.append(op.ttl)
        records(op.saga_id, 0, op.rows)
    a_ids, a_epochs, a_expected, a_after, a_status = [], [], [], [], []
    # Saga order: concurrent batches lock rows in the same order, so never deadlock.
    for journal in sorted(sizes, key=lambda j: j.saga_id):
        n = sizes[journal]
        status = _status_of(journal.pending.status[:n])
        a_ids.append(journal.saga_id)
        a_epochs.append(journal.epoch)
        a_expected.append(journal.durable_version)
        a_after.append(journal.durable_version + n)
        a_status.append(None if status is None else str(status))
        records(journal.saga_id, journal.durable_version, journal.pending.rows[:n])
    return [
        *(c_ids, c_sagas, c_status, c_versions, c_owners, c_ttls),
        *(a_ids, a_epochs, a_expected, a_after, a_status),
        *(r_ids, r_seqs, r_kinds, r_versions, r_payloads),
    ]


def _done(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
        # Read here so that an abandoned future (its caller cancelled) is not reported.
        future.exception()


def _copy(error: BackendError) -> BackendError:
    """A fresh exception per waiter: one raised from many tasks would share a traceback."""
    fresh = type(error)(error.backend, str(error).removeprefix(f"{error.backend}: "))
    fresh.__cause__ = error.__cause__
    return fresh


# --- the log ----------------------------------------------------------------------------

_OPTIONS = {"pool_size": 10.0, "connect_timeout": 10.0, "command_timeout": 60.0}


class PostgresSagaLog:
    """A saga log in PostgreSQL; see the module docstring."""

    durable = True

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 10,
        connect_timeout: float = 10.0,
        command_timeout: float = 60.0,
    ) -> None:
        self._dsn = dsn
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: Any = None
        self._ready = False
        self._closed = False
        self._lock: asyncio.Lock | None = None
        self._committer = _Committer(self)
        self.stats = PostgresStats()

    @classmethod
    def from_url(cls, url: str) -> PostgresSagaLog:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        options = {k: v for k, v in query if k in _OPTIONS}
        rest = [(k, v) for k, v in query if k not in _OPTIONS]
        values: dict[str, float] = {}
        for name, raw in options.items():
            try:
                value = float(raw)
            except ValueError:
                value = -1.0
            if not 0 < value < 1e9 or (name == "pool_size" and value != int(value)):
                raise ConfigurationError(
                    f"saga log URL: {name} must be a positive number, got {raw!r}"
                )
            values[name] = value
        dsn = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(rest)))
        return cls(
            dsn,
            pool_size=int(values.get("pool_size", 10)),
            connect_timeout=values.get("connect_timeout", 10.0),
            command_timeout=values.get("command_timeout", 60.0),
        )

    # --- connections --------------------------------------------------------------------

    async def _open(self) -> Any:
        if self._closed:
            raise BackendUnavailable(BACKEND, "the saga log is closed")
        if self._ready:
            return self._pool
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._pool is None:
                try:
                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=0,
                        max_size=self._pool_size,
                        timeout=self._connect_timeout,
                        command_timeout=self._command_timeout,
                    )
                except _DRIVER_ERRORS as exc:
                    raise _translate(exc) from exc
                except ValueError as exc:  # a malformed DSN
                    raise ConfigurationError(f"saga log URL: {exc}") from exc
            if not self._ready:
                async with self._connection() as conn:
                    await self._ensure_schema(conn)
                self._ready = True
        return self._pool

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except _DRIVER_ERRORS as exc:
            raise _translate(exc) from exc

    async def _ensure_schema(self, conn: Any) -> None:
        self.stats.statements += 1
        found = await conn.fetchval(sql.SCHEMA_VERSION_EXISTS)
        if found is None:
            # Workers starting together: the first creates, the others wait and see it.
            # A session lock, and the check in a transaction begun after it: a check in
            # the locking transaction may not see the catalog change committed meanwhile.
            self.stats.statements += 3
            await conn.execute(sql.SCHEMA_LOCK)
            try:
                found = await conn.fetchval(sql.SCHEMA_VERSION_EXISTS)
                if found is None:
                    self.stats.statements += 1
                    async with conn.transaction():
                        await conn.execute(sql.SCHEMA)
                    self.stats.commits += 1
            finally:
                await conn.execute(sql.SCHEMA_UNLOCK)
        self.stats.statements += 1
        version = await conn.fetchval(sql.SCHEMA_VERSION)
        if version is None or version > sql.VERSION:
            raise SchemaMismatch(
                BACKEND,
                f"the database's sagakit schema is version {version}; "
                f"this sagakit knows up to {sql.VERSION}: upgrade sagakit",
            )

    async def _fetch(self, query: str, *args: Any) -> list[Any]:
        """A read; tried once more when a pooled connection turns out dead (server restarted)."""
        await self._open()
        for attempt in (1, 2):
            try:
                async with self._connection() as conn:
                    self.stats.statements += 1
                    rows: list[Any] = await conn.fetch(query, *args)
                    return rows
            except BackendUnavailable:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _write(self, query: str, *args: Any) -> list[Any]:
        """A one-statement write (a claim, a renewal): never retried blindly."""
        await self._open()
        async with self._connection() as conn:
            self.stats.statements += 1
            rows: list[Any] = await conn.fetch(query, *args)
            self.stats.commits += 1
            return rows

    async def _execute_batch(self, args: list[Any], operations: int) -> list[Any]:
        rows = await self._write(sql.BATCH, *args)
        self.stats.batches += 1
        self.stats.flushes += operations
        return rows

    # --- writing ------------------------------------------------------------------------

    async def create(
        self,
        saga_id: str,
        opening: Sequence[SagaRecord],
        *,
        owner: str | None,
        ttl: float,
    ) -> _Journal | None:
        started = opening[0] if opening else None
        if not isinstance(started, SagaStarted):
            raise ValueError(f"a saga's log opens with SagaStarted, not {started!r}")
        rows = [_encode(saga_id, record) for record in opening]
        status = _status_of([status_after(record) for record in opening]) or SagaStatus.RUNNING
        await self._open()
        op = _Create(saga_id, started.saga, rows, status)
        op.owner, op.ttl = owner, float(ttl)
        created, expires_at = await asyncio.shield(self._committer.create(op))
        if not created:
            return None
        epoch = 0 if owner is None else 1
        lease = None if owner is None or expires_at is None else Lease(owner, 1, expires_at)
        journal = _Journal(self, saga_id, epoch, len(rows), lease)
        if status.is_final:
            journal.lost = "the saga is finished"
        return journal

    # --- leases -------------------------------------------------------------------------

    async def claim(self, saga_id: str, *, owner: str, ttl: float) -> Claim | None:
        rows = await self._write(sql.CLAIM, saga_id, owner, float(ttl))
        if not rows:
            return None
        claims = await self._claims(owner, rows)
        return claims[0]

    async def claim_next(self, *, owner: str, ttl: float, limit: int) -> list[Claim]:
        if limit <= 0:
            return []
        rows = await self._write(sql.CLAIM_NEXT, owner, float(ttl), int(limit))
        return await self._claims(owner, sorted(rows, key=lambda row: row["id"]))

    async def _claims(self, owner: str, rows: list[Any]) -> list[Claim]:
        # Read after the claim committed: any write of an older epoch is in, or refused.
        found = await self._fetch(sql.READ_MANY, [row["saga_id"] for row in rows])
        records: dict[str, list[SagaRecord]] = {row["saga_id"]: [] for row in rows}
        for record in found:
            records[record["saga_id"]].append(
                decode_record(record["kind"], record["version"], record["payload"])
            )
        claims = []
        for row in rows:
            saga_id = row["saga_id"]
            lease = Lease(owner, row["epoch"], row["expires_at"])
            journal = _Journal(self, saga_id, row["epoch"], len(records[saga_id]), lease)
            claims.append(Claim(records[saga_id], journal))
        return claims

    def _mine(self, journal: object) -> _Journal:
        if not isinstance(journal, _Journal) or journal._log is not self:
            raise TypeError(f"not a journal of this log: {journal!r}")
        return journal

    async def renew(self, journals: Sequence[object], *, ttl: float) -> list[str]:
        mine = sorted((self._mine(j) for j in journals), key=lambda j: j.saga_id)
        if not mine:
            return []
        rows = await self._write(
            sql.RENEW, [j.saga_id for j in mine], [j.epoch for j in mine], float(ttl)
        )
        renewed = {row["saga_id"]: row["expires_at"] for row in rows}
        lost = []
        for journal in mine:
            expires_at = renewed.get(journal.saga_id)
            if expires_at is None:
                lost.append(journal.saga_id)
            elif journal.lease is not None:
                journal.lease = journal.lease._replace(expires_at=expires_at)
        return lost

    async def release(self, journal: object) -> None:
        mine = self._mine(journal)
        await self._write(sql.RELEASE, mine.saga_id, mine.epoch)

    # --- reading ------------------------------------------------------------------------

    async def read(self, saga_id: str) -> list[SagaRecord]:
        rows = await self._fetch(sql.READ, saga_id)
        return [decode_record(row["kind"], row["version"], row["payload"]) for row in rows]

    async def history(self, saga_id: str) -> list[LoggedRecord]:
        rows = await self._fetch(sql.HISTORY, saga_id)
        return [
            LoggedRecord(
                row["seq"],
                decode_record(row["kind"], row["version"], row["payload"]),
                row["recorded_at"],
            )
            for row in rows
        ]

    async def status(self, saga_id: str) -> SagaSummary | None:
        rows = await self._fetch(sql.STATUS, saga_id)
        return _summary(rows[0]) if rows else None

    async def list(
        self, *, status: SagaStatus | Sequence[SagaStatus] | None = None, limit: int = 100
    ) -> list[SagaSummary]:
        if limit <= 0:
            return []
        if status is None:
            rows = await self._fetch(sql.LIST, int(limit))
        else:
            wanted = [status] if isinstance(status, str) else list(status)
            rows = await self._fetch(
                sql.LIST_STATUS, [str(SagaStatus(s)) for s in wanted], int(limit)
            )
        return [_summary(row) for row in rows]

    async def close(self) -> None:
        if self._closed:
            return
        await self._committer.drain()
        self._closed = True
        if self._pool is not None:
            with contextlib.suppress(*_DRIVER_ERRORS):
                await asyncio.wait_for(self._pool.close(), 10)
            self._pool = None


def _summary(row: Any) -> SagaSummary:
    return SagaSummary(
        row["saga_id"],
        row["saga"],
        SagaStatus(row["status"]),
        row["version"],
        row["owner"],
        row["expires_at"],
        row["created_at"],
        row["updated_at"],
    )


from_url = PostgresSagaLog.from_url  # the registry's entry point (adapters/__init__.py)

if TYPE_CHECKING:  # the port, checked by mypy
    _port: SagaLog = PostgresSagaLog("postgresql://")
