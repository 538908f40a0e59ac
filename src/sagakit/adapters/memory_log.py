"""The in-memory saga log: the whole :class:`~sagakit.ports.saga_log.SagaLog` port, gone
with the process.

``memory://`` opens one; ``memory://?max_finished=N`` sets how many finished
sagas it keeps (default 100,000), and ``max_records=M`` how much they may weigh
in all (default 1,000,000): a saga's weight is its records plus the steps its
definition names, the two things that grow with its steps. When a saga finishes
beyond either bound, the oldest finished sagas are forgotten until both hold:
a forgotten saga's id is unknown again, so running that id again runs a new
saga, and ``status``/``read`` know nothing of it. Running sagas are never
evicted. So a long-running process on the defaults cannot grow without bound,
however many steps its sagas have. A saga that alone weighs more than
``max_records`` is forgotten as soon as it finishes: running its id again runs
it again, as for any forgotten saga (the bound holds with no exception, and on
the default it takes over 300,000 steps to reach it).

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
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from sagakit.adapters import redact_url
from sagakit.adapters._options import count
from sagakit.core.records import (
    MAX_ID_BYTES,
    CompensationCompleted,
    CompensationFailed,
    CompensationStarted,
    SagaFinished,
    SagaRecord,
    SagaStarted,
    SagaStatus,
    StepCompleted,
    StepFailed,
    StepStarted,
    check_id,
    check_json,
)
from sagakit.errors import ConfigurationError, DefinitionError, LeaseLost, SagaError
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

__all__ = ["DEFAULT_MAX_FINISHED", "DEFAULT_MAX_RECORDS", "InMemorySagaLog"]

DEFAULT_MAX_FINISHED = 100_000
# About 1 GiB at worst, whatever the sagas. Measured with tracemalloc (kept bytes
# over weight, once the sagas finished): 46 bytes a unit for the node's benchmark
# saga (3 steps, weight 11; records shared between sagas), 70 to 110 for one saga
# of 200,000 short unique step names, and at most about 1,100 for steps named
# with 1,024 bytes (the longest name a log keeps) of a saga that failed at its
# first step, so that each step is one unit and its name all of its cost. So
# 50 to 110 MB on sagas like these, 1.1 GB at the very worst. (Sagas of three
# steps: 90,909 fit, so for sagas of more than two steps this is the bound
# that binds before max_finished.)
DEFAULT_MAX_RECORDS = 1_000_000
# Results shared between finished sagas when equal (hashable scalars), and how many
# distinct records and logs are shared at most before the tables start over.
_SHAREABLE = frozenset({type(None), str, int, bool})  # not float: 0.0 == -0.0
_MAX_SHARED = 65_536
# How many distinct plain batches are remembered (see _Journal.stage) before the
# table starts over: sagas of up to a few hundred steps fit.
_MAX_KNOWN = 4096
_NEW: Any = object()
# Kinds whose records are shared when equal, all fields hashable (an error's text).
_SHARE_BY_FIELDS = frozenset({StepFailed, CompensationFailed})

_RUNNING, _COMPENSATING = SagaStatus.RUNNING, SagaStatus.COMPENSATING
# The status a record of each kind leaves a saga in (SagaFinished: its own).
_STATUS_OF: dict[type[Any], SagaStatus] = {
    SagaStarted: SagaStatus.RUNNING,
    StepFailed: SagaStatus.COMPENSATING,
    CompensationStarted: SagaStatus.COMPENSATING,
}


class _Saga:
    """One saga's log and lease."""

    __slots__ = (
        "epoch",
        "expires_at",
        "final",
        "marks",
        "owner",
        "records",
        "saga_id",
        "started",
        "status",
    )

    def __init__(
        self,
        saga_id: str,
        started: SagaStarted,
        records: list[SagaRecord],
        now: float,
        owner: str | None,
        expires_at: float,
    ) -> None:
        self.saga_id = saga_id
        self.started = started
        self.records = records
        # When each batch of records was written: the saga's record count after
        # the batch, then the time, for each batch in turn. One stamp per batch,
        # not per record: the records of a batch are written at one time.
        self.marks: list[float] = [len(records), now]
        self.status = _RUNNING
        self.final = False
        # A saga created with an owner is leased to it, as epoch 1.
        self.owner = owner
        self.epoch = 0 if owner is None else 1
        self.expires_at = expires_at

    def stamps(self) -> list[float]:
        """The time each record was written."""
        stamps: list[float] = []
        marks = self.marks
        for i in range(0, len(marks), 2):
            stamps += [marks[i + 1]] * (int(marks[i]) - len(stamps))
        return stamps


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
        if not records:
            return
        log = self._log
        # A batch equal to one written before (most are: the state machine
        # shares the records of the common transitions) needs no checking again,
        # and what it does to the saga's status is known.
        try:
            status = log._known.get(records, _NEW)  # type: ignore[call-overload]
        except TypeError:  # a list, or a value that cannot be hashed
            status = _NEW
        if status is _NEW:
            records, status = log._checked(entry, records)
        now = log._clock()
        kept = entry.records
        kept += records
        entry.marks += (len(kept), now)
        if status is not None:
            entry.status = status
            if status is not _RUNNING and status is not _COMPENSATING:
                log._finish(entry)

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
        self,
        *,
        max_finished: int = DEFAULT_MAX_FINISHED,
        max_records: int = DEFAULT_MAX_RECORDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_finished = count("max_finished", max_finished, least=0)
        self.max_records = count("max_records", max_records, least=0)
        # The weight of the finished sagas kept: their records and their steps.
        self._weight = 0
        self._clock = clock
        # Every saga kept, in the order they were created.
        self._sagas: dict[str, _Saga] = {}
        # Unfinished sagas, oldest first (claim_next's queue), and finished
        # ones in the order they finished (the eviction order).
        self._unfinished: dict[str, _Saga] = {}
        # (A deque, not a dict: taking the oldest key of a dict whose front was
        # deleted scans every deleted slot, which made each eviction slower than
        # the last: 4 us per saga up to the cap, 13 us at twice the cap.)
        self._finished: deque[str] = deque()
        self._shared_records: dict[Any, SagaRecord] = {}
        self._openings: dict[tuple[str, tuple[str, ...]], SagaStarted] = {}
        # Batches written before that hold no value to check (no result, no
        # error, no input), and the status each leaves a saga in.
        self._known: dict[tuple[SagaRecord, ...], SagaStatus | None] = {}
        # The last lease owner, ttl and definition name found valid: a worker creates
        # its sagas with one owner and ttl, and few names, so they are checked once,
        # not per saga. _NEW until then (None is an owner, and must not pass for one).
        self._owner_checked: Any = _NEW
        self._ttl_checked: Any = _NEW
        self._saga_checked: Any = _NEW

    @classmethod
    def from_url(cls, url: str) -> InMemorySagaLog:
        parts = urlsplit(url)
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = set(options) - {"max_finished", "max_records"}
        if unknown or parts.netloc or parts.path not in ("", "/"):
            raise ConfigurationError(
                f"saga log URL {redact_url(url)!r}: memory:// takes only"
                " ?max_finished=N&max_records=M"
                + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else "")
            )
        bounds = {"max_finished": DEFAULT_MAX_FINISHED, "max_records": DEFAULT_MAX_RECORDS}
        for name, raw in options.items():
            try:
                value = int(raw)
            except ValueError:
                value = -1
            if value < 0:
                raise ConfigurationError(
                    f"saga log URL {redact_url(url)!r}: {name} must be a whole number >= 0,"
                    f" got {raw!r}"
                )
            bounds[name] = value
        return cls(max_finished=bounds["max_finished"], max_records=bounds["max_records"])

    # --- writing ---------------------------------------------------------------------

    async def create(
        self,
        saga_id: str,
        opening: Sequence[SagaRecord],
        *,
        owner: str | None,
        ttl: float,
    ) -> _Journal | None:
        # The identifier rule of every backend (see core.records.valid_id); the
        # common id, short ASCII, is told apart inline: this runs for every saga.
        if not (
            type(saga_id) is str
            and saga_id.isascii()
            and 0 < len(saga_id) <= MAX_ID_BYTES
            and "\x00" not in saga_id
        ):
            check_id("saga_id", saga_id)
        if owner is not self._owner_checked or ttl is not self._ttl_checked:
            if owner is not None:
                check_id("owner", owner)
            check_ttl(ttl)  # unused without an owner: checked alike, as every log does
            self._owner_checked, self._ttl_checked = owner, ttl
        sagas = self._sagas
        if saga_id in sagas:
            return None
        started = opening[0] if opening else None
        if type(started) is not SagaStarted:
            raise DefinitionError(
                "opening", f"a saga's log opens with SagaStarted, not {started!r:.100}"
            )
        if started.saga is not self._saga_checked:  # a definition's own name, mostly
            check_id("saga", started.saga)
            self._saga_checked = started.saga
        data = started.data
        if data:
            try:
                check_json(data if type(data) is dict else dict(data))
            except (TypeError, ValueError) as exc:
                raise SagaError(saga_id, f"its input is not a JSON value: {exc}") from exc
        else:
            # Every saga of a definition that has no input opens with an equal
            # record: kept once (see _shared).
            openings = self._openings
            if len(openings) > _MAX_SHARED:
                openings.clear()
            started = openings.setdefault((started.saga, started.steps), started)
        now = self._clock()
        expires_at = 0.0 if owner is None else now + ttl
        rest = opening[1:]
        if len(rest) == 1 and type(rest[0]) is StepStarted:
            # The opening every new saga has (its first step announced): nothing
            # in it to check, and it leaves the saga running.
            entry = sagas[saga_id] = _Saga(
                saga_id, started, [started, rest[0]], now, owner, expires_at
            )
            self._unfinished[saga_id] = entry
            return _Journal(self, entry, owner)
        entry = sagas[saga_id] = _Saga(saga_id, started, [started], now, owner, expires_at)
        self._unfinished[saga_id] = entry
        journal = _Journal(self, entry, owner)
        if rest:  # the records after SagaStarted, checked as any batch
            entry.marks.clear()  # stamped with them, as one batch
            try:
                journal.stage(rest)
            except BaseException:
                del sagas[saga_id], self._unfinished[saga_id]
                raise
        return journal

    def _checked(
        self, entry: _Saga, records: Sequence[SagaRecord]
    ) -> tuple[Sequence[SagaRecord], SagaStatus | None]:
        """The batch as it is to be kept, and the saga's status after it (None: unchanged).

        Raises SagaError, before anything is written, when a step's result is not
        a JSON value, and DefinitionError for what is not a saga record.
        """
        status: SagaStatus | None = None
        share = False  # a record in it may equal one kept before
        plain = type(records) is tuple  # nothing in it but steps and compensations begun or ended
        for record in records:
            kind = type(record)
            if kind is StepStarted:
                continue
            if kind is StepCompleted:
                if record[1] is not None:  # type: ignore[misc]
                    _check_result(entry, record)  # type: ignore[arg-type]
                    share, plain = True, False
            elif kind is SagaFinished:
                status = record[0]  # type: ignore[assignment]
            elif kind in _STATUS_OF:
                status = _STATUS_OF[kind]
                if kind is not CompensationStarted:  # SagaStarted, StepFailed
                    share, plain = True, False
            elif kind is not CompensationCompleted:  # CompensationFailed, or not a record
                if kind is not CompensationFailed:
                    raise DefinitionError("records", f"must be saga records, not {record!r:.100}")
                share, plain = True, False
        if plain:
            known = self._known
            if len(known) >= _MAX_KNOWN:
                known.clear()
            known[records] = status  # type: ignore[index]
        elif share:
            records = self._shared(records)
        return records, status

    def _finish(self, entry: _Saga) -> None:
        # Never written again: kept as tuples, which hold no spare room, and which
        # the cyclic collector stops scanning once it finds no container in them.
        entry.records = tuple(entry.records)  # type: ignore[assignment]
        entry.marks = tuple(entry.marks)  # type: ignore[assignment]
        entry.final = True
        entry.owner, entry.expires_at = None, 0.0
        saga_id = entry.saga_id
        self._unfinished.pop(saga_id, None)
        finished = self._finished
        finished.append(saga_id)
        # Its weight, fixed from now on (see max_records): the steps tuple is
        # counted with each saga, though sagas of one definition may share it.
        self._weight += len(entry.records) + len(entry.started.steps)
        if len(finished) > self.max_finished or self._weight > self.max_records:
            # Oldest first, this saga too when it alone is over max_records: the
            # bounds hold with no exception (see the module docstring).
            sagas, max_finished, max_records = self._sagas, self.max_finished, self.max_records
            weight = self._weight
            while finished and (len(finished) > max_finished or weight > max_records):
                gone = sagas.pop(finished.popleft())
                weight -= len(gone.records) + len(gone.started.steps)
            self._weight = weight

    def _shared(self, records: Sequence[SagaRecord]) -> list[SagaRecord]:
        """``records``, each one equal to a record kept before replaced by that one.

        A long-running process keeps up to ``max_finished`` sagas, and most of
        their records are like other sagas' (the same step failed for the same
        reason, the same saga with no input started). Kept once, they cost the
        memory and the cyclic collector nothing per saga. (The records the state
        machine makes for most transitions are shared already: see _SHARED in
        sagakit.core.machine.)
        """
        shared = self._shared_records
        if len(shared) > _MAX_SHARED:
            shared.clear()
        kept: list[SagaRecord] = []
        for record in records:
            kind = type(record)
            key: Any = None
            if kind is SagaStarted:
                if not record.data:  # type: ignore[union-attr]
                    key = (kind, record.saga, record.steps)  # type: ignore[union-attr]
            elif kind is StepCompleted:
                if type(record.result) in _SHAREABLE:  # type: ignore[union-attr]
                    # The result's type in the key: 1 and 1.0 are equal, not the same.
                    key = (kind, record.step, type(record.result), record.result)  # type: ignore[union-attr]
            elif kind in _SHARE_BY_FIELDS:
                # A plain tuple with the kind first: hashed and compared in C (a
                # record's own __eq__, which checks its kind, is Python).
                key = (kind, *record)
            kept.append(record if key is None else shared.setdefault(key, record))
        return kept

    # --- leases ----------------------------------------------------------------------

    def _take(self, entry: _Saga, owner: str, ttl: float, now: float) -> Claim:
        entry.epoch += 1
        entry.owner, entry.expires_at = owner, now + ttl
        return Claim(list(entry.records), _Journal(self, entry, owner))

    async def claim(self, saga_id: str, *, owner: str, ttl: float) -> Claim | None:
        check_id("owner", owner)
        check_ttl(ttl)
        entry = self._unfinished.get(saga_id)
        if entry is None:
            return None
        now = self._clock()
        if entry.owner is not None and entry.owner != owner and entry.expires_at > now:
            return None
        return self._take(entry, owner, ttl, now)

    async def claim_next(self, *, owner: str, ttl: float, limit: int) -> list[Claim]:
        check_id("owner", owner)
        check_ttl(ttl)
        check_limit(limit)
        now = self._clock()
        free = [
            entry
            for entry in self._unfinished.values()
            if entry.owner is None or entry.expires_at <= now
        ][:limit]
        return [self._take(entry, owner, ttl, now) for entry in free]

    async def renew(self, journals: Sequence[object], *, ttl: float) -> list[str]:
        check_ttl(ttl)
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
            for seq, (record, stamp) in enumerate(zip(entry.records, entry.stamps(), strict=True))
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
            entry.marks[1],  # the time of the first batch, and of the last
            entry.marks[-1],
        )

    async def status(self, saga_id: str) -> SagaSummary | None:
        entry = self._sagas.get(saga_id)
        return None if entry is None else self._summary(entry)

    async def list(
        self,
        *,
        status: SagaStatus | str | Sequence[SagaStatus | str] | None = None,
        limit: int = 100,
    ) -> list[SagaSummary]:
        check_limit(limit)
        wanted = wanted_statuses(status)
        found: list[SagaSummary] = []
        if limit == 0 or wanted == []:
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
