"""The in-memory saga log: the whole :class:`~sagakit.ports.saga_log.SagaLog` port, gone
with the process.

``memory://`` opens one; ``memory://?max_finished=N`` sets how many finished
sagas it keeps (default 100,000). When a saga finishes beyond that number, the
oldest finished saga is forgotten: its id is unknown again, so running that id
again runs a new saga, and ``status``/``read`` know nothing of it. Running
sagas are never evicted. So a long-running process on the default cannot grow
without bound.

It is not durable: ``stage`` writes at once (checking the journal's epoch
first, and raising :class:`~sagakit.errors.LeaseLost` without writing when
another worker claimed the saga), and ``flush`` has nothing left to do.
Records are kept as objects, not serialised, but the values in them follow the
rule of every backend: a saga's input and its steps' results must be JSON
values (:class:`~sagakit.errors.SagaError` otherwise), so code that works here
works on a durable log.

Leases are measured on ``clock`` (default :func:`time.time`; tests pass their own).
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from sagakit.core.records import (
    CompensationStarted,
    SagaFinished,
    SagaRecord,
    SagaStarted,
    SagaStatus,
    StepCompleted,
    StepFailed,
    check_json,
)
from sagakit.errors import ConfigurationError, LeaseLost, SagaError
from sagakit.ports.saga_log import Claim, Lease, LoggedRecord, SagaLog, SagaSummary

__all__ = ["DEFAULT_MAX_FINISHED", "InMemorySagaLog"]

DEFAULT_MAX_FINISHED = 100_000
# Results shared between finished sagas when equal (hashable scalars), and how many
# distinct records and logs are shared at most before the tables start over.
_SHAREABLE = frozenset({type(None), str, int})  # not bool: True == 1
_MAX_SHARED = 65_536

_RUNNING = SagaStatus.RUNNING
# The status a record of each kind leaves a saga in (SagaFinished: its own).
_STATUS_OF: dict[type[Any], SagaStatus] = {
    SagaStarted: SagaStatus.RUNNING,
    StepFailed: SagaStatus.COMPENSATING,
    CompensationStarted: SagaStatus.COMPENSATING,
}


class _Saga:
    """One saga's log and lease."""

    __slots__ = (
        "created_at",
        "epoch",
        "expires_at",
        "final",
        "owner",
        "records",
        "saga_id",
        "stamps",
        "started",
        "status",
        "updated_at",
    )

    def __init__(self, saga_id: str, started: SagaStarted, now: float) -> None:
        self.saga_id = saga_id
        self.started = started
        self.records: list[SagaRecord] = []
        # When each record was written; one float object shared by a batch.
        self.stamps: list[float] = []
        self.status = _RUNNING
        self.final = False
        self.owner: str | None = None
        self.epoch = 0
        self.expires_at = 0.0
        self.created_at = self.updated_at = now


class _Journal:
    """Writes one saga's records under one epoch."""

    __slots__ = ("_entry", "_epoch", "_log", "_owner", "saga_id")

    def __init__(self, log: InMemorySagaLog, entry: _Saga, owner: str | None) -> None:
        self._log = log
        self._entry = entry
        self._epoch = entry.epoch
        self._owner = owner
        self.saga_id = entry.saga_id

    @property
    def lease(self) -> Lease | None:
        if self._owner is None:
            return None
        entry = self._entry
        expires_at = entry.expires_at if entry.epoch == self._epoch else 0.0
        return Lease(self._owner, self._epoch, expires_at)

    @property
    def version(self) -> int:
        return len(self._entry.records)

    def stage(self, records: Sequence[SagaRecord]) -> None:
        entry = self._entry
        if entry.epoch != self._epoch or entry.final:
            detail = "the saga is finished" if entry.final else "claimed by another"
            raise LeaseLost(self.saga_id, self._owner or "(no owner)", self._epoch, detail)
        if records:
            self._log._append(entry, records)

    async def flush(self) -> None:
        return None  # stage wrote already


def _check_result(entry: _Saga, record: StepCompleted) -> None:
    try:
        check_json(record.result)
    except (TypeError, ValueError) as exc:
        steps = entry.started.steps
        step = steps[record.step] if 0 <= record.step < len(steps) else str(record.step)
        raise SagaError(
            entry.saga_id, f"the result of step {step!r} is not a JSON value: {exc}", step=step
        ) from exc


