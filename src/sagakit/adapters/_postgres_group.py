"""Journals and group commit for the PostgreSQL saga log (:mod:`sagakit.adapters.postgres_log`).

Flushes and creates wait in one queue per log; a batch takes everything queued
(one operation per saga, up to MAX_BATCH of them and MAX_BATCH_BYTES of records)
and writes it as one statement, so one commit. While that batch commits, the next
one gathers (``batches_in_flight`` batches may run at once; one by default).
Also what the log makes of its rows: summaries, the leases a claim took.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sagakit.core.records import (
    OfItsKind,
    SagaRecord,
    SagaStarted,
    SagaStatus,
    encode_record,
    status_after,
)
from sagakit.errors import (
    BackendBusy,
    BackendError,
    BackendUnavailable,
    DefinitionError,
    LeaseLost,
    SagaError,
    SchemaMismatch,
)
from sagakit.ports.saga_log import Claim, Lease, SagaSummary

from . import _postgres_sql as sql
from ._postgres_errors import BACKEND

if TYPE_CHECKING:
    from .postgres_log import PostgresSagaLog

__all__ = [
    "Committer",
    "Create",
    "PostgresJournal",
    "encode",
    "leases_of",
    "own_creation",
    "status_of",
    "summary",
]

MAX_BATCH = 512  # operations per group commit: bounded statements, bounded memory
# A statement carries at most 1 GB (the server cuts the connection otherwise): a batch
# stops taking operations past this many characters of payload (4 bytes each at most).
MAX_BATCH_BYTES = 64 * 2**20
MAX_RECORD_BYTES = 1_000_000_000  # one record's JSON, as on SQLite: no statement takes more
BUSY_RETRIES = 3  # a batch that hit a deadlock or serialization failure is tried again
# One: measured against two on this project's machine (2 cores, local server), two
# gave no gain and 1.7x the commits; sagas in step move in lockstep, so a second
# batch finds nothing to take. A server across a network may want more (the
# ``batches_in_flight`` URL option).
BATCHES_IN_FLIGHT = 1

Row = tuple[str, int, str]  # (kind, schema version, JSON payload)


def encode(saga_id: str, record: SagaRecord) -> Row:
    """The row for ``record``; SagaError when a value in it is not JSON."""
    if not isinstance(record, OfItsKind):
        raise DefinitionError("records", f"must be saga records, not {record!r:.100}")
    try:
        kind, version, payload = encode_record(record)
    except (TypeError, ValueError) as exc:
        if isinstance(record, SagaStarted):
            raise SagaError(saga_id, f"its input is not a JSON value: {exc}") from exc
        step = getattr(record, "step", None)
        raise SagaError(
            saga_id, f"the result of step {step} is not a JSON value: {exc}", step=str(step)
        ) from exc
    if len(payload) > MAX_RECORD_BYTES:
        step = getattr(record, "step", None)
        what = "its input" if isinstance(record, SagaStarted) else f"{record.KIND} of step {step}"
        raise SagaError(
            saga_id, f"{what} is {len(payload):,} bytes of JSON: at most {MAX_RECORD_BYTES:,}"
        )
    return kind, version, payload.decode()


def status_of(statuses: Sequence[SagaStatus | None]) -> SagaStatus | None:
    """The saga's status after these records, None when none of them changes it."""
    for status in reversed(statuses):
        if status is not None:
            return status
    return None


