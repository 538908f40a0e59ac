"""The saga log port: every saga's records, leases on running sagas, and journals.

A saga log keeps, per saga id, an append-only sequence of records
(:mod:`sagakit.core.records`) and beside it what a worker needs to share the
work with others: the saga's status, and a lease (owner, expiry, fencing
epoch).

Writes go through a :class:`Journal`, one per running saga. The driver stages
the records a decision produced and, when the log is :attr:`SagaLog.durable`,
flushes them before it dispatches the commands that depend on them. Group
commit (many sagas' flushes in one transaction) lives behind ``flush``, in the
adapter, never in the driver. On a log that is not durable (``memory://``),
``stage`` applies the records at once and ``flush`` has nothing left to do.

Fencing: every claim of a saga bumps its epoch. A journal writes only while
its epoch is the saga's current one; otherwise ``flush`` (or, on a log that is
not durable, ``stage``) raises :class:`~sagakit.errors.LeaseLost` and writes
nothing. A batch is written whole or not at all.

Leases are measured on the log's own clock (the database server's, where there
is one), so workers on machines whose clocks differ still agree on expiry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable

from sagakit.core.records import SagaRecord, SagaStatus
from sagakit.errors import DefinitionError

__all__ = [
    "MIN_TTL",
    "Claim",
    "Journal",
    "Lease",
    "LoggedRecord",
    "SagaLog",
    "SagaSummary",
    "check_limit",
    "check_ttl",
    "wanted_statuses",
]


class Lease(NamedTuple):
    owner: str
    epoch: int  # the fencing token: bumped by every claim
    expires_at: float  # seconds since the epoch, on the log's clock


class LoggedRecord(NamedTuple):
    """A record as the log holds it: its place in the saga's log and when it was written."""

    seq: int  # 0-based position in the saga's log
    record: SagaRecord
    recorded_at: float  # seconds since the epoch, on the log's clock


class SagaSummary(NamedTuple):
    """One saga as a listing shows it."""

    saga_id: str
    saga: str  # the definition's name
    status: SagaStatus
    records: int  # how many records its log holds
    owner: str | None  # the lease holder, while one holds it
    lease_expires_at: float | None
    created_at: float
    updated_at: float


@runtime_checkable
class Journal(Protocol):
    """The writer of one saga's log, under one lease (or none, for a saga only recorded)."""

    @property
    def saga_id(self) -> str: ...

    @property
    def lease(self) -> Lease | None: ...

    @property
    def version(self) -> int:
        """How many records the saga's log holds, staged ones included."""
        ...

    def stage(self, records: Sequence[SagaRecord]) -> None:
        """Add records to write with the next flush (at once, on a log that is not durable)."""
        ...

    async def flush(self) -> None:
        """Make every staged record durable, in order, all or none.

        Raises LeaseLost when the journal's epoch is no longer the saga's, and
        BackendError when the backend failed (its ``retryable`` tells whether
        flushing again may help; the staged records are kept until a flush
        succeeds).
        """
        ...


class Claim(NamedTuple):
    """A saga taken over by a worker: its log so far, and the journal to go on with."""

    records: list[SagaRecord]
    journal: Journal


@runtime_checkable
class SagaLog(Protocol):
    """Saga logs with leases; see the module docstring for the rules."""

    @property
    def durable(self) -> bool:
        """True when records outlive the process: the driver then flushes before acting."""
        ...

    async def create(
        self,
        saga_id: str,
        opening: Sequence[SagaRecord],
        *,
        owner: str | None,
        ttl: float,
    ) -> Journal | None:
        """Record a new saga with its opening records (``SagaStarted`` first), durably.

        With an ``owner``, the saga is leased to it for ``ttl`` seconds and the
        journal returned writes under that lease; with None, the saga is only
        recorded, for any worker to claim (``Orchestrator.start``). Returns None,
        writing nothing, when the saga id is already in the log.
        """
        ...

    async def claim(self, saga_id: str, *, owner: str, ttl: float) -> Claim | None:
        """Take the saga over: it must be unfinished, and unleased, or leased to
        ``owner``, or its lease expired. Bumps the epoch. None otherwise (unknown,
        finished, or held by a live lease)."""
        ...

    async def claim_next(self, *, owner: str, ttl: float, limit: int) -> list[Claim]:
        """Claim up to ``limit`` unfinished sagas with no live lease, oldest first.

        Concurrent callers (other processes included) never get the same saga.
        """
        ...

    async def renew(self, journals: Sequence[Journal], *, ttl: float) -> list[str]:
        """Extend these journals' leases by ``ttl`` from now; return the ids of the
        sagas whose lease was lost (another epoch holds them, or they finished)."""
        ...

    async def release(self, journal: Journal) -> None:
        """Give the saga's lease up (a clean stop): another worker may claim it at once."""
        ...

    async def read(self, saga_id: str) -> list[SagaRecord]:
        """Every record of the saga, in order; an empty list for an unknown saga."""
        ...

    async def history(self, saga_id: str) -> list[LoggedRecord]:
        """Every record of the saga with its position and time (for timelines)."""
        ...

    async def status(self, saga_id: str) -> SagaSummary | None: ...

    async def list(
        self,
        *,
        status: SagaStatus | str | Sequence[SagaStatus | str] | None = None,
        limit: int = 100,
    ) -> list[SagaSummary]:
        """Sagas, newest first, of the given status(es) or all: a status is a SagaStatus
        or its text. A saga whose status this sagakit does not know (a newer one wrote
        it, or a hand) is left out, with a warning logged, rather than failing the whole
        listing; ``status`` of it raises SchemaMismatch (its ``saga_id`` set).

        A bad status, ``limit`` (a whole number >= 0) or lease ``ttl`` (finite seconds,
        at least MIN_TTL) is a DefinitionError naming it, on every backend."""
        ...

    async def close(self) -> None: ...


# --- arguments every saga log checks alike, before any work ----------------------------
# A bad one is a DefinitionError naming it, on every backend, memory included.


# The shortest lease a saga log takes. Shorter ones are no lease at all: the clocks'
# resolution (a float of seconds since 1970 steps by 0.24 us, PostgreSQL's by 1 us)
# makes them expire as they are taken. What keeps a lease renewed needs far more
# (the orchestrator's MIN_LEASE_TTL).
MIN_TTL = 0.001


def check_ttl(ttl: object) -> float:
    """A lease's time to live: a finite number of seconds, at least MIN_TTL."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not MIN_TTL <= ttl < math.inf:
        raise DefinitionError(
            "ttl", f"must be a number of seconds, at least {MIN_TTL:g} and finite, not {ttl!r}"
        )
    return float(ttl)


def check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise DefinitionError("limit", f"must be a whole number >= 0, not {limit!r}")
    return limit


def wanted_statuses(status: object) -> list[str] | None:
    """The status values a listing asks for, sorted (None: all; []: none). One status,
    as a SagaStatus or its text, or a collection of them."""
    if status is None:
        return None
    given = [status] if isinstance(status, str) else status
    try:
        return sorted({SagaStatus(s).value for s in given})  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        known = ", ".join(s.value for s in SagaStatus)
        raise DefinitionError(
            "status", f"must be one of {known}, or a collection of them, not {status!r:.100}"
        ) from None