class InMemorySagaLog:
    """A saga log held in dicts; see the module docstring."""

    durable = False

    def __init__(
        self, *, max_finished: int = DEFAULT_MAX_FINISHED, clock: Callable[[], float] = time.time
    ) -> None:
        if type(max_finished) is not int or max_finished < 0:
            raise ConfigurationError(
                f"max_finished must be a whole number >= 0, got {max_finished!r}"
            )
        self.max_finished = max_finished
        self._clock = clock
        # Every saga kept, in the order they were created.
        self._sagas: dict[str, _Saga] = {}
        # Unfinished sagas, oldest first (claim_next's queue), and finished
        # ones in the order they finished (the eviction order).
        self._unfinished: dict[str, _Saga] = {}
        self._finished: dict[str, None] = {}
        self._shared_records: dict[Any, SagaRecord] = {}
        self._shared_logs: dict[tuple[int, ...], tuple[SagaRecord, ...]] = {}

    @classmethod
    def from_url(cls, url: str) -> InMemorySagaLog:
        parts = urlsplit(url)
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = set(options) - {"max_finished"}
        if unknown or parts.netloc or parts.path not in ("", "/"):
            raise ConfigurationError(
                f"saga log URL {url!r}: memory:// takes only ?max_finished=N"
                + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else "")
            )
        raw = options.get("max_finished")
        if raw is None:
            return cls()
        try:
            max_finished = int(raw)
        except ValueError:
            max_finished = -1
        if max_finished < 0:
            raise ConfigurationError(
                f"saga log URL {url!r}: max_finished must be a whole number >= 0, got {raw!r}"
            )
        return cls(max_finished=max_finished)

    # --- writing ---------------------------------------------------------------------

    async def create(
        self,
        saga_id: str,
        opening: Sequence[SagaRecord],
        *,
        owner: str | None,
        ttl: float,
    ) -> _Journal | None:
        return self.create_now(saga_id, opening, owner=owner, ttl=ttl)

    def create_now(
        self,
        saga_id: str,
        opening: Sequence[SagaRecord],
        *,
        owner: str | None,
        ttl: float,
    ) -> _Journal | None:
        """:meth:`create`, done at once (what the orchestrator's in-memory fast path calls)."""
        sagas = self._sagas
        if saga_id in sagas:
            return None
        started = opening[0] if opening else None
        if type(started) is not SagaStarted:
            raise ValueError(f"a saga's log opens with SagaStarted, not {started!r}")
        data = started.data
        if data:
            try:
                check_json(data if type(data) is dict else dict(data))
            except (TypeError, ValueError) as exc:
                raise SagaError(saga_id, f"its input is not a JSON value: {exc}") from exc
        now = self._clock()
        entry = sagas[saga_id] = _Saga(saga_id, started, now)
        if owner is not None:
            entry.owner, entry.epoch, entry.expires_at = owner, 1, now + ttl
        self._unfinished[saga_id] = entry
        journal = _Journal(self, entry, owner)
        try:
            self._append(entry, opening)
        except BaseException:
            del sagas[saga_id], self._unfinished[saga_id]
            raise
        return journal

    def _append(self, entry: _Saga, records: Sequence[SagaRecord]) -> None:
        status = None
        for record in records:  # checked whole before any is written
            kind = type(record)
            if kind is StepCompleted:
                if record.result is not None:  # type: ignore[union-attr]
                    _check_result(entry, record)  # type: ignore[arg-type]
            elif kind in _STATUS_OF:
                status = _STATUS_OF[kind]
            elif kind is SagaFinished:
                status = record[0]  # type: ignore[assignment]
        now = self._clock()
        entry.records += records
        # One stamp per record, all of a batch the same float object.
        entry.stamps += [now] * len(records)
        entry.updated_at = now
        if status is not None:
            entry.status = status
            if status.is_final:
                self._finish(entry)

    def _finish(self, entry: _Saga) -> None:
        entry.records = self._kept(entry.records)  # type: ignore[assignment]
        entry.stamps = array("d", entry.stamps)  # type: ignore[assignment]
        entry.final = True
        entry.owner, entry.expires_at = None, 0.0
        saga_id = entry.saga_id
        self._unfinished.pop(saga_id, None)
        finished = self._finished
        finished[saga_id] = None
        while len(finished) > self.max_finished:
            oldest = next(iter(finished))
            del finished[oldest]
            del self._sagas[oldest]

    def _kept(self, records: list[SagaRecord]) -> tuple[SagaRecord, ...]:
        """A finished saga's records as this log keeps them: records equal to ones kept
        before are shared, and so is a whole log equal to one kept before.

        A finished saga's records never change, and most are like other sagas'
        (the same step started, completed with no result, compensated). Kept
        once, they cost the process's memory and its cyclic collector nothing
        per saga, where each kept saga otherwise adds a dozen objects the
        collector rescans (a long-running node keeps up to ``max_finished``).
        """
        shared = self._shared_records
        if len(shared) > _MAX_SHARED:
            shared.clear()
            self._shared_logs.clear()
        kept: list[SagaRecord] = []
        whole = True
        for record in records:
            kind = type(record)
            key: Any
            if kind is SagaStarted:
                if record.data:  # type: ignore[union-attr]
                    kept.append(record)
                    whole = False
                    continue
                key = (SagaStarted, record.saga, record.steps)  # type: ignore[union-attr]
            elif kind is StepCompleted and type(record.result) not in _SHAREABLE:  # type: ignore[union-attr]
                kept.append(record)
                whole = False
                continue
            else:
                # A plain tuple with the kind first: hashed and compared in C (a
                # record's own __eq__, which checks its kind, is Python).
                key = (kind, *record)
            kept.append(shared.setdefault(key, record))
        log = tuple(kept)
        if not whole:
            return log
        # The records are shared objects now: their ids name the log.
        return self._shared_logs.setdefault(tuple(map(id, log)), log)

    # --- leases ----------------------------------------------------------------------

    def _take(self, entry: _Saga, owner: str, ttl: float, now: float) -> Claim:
        entry.epoch += 1
        entry.owner, entry.expires_at = owner, now + ttl
        return Claim(list(entry.records), _Journal(self, entry, owner))

    async def claim(self, saga_id: str, *, owner: str, ttl: float) -> Claim | None:
        entry = self._unfinished.get(saga_id)
        if entry is None:
            return None
        now = self._clock()
        if entry.owner is not None and entry.owner != owner and entry.expires_at > now:
            return None
        return self._take(entry, owner, ttl, now)

    async def claim_next(self, *, owner: str, ttl: float, limit: int) -> list[Claim]:
        now = self._clock()
        free = [
            entry
            for entry in self._unfinished.values()
            if entry.owner is None or entry.expires_at <= now
        ][: max(limit, 0)]
        return [self._take(entry, owner, ttl, now) for entry in free]

    async def renew(self, journals: Sequence[object], *, ttl: float) -> list[str]:
        now = self._clock()
        lost = []
        for journal in journals:
            if not isinstance(journal, _Journal) or journal._log is not self:
                raise TypeError(f"not a journal of this log: {journal!r}")
            entry = journal._entry
            if entry.epoch != journal._epoch or entry.final or entry.owner is None:
                lost.append(journal.saga_id)
                continue
            entry.expires_at = now + ttl
        return lost

    async def release(self, journal: object) -> None:
        if not isinstance(journal, _Journal):
            raise TypeError(f"not a journal of this log: {journal!r}")
        entry = journal._entry
        if entry.epoch == journal._epoch and not entry.final:
            entry.owner, entry.expires_at = None, 0.0

    # --- reading ---------------------------------------------------------------------

    async def read(self, saga_id: str) -> list[SagaRecord]:
        entry = self._sagas.get(saga_id)
        return [] if entry is None else list(entry.records)

    def read_now(self, saga_id: str) -> list[SagaRecord] | None:
        """The saga's records at once (the list kept: do not change it), None when unknown."""
        entry = self._sagas.get(saga_id)
        return None if entry is None else entry.records

    async def history(self, saga_id: str) -> list[LoggedRecord]:
        entry = self._sagas.get(saga_id)
        if entry is None:
            return []
        return [
            LoggedRecord(seq, record, stamp)
            for seq, (record, stamp) in enumerate(zip(entry.records, entry.stamps, strict=True))
        ]

    def _summary(self, entry: _Saga) -> SagaSummary:
        live = entry.owner is not None
        return SagaSummary(
            entry.saga_id,
            entry.started.saga,
            entry.status,
            len(entry.records),
            entry.owner if live else None,
            entry.expires_at if live else None,
            entry.created_at,
            entry.updated_at,
        )

    async def status(self, saga_id: str) -> SagaSummary | None:
        entry = self._sagas.get(saga_id)
        return None if entry is None else self._summary(entry)

    async def list(
        self, *, status: SagaStatus | Sequence[SagaStatus] | None = None, limit: int = 100
    ) -> list[SagaSummary]:
        wanted: frozenset[SagaStatus] | None
        if status is None:
            wanted = None
        elif isinstance(status, SagaStatus):
            wanted = frozenset({status})
        else:
            wanted = frozenset(SagaStatus(s) for s in status)
        found: list[SagaSummary] = []
        if limit <= 0:
            return found
        for entry in reversed(self._sagas.values()):
            if wanted is None or entry.status in wanted:
                found.append(self._summary(entry))
                if len(found) >= limit:
                    break
        return found

    async def close(self) -> None:
        # Nothing to release; the records stay readable, as a closed file's data would.
        return None


if TYPE_CHECKING:  # the port, checked by mypy
    _port: SagaLog = InMemorySagaLog()