class PostgresJournal:
    """Writes one saga's records under one epoch; see the port."""

    def __init__(
        self, log: PostgresSagaLog, saga_id: str, epoch: int, version: int, lease: Lease | None
    ) -> None:
        self.log = log
        self.saga_id = saga_id
        self.epoch = epoch
        self.lease = lease
        self.durable_version = version
        # Staged, encoded at once (a value that is not JSON fails ``stage``, not a batch).
        self.rows: list[Row] = []
        self.statuses: list[SagaStatus | None] = []  # the status after each row, if changed
        self.lost: str | None = None  # why this journal may not write any more
        self.final_staged = False
        # The last batch carrying this journal was cut off: it may have committed.
        self.uncertain = False

    @property
    def version(self) -> int:
        return self.durable_version + len(self.rows)

    def lease_lost(self, detail: str) -> LeaseLost:
        owner = self.lease.owner if self.lease is not None else "(no owner)"
        return LeaseLost(self.saga_id, owner, self.epoch, detail)

    def stage(self, records: Sequence[SagaRecord]) -> None:
        if self.lost is not None:
            raise self.lease_lost(self.lost)
        if self.final_staged:
            raise self.lease_lost("the saga is finished")
        encoded = [encode(self.saga_id, record) for record in records]
        self.rows += encoded
        for record in records:
            status = status_after(record)
            self.statuses.append(status)
            if status is not None and status.is_final:
                self.final_staged = True

    async def flush(self) -> None:
        while self.rows:
            if self.lost is not None:
                raise self.lease_lost(self.lost)
            # Shielded: a cancelled caller stops waiting, the batch goes on.
            await asyncio.shield(self.log._committer.flush(self))

    def advance(self, n: int) -> None:
        """The first ``n`` staged rows are durable."""
        self.durable_version += n
        del self.rows[:n]
        del self.statuses[:n]
        self.uncertain = False
        if self.final_staged and not self.rows:
            self.lost = "the saga is finished"


class Create:
    """A new saga waiting for a batch."""

    __slots__ = ("future", "owner", "rows", "saga", "saga_id", "status", "ttl")

    def __init__(
        self,
        saga_id: str,
        saga: str,
        rows: list[Row],
        status: SagaStatus,
        owner: str | None,
        ttl: float,
    ) -> None:
        self.saga_id = saga_id
        self.saga = saga
        self.rows = rows
        self.status = status
        self.owner = owner
        self.ttl = ttl
        # (created, lease expiry): not created when the saga id is taken.
        self.future: asyncio.Future[tuple[bool, float | None]] = (
            asyncio.get_running_loop().create_future()
        )


async def own_creation(log: PostgresSagaLog, op: Create) -> PostgresJournal | None:
    """The journal ``op`` would have given, when the saga the log holds is the one ``op``
    wrote in a batch whose reply was lost (its retry then finds the saga there); else None.

    With an owner: still leased to it under the first epoch, nothing written since, and
    the same opening records. Another worker's saga cannot pass for it: no other holds
    epoch 1 under this owner's name. Without one (recorded for any worker), the opening
    records alone say it: a worker may have claimed it and gone on since.
    """
    found = await log._fetch(sql.CREATED, op.saga_id)
    if not found or found[0]["saga"] != op.saga:
        return None
    row = found[0]
    if op.owner is not None:
        owner = None if op.status.is_final else op.owner
        state = (row["owner"], row["epoch"], row["version"], row["status"])
        if state != (owner, 1, len(op.rows), str(op.status)):
            return None
    elif row["version"] < len(op.rows):
        return None
    written = await log._fetch(sql.OPENING, op.saga_id, len(op.rows))
    if [(r["kind"], r["version"], r["payload"]) for r in written] != op.rows:
        return None
    if op.owner is None:
        return PostgresJournal(log, op.saga_id, 0, len(op.rows), None)
    lease = None if row["expires_at"] is None else Lease(op.owner, 1, row["expires_at"])
    journal = PostgresJournal(log, op.saga_id, 1, len(op.rows), lease)
    if op.status.is_final:
        journal.lost = "the saga is finished"
    return journal


Flushes = dict[PostgresJournal, "asyncio.Future[None]"]


