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
PostgreSQL 15 and 18 on the same host; a script timing one-row INSERT commits
from 1 and 16 clients and 64-row ``unnest`` inserts through each driver's
pool). With ``synchronous_commit=off`` (the driver's own cost showing, not the
disk's) and 16 clients, asyncpg made 22,000 one-row commits/s against psycopg
3's 9,800; 64-row ``unnest`` inserts ran at 128,000 rows/s against 46,000 (its
binary array encoding, which the group commit relies on). With fsync on, one
client commits about 2,400/s with either: the disk, not the driver, is the
limit there, which group commit addresses.

Options in the URL's query, beside asyncpg's own: ``pool_size`` (connections,
default 10), ``connect_timeout`` and ``command_timeout`` (seconds, default 10
and 60), ``statement_cache_size`` (default 100; 0 behind a PgBouncer in
transaction mode older than 1.21), ``batches_in_flight`` (group commits under
way at once, default 1). Any other query parameter is a server
setting (asyncpg's rule), e.g. ``?search_path=sagas`` to keep the tables in a
schema of their own.

The schema (tables ``sagakit_sagas``, ``sagakit_records``,
``sagakit_schema_version``) is created on first use, under an advisory lock, so
that workers starting together create it once; a schema newer than this
sagakit is refused with :class:`~sagakit.errors.SchemaMismatch`. Payloads are
``json`` (not ``jsonb``): kept byte for byte, key order included, and ``\\u0000``
in a string is accepted, where ``jsonb`` rejects it.

Errors: connection lost or refused, server shutting down, starting or read-only
(a standby, a failover under way), timeouts become
:class:`~sagakit.errors.BackendUnavailable`; serialization failures, deadlocks
and lock timeouts :class:`~sagakit.errors.BackendBusy` (a batch is retried a
few times first); bad credentials, unknown database or missing privileges
:class:`~sagakit.errors.BackendRefused`; URL options the driver or the server
refuses :class:`~sagakit.errors.ConfigurationError`. The pool reconnects by itself: a log
whose server restarted works again without being reopened. A flush whose
commit was cut off (its outcome unknown) is settled on the next flush by
reading the saga's record count back, under the same epoch, so records are
never written twice and a worker does not mistake its own write for a lost
lease; a create cut off so is recognised on its retry (``own_creation``).

Bad input fails its own call, never a shared batch: saga ids and owners are
checked first (non-empty text without NUL, at most :data:`MAX_ID_BYTES` bytes
in UTF-8: a saga id is a primary key), and a batch that fails for its data all
the same is split up so that the others land. ``claim_next`` passes over a saga
whose records this sagakit cannot read (written by a newer one), logging it
once, and leaves it for a worker that can. A log belongs to the event loop that
first used it (its connections do).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg  # type: ignore[import-untyped]

from sagakit.core.records import (
    MAX_ID_BYTES,
    SagaRecord,
    SagaStarted,
    SagaStatus,
    check_id,
    decode_record,
    status_after,
    valid_id,
)
from sagakit.errors import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    DefinitionError,
    SchemaMismatch,
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

from . import _postgres_sql as sql
from ._handlers import forget
from ._options import count, seconds
from ._postgres_errors import BACKEND, DRIVER_ERRORS, misconfigured, translate
from ._postgres_group import (
    BATCHES_IN_FLIGHT,
    Committer,
    Create,
    PostgresJournal,
    encode,
    leases_of,
    own_creation,
    status_of,
    summary,
)
from ._postgres_schema import ensure_schema
from ._postgres_url import check_files, split_url

__all__ = ["MAX_ID_BYTES", "PostgresJournal", "PostgresSagaLog", "PostgresStats", "from_url"]

_T = TypeVar("_T")
_MAX_UNREADABLE = 1000  # sagas passed over by claim_next, remembered per log
_MAX_LOST_REPLIES = 1000  # creates whose reply was lost, remembered until retried
_logger = logging.getLogger(__name__)


@dataclass
class PostgresStats:
    """What the log sent to the server (for tests and benchmarks)."""

    statements: int = 0  # SQL statements executed
    commits: int = 0  # transactions that wrote
    batches: int = 0  # group commits
    flushes: int = 0  # journal flushes and creates those batches carried


async def _no_reset(conn: Any) -> None:
    return None


# --- checks at the boundary: bad input fails its own call, never a shared batch ------------


def _check_ttl(ttl: object) -> float:
    # The server's intervals reach 178,000,000 years; a lease need not.
    return min(check_ttl(ttl), 1e9)


def _check_limit(limit: object) -> int:
    return min(check_limit(limit), 2**31 - 1)


# --- the log ----------------------------------------------------------------------------


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
        statement_cache_size: int = 100,
        batches_in_flight: int = BATCHES_IN_FLIGHT,
    ) -> None:
        self._dsn = dsn
        self._statement_cache_size = count("statement_cache_size", statement_cache_size, least=0)
        self._pool_size = count("pool_size", pool_size, least=1)
        self._connect_timeout = seconds("connect_timeout", connect_timeout, zero=False)
        self._command_timeout = seconds("command_timeout", command_timeout, zero=False)
        batches_in_flight = count("batches_in_flight", batches_in_flight, least=1)
        self._pool: Any = None
        self._ready = False
        self._closed = False
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._committer = Committer(self, batches_in_flight)
        self._unreadable: set[str] = set()
        self._unhanded: dict[str, int] = {}  # leases of claims cut off: saga id -> epoch
        self._lost_replies: dict[str, bool] = {}  # creates whose outcome is unknown
        self._giving_back: set[asyncio.Task[Any]] = set()  # leases of callers gone
        self._abandoned: set[asyncio.Future[Any]] = set()  # work taking leases for them
        self.stats = PostgresStats()

    @classmethod
    def from_url(cls, url: str) -> PostgresSagaLog:
        dsn, values = split_url(url)
        return cls(
            dsn,
            pool_size=int(values.get("pool_size", 10)),
            connect_timeout=values.get("connect_timeout", 10.0),
            command_timeout=values.get("command_timeout", 60.0),
            statement_cache_size=int(values.get("statement_cache_size", 100)),
            batches_in_flight=int(values.get("batches_in_flight", BATCHES_IN_FLIGHT)),
        )

    # --- connections --------------------------------------------------------------------

    def _check_loop(self) -> None:
        """The pool's connections belong to one event loop: another would hang on them."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise ConfigurationError(
                "this PostgreSQL saga log was first used on another event loop; "
                "open one per loop (per asyncio.run)"
            )

    async def _open(self) -> None:
        if self._closed:
            # Not retryable: a caller retrying on a closed log would wait for ever.
            raise BackendError(BACKEND, "the saga log is closed")
        self._check_loop()
        if self._ready:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._pool is None:
                check_files(self._dsn)
                try:
                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=0,
                        max_size=self._pool_size,
                        timeout=self._connect_timeout,
                        command_timeout=self._command_timeout,
                        statement_cache_size=self._statement_cache_size,
                        # asyncpg resets a connection on release with one more round
                        # trip (RESET ALL, ...); this log sets no session state it keeps.
                        reset=_no_reset,
                    )
                except DRIVER_ERRORS as exc:
                    raise translate(exc, self._waited_to_connect()) from exc
                except ValueError as exc:  # a malformed DSN
                    raise ConfigurationError(f"saga log URL: {exc}") from exc
            if not self._ready:
                async with self._connection() as conn:
                    await ensure_schema(conn, self.stats)
                self._ready = True

    def _waited_to_connect(self) -> str:
        return f"connect_timeout={self._connect_timeout:g} s"

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        try:
            conn = await self._pool.acquire()  # connects, when no connection is idle
        except (*DRIVER_ERRORS, ValueError, OverflowError) as exc:
            raise (misconfigured(exc) or translate(exc, self._waited_to_connect())) from exc
        try:
            yield conn
        except DRIVER_ERRORS as exc:
            error = translate(exc, f"command_timeout={self._command_timeout:g} s")
            if isinstance(error, BackendUnavailable):
                # Cut off mid-operation: never hand it out again (already done when
                # asyncpg saw it close).
                with contextlib.suppress(Exception):
                    conn.terminate()
            raise error from exc
        finally:
            # A release that fails has terminated the connection (the pool makes a new
            # one); the statement's outcome stands.
            with contextlib.suppress(Exception):
                await self._pool.release(conn)

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
    ) -> PostgresJournal | None:
        check_id("saga_id", saga_id)
        if owner is not None:
            check_id("owner", owner)
        seconds = _check_ttl(ttl)
        started = opening[0] if opening else None
        if not isinstance(started, SagaStarted):
            raise DefinitionError(
                "opening", f"a saga's log opens with SagaStarted, not {started!r:.100}"
            )
        check_id("saga", started.saga)
        rows = [encode(saga_id, record) for record in opening]
        status = status_of([status_after(record) for record in opening]) or SagaStatus.RUNNING
        await self._open()
        op = Create(saga_id, started.saga, rows, status, owner, seconds)
        retried = self._lost_replies.pop(saga_id, False)
        done = self._committer.create(op)
        created, expires_at = await self._leasing(
            done, lambda made: [(saga_id, 1)] if made[0] and owner is not None else []
        )
        if not created:
            # Taken for a duplicate, its own earlier write would make start() say False
            # and run() take the saga for another worker's.
            return await own_creation(self, op) if retried else None
        epoch = 0 if owner is None else 1
        lease = None if owner is None or expires_at is None else Lease(owner, 1, expires_at)
        journal = PostgresJournal(self, saga_id, epoch, len(rows), lease)
        if status.is_final:
            journal.lost = "the saga is finished"
        return journal

    def reply_lost(self, saga_id: str) -> None:
        """A create of ``saga_id`` may have committed unseen: its retry checks (create)."""
        self._lost_replies[saga_id] = True
        if len(self._lost_replies) > _MAX_LOST_REPLIES:
            del self._lost_replies[next(iter(self._lost_replies))]

    # --- leases -------------------------------------------------------------------------

    async def claim(self, saga_id: str, *, owner: str, ttl: float) -> Claim | None:
        check_id("owner", owner)
        seconds = _check_ttl(ttl)
        if not valid_id(saga_id):
            return None  # no such saga can be in the log
        return await self._leasing(self._claim(saga_id, owner, seconds), leases_of)

    async def _claim(self, saga_id: str, owner: str, seconds: float) -> Claim | None:
        rows = await self._write(sql.CLAIM, saga_id, owner, seconds)
        if not rows:
            return None
        claims, unreadable = await self._claims(owner, rows)
        if unreadable:
            raise unreadable[0][1]
        return claims[0]

    async def claim_next(self, *, owner: str, ttl: float, limit: int) -> list[Claim]:
        check_id("owner", owner)
        seconds = _check_ttl(ttl)
        wanted = _check_limit(limit)
        return await self._leasing(self._claim_next(owner, seconds, wanted), leases_of)

    async def _claim_next(self, owner: str, seconds: float, wanted: int) -> list[Claim]:
        if self._unhanded:
            leases, self._unhanded = self._unhanded, {}
            try:  # under their epochs: one claimed again since is left alone
                await self._write(sql.RELEASE_MANY, list(leases), list(leases.values()))
            except BackendError:
                self._unhanded = leases | self._unhanded
                raise
        claims: list[Claim] = []
        # Those this call passed over too, remembered or not: else, past the cap, it
        # would take the same ones again and again.
        skip = set(self._unreadable)
        while len(claims) < wanted:
            rows = await self._write(
                sql.CLAIM_NEXT, owner, seconds, wanted - len(claims), list(skip)
            )
            got, unreadable = await self._claims(owner, sorted(rows, key=lambda r: r["id"]))
            claims += got
            if not unreadable:
                break
            # Left for a worker that can read them, and never again in this one's way.
            for saga_id, error in unreadable:
                skip.add(saga_id)
                if len(self._unreadable) < _MAX_UNREADABLE:
                    self._unreadable.add(saga_id)
                _logger.warning("saga %r passed over: %s", saga_id, error)
        return claims

    async def _claims(
        self, owner: str, rows: list[Any]
    ) -> tuple[list[Claim], list[tuple[str, SchemaMismatch]]]:
        """Journals for the sagas just claimed, and those whose log this sagakit cannot read
        (their leases given back at once)."""
        if not rows:
            return [], []
        # Read after the claim committed: any write of an older epoch is in, or refused.
        try:
            found = await self._fetch(sql.READ_MANY, [row["saga_id"] for row in rows])
        except BackendError:
            # Taken but never handed out: given back by the next claim_next, rather than
            # left to expire (the server is likely down now).
            for row in rows:
                if len(self._unhanded) < _MAX_UNREADABLE:
                    self._unhanded[row["saga_id"]] = row["epoch"]
            raise
        records: dict[str, list[SagaRecord]] = {row["saga_id"]: [] for row in rows}
        unreadable: dict[str, SchemaMismatch] = {}
        for row in found:
            saga_id = row["saga_id"]
            if saga_id in unreadable:
                continue
            try:
                records[saga_id].append(decode_record(row["kind"], row["version"], row["payload"]))
            except SchemaMismatch as exc:
                unreadable[saga_id] = exc
        claims = []
        for row in rows:
            saga_id = row["saga_id"]
            if saga_id in unreadable:
                await self._write(sql.RELEASE, saga_id, row["epoch"])
                continue
            lease = Lease(owner, row["epoch"], row["expires_at"])
            journal = PostgresJournal(self, saga_id, row["epoch"], len(records[saga_id]), lease)
            claims.append(Claim(records[saga_id], journal))
        return claims, list(unreadable.items())

    def _mine(self, journal: object) -> PostgresJournal:
        if not isinstance(journal, PostgresJournal) or journal.log is not self:
            raise TypeError(f"not a journal of this saga log: {journal!r}")
        return journal

    async def renew(self, journals: Sequence[object], *, ttl: float) -> list[str]:
        seconds = _check_ttl(ttl)
        mine = sorted((self._mine(j) for j in journals), key=lambda j: j.saga_id)
        if not mine:
            return []
        rows = await self._write(
            sql.RENEW, [j.saga_id for j in mine], [j.epoch for j in mine], seconds
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

    async def _leasing(
        self, work: Awaitable[_T], held: Callable[[_T], list[tuple[str, int]]]
    ) -> _T:
        """``work``, which takes leases that ``held`` names (saga id, epoch) in its result.

        A caller cancelled while it runs does not cancel it: a statement cut off in
        the server may have committed all the same, leasing sagas that nobody would
        drive until the leases expired. It goes on, and gives back what it took.
        """
        done = asyncio.ensure_future(work)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            self._abandoned.add(done)
            done.add_done_callback(lambda _: self._give_back(done, held))
            done.add_done_callback(self._abandoned.discard)
            raise

    def _give_back(
        self, done: asyncio.Future[_T], held: Callable[[_T], list[tuple[str, int]]]
    ) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        leases = held(done.result())
        if leases:
            ids, epochs = [saga_id for saga_id, _ in leases], [epoch for _, epoch in leases]
            task = asyncio.ensure_future(self._write(sql.RELEASE_MANY, ids, epochs))
            self._giving_back.add(task)
            task.add_done_callback(self._giving_back.discard)
            task.add_done_callback(forget)

    async def release(self, journal: object) -> None:
        mine = self._mine(journal)
        await self._write(sql.RELEASE, mine.saga_id, mine.epoch)

    # --- reading ------------------------------------------------------------------------

    async def read(self, saga_id: str) -> list[SagaRecord]:
        return [entry.record for entry in await self.history(saga_id)]

    async def history(self, saga_id: str) -> list[LoggedRecord]:
        if not valid_id(saga_id):
            return []
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
        if not valid_id(saga_id):
            return None
        rows = await self._fetch(sql.STATUS, saga_id)
        return summary(rows[0]) if rows else None

    async def list(
        self,
        *,
        status: SagaStatus | str | Sequence[SagaStatus | str] | None = None,
        limit: int = 100,
    ) -> list[SagaSummary]:
        wanted = _check_limit(limit)
        statuses = wanted_statuses(status)
        if wanted == 0 or statuses == []:
            return []
        if statuses is None:
            rows = await self._fetch(sql.LIST, wanted)
        else:
            rows = await self._fetch(sql.LIST_STATUS, statuses, wanted)
        listed = []
        for row in rows:
            try:
                listed.append(summary(row))
            except SchemaMismatch as exc:
                # One saga a listing cannot show must not hide the others (the
                # listing is how an operator finds what is wrong); status() raises.
                _logger.warning("not listed: %s", exc)
        return listed

    async def close(self) -> None:
        if self._closed:
            return
        await self._committer.drain()
        # Claims whose callers were cancelled (a worker stopping) still give their
        # leases back: through this pool, so before it closes. Bounded: a server
        # gone lets those leases expire instead.
        deadline = asyncio.get_running_loop().time() + 10
        while pending := self._abandoned | self._giving_back:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            await asyncio.wait(pending, timeout=left)
        self._closed = True
        if self._pool is not None:
            with contextlib.suppress(*DRIVER_ERRORS):
                await asyncio.wait_for(self._pool.close(), 10)
            self._pool = None


from_url = PostgresSagaLog.from_url  # the registry's entry point (adapters/__init__.py)

if TYPE_CHECKING:  # the port, checked by mypy
    _port: SagaLog = PostgresSagaLog("postgresql://")