class Committer:
    """Gathers creates and flushes into batches, each one statement; up to
    ``in_flight`` batches at once (while one waits for the disk, the next executes)."""

    def __init__(self, log: PostgresSagaLog, in_flight: int = BATCHES_IN_FLIGHT) -> None:
        self._log = log
        self._in_flight = in_flight
        self._creates: list[Create] = []
        self._flushes: Flushes = {}
        self._running: set[asyncio.Task[None]] = set()
        self._busy: set[str] = set()  # sagas in a batch in flight: the next waits its turn
        self._scheduled = False

    def _kick(self) -> None:
        self._log._check_loop()
        if not self._scheduled:
            # On the next turn of the loop: what is submitted in this one joins the batch.
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._launch)

    def _launch(self) -> None:
        self._scheduled = False
        loop = asyncio.get_running_loop()
        while len(self._running) < self._in_flight and (self._creates or self._flushes):
            creates, flushes = self._take()
            if not creates and not flushes:
                return  # all that waits is for sagas already in flight
            task = loop.create_task(self._batch(creates, flushes))
            self._running.add(task)

    def flush(self, journal: PostgresJournal) -> asyncio.Future[None]:
        future = self._flushes.get(journal)
        if future is None:
            future = self._flushes[journal] = asyncio.get_running_loop().create_future()
            self._kick()
        return future

    def create(self, op: Create) -> asyncio.Future[tuple[bool, float | None]]:
        self._creates.append(op)
        self._kick()
        return op.future

    async def drain(self) -> None:
        while self._running or self._creates or self._flushes:
            if self._running:
                await asyncio.wait(self._running)
            else:
                await asyncio.sleep(0)  # a launch is scheduled

    async def _batch(self, creates: list[Create], flushes: Flushes) -> None:
        ids = {op.saga_id for op in creates} | {journal.saga_id for journal in flushes}
        self._busy |= ids
        try:
            await self._commit(creates, flushes)
        except BaseException as exc:  # never leave a caller waiting for ever
            error = exc if isinstance(exc, Exception) else BackendUnavailable("postgresql", "")
            for op in creates:
                fail(op.future, error)
            for future in flushes.values():
                fail(future, error)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._busy -= ids
            self._running.discard(asyncio.current_task())
            if self._creates or self._flushes:
                self._kick()

    def _take(self) -> tuple[list[Create], Flushes]:
        """The next batch: at most one operation per saga, none for a saga in flight, and
        at most MAX_BATCH operations and MAX_BATCH_BYTES of payload (one, whatever its size)."""
        seen: set[str] = set()
        busy = self._busy
        size = 0

        def fits(saga_id: str, rows: list[Row]) -> bool:
            nonlocal size
            if saga_id in seen or saga_id in busy or len(seen) >= MAX_BATCH:
                return False
            more = sum(len(row[2]) for row in rows)
            if seen and size + more > MAX_BATCH_BYTES:
                return False
            seen.add(saga_id)
            size += more
            return True

        creates: list[Create] = []
        rest: list[Create] = []
        for op in self._creates:
            (creates if fits(op.saga_id, op.rows) else rest).append(op)
        self._creates = rest
        flushes: Flushes = {}
        for journal in list(self._flushes):
            if fits(journal.saga_id, journal.rows):
                flushes[journal] = self._flushes.pop(journal)
        return creates, flushes

    async def _commit(self, creates: list[Create], flushes: Flushes) -> None:
        sizes: dict[PostgresJournal, int] = {}
        for journal, future in list(flushes.items()):
            if journal.lost is not None:
                fail(future, journal.lease_lost(journal.lost))
                del flushes[journal]
            elif not journal.rows:
                done(future, None)
                del flushes[journal]
            else:
                sizes[journal] = len(journal.rows)
        if not creates and not sizes:
            return
        args = _arguments(creates, sizes)
        attempt = 0
        while True:
            attempt += 1
            try:
                rows = await self._log._execute_batch(args, len(creates) + len(sizes))
                break
            except BackendError as error:
                if isinstance(error, BackendBusy) and attempt < BUSY_RETRIES:
                    await asyncio.sleep(0.005 * attempt)
                    continue
                if not error.retryable and len(creates) + len(sizes) > 1:
                    # Bad data in one operation (which the checks at the boundary
                    # should have stopped) must not fail the others: one at a time.
                    for op in creates:
                        await self._commit([op], {})
                    for journal in sizes:
                        await self._commit([], {journal: flushes[journal]})
                    return
                for op in creates:
                    if isinstance(error, BackendUnavailable):  # it may have committed
                        self._log.reply_lost(op.saga_id)
                    fail(op.future, copy(error))
                for journal in sizes:
                    journal.uncertain = journal.uncertain or isinstance(error, BackendUnavailable)
                    fail(flushes[journal], copy(error))
                return
        written = {row["saga_id"]: row["expires_at"] for row in rows}
        for op in creates:
            done(op.future, (op.saga_id in written, written.get(op.saga_id)))
        failed: list[PostgresJournal] = []
        for journal, n in sizes.items():
            if journal.saga_id in written:
                journal.advance(n)
                done(flushes[journal], None)
            else:
                failed.append(journal)
        if failed:
            await self._settle(failed, sizes, flushes)

    async def _settle(
        self, failed: list[PostgresJournal], sizes: dict[PostgresJournal, int], flushes: Flushes
    ) -> None:
        """Why these journals failed their check: a lost lease, or their own earlier write."""
        try:
            rows = await self._log._fetch(sql.SAGA_STATES, [j.saga_id for j in failed])
        except BackendError as error:
            for journal in failed:
                fail(flushes[journal], copy(error))
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
                    journal.advance(landed)
                    done(future, None)
                    continue
                if SagaStatus(row["status"]).is_final:
                    journal.lost = "the saga is finished"
                else:
                    journal.lost = (
                        f"the log holds {row['version']} records, "
                        f"this journal expected {journal.durable_version}"
                    )
            fail(future, journal.lease_lost(journal.lost))


def _arguments(creates: list[Create], sizes: dict[PostgresJournal, int]) -> list[Any]:
    """The arrays of :data:`sql.BATCH`'s parameters."""
    c_ids, c_sagas, c_status, c_versions, c_owners, c_ttls = [], [], [], [], [], []
    r_ids: list[str] = []
    r_seqs: list[int] = []
    r_kinds: list[str] = []
    r_versions: list[int] = []
    r_payloads: list[str] = []

    def records(saga_id: str, first: int, rows: Sequence[Row]) -> None:
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
        status = status_of(journal.statuses[:n])
        a_ids.append(journal.saga_id)
        a_epochs.append(journal.epoch)
        a_expected.append(journal.durable_version)
        a_after.append(journal.durable_version + n)
        a_status.append(None if status is None else str(status))
        records(journal.saga_id, journal.durable_version, journal.rows[:n])
    return [
        *(c_ids, c_sagas, c_status, c_versions, c_owners, c_ttls),
        *(a_ids, a_epochs, a_expected, a_after, a_status),
        *(r_ids, r_seqs, r_kinds, r_versions, r_payloads),
    ]


def done(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
        # Read here so that an abandoned future (its caller cancelled) is not reported.
        future.exception()


def copy(error: BackendError) -> BackendError:
    """A fresh exception per waiter: one raised from many tasks would share a traceback."""
    fresh = type(error)(error.backend, str(error).removeprefix(f"{error.backend}: "))
    fresh.__cause__ = error.__cause__
    return fresh


def leases_of(claims: Claim | list[Claim] | None) -> list[tuple[str, int]]:
    if claims is None:
        return []
    taken = [claims] if isinstance(claims, Claim) else claims
    return [(c.journal.saga_id, c.journal.lease.epoch) for c in taken if c.journal.lease]


def summary(row: Any) -> SagaSummary:
    try:
        status = SagaStatus(row["status"])
    except ValueError:
        raise SchemaMismatch(
            BACKEND,
            f"saga {row['saga_id']!r} has status {row['status']!r}, unknown to this sagakit:"
            " written by a newer one, or edited by hand",
            saga_id=row["saga_id"],
        ) from None
    return SagaSummary(
        row["saga_id"],
        row["saga"],
        status,
        row["version"],
        row["owner"],
        row["expires_at"],
        row["created_at"],
        row["updated_at"],
    )
