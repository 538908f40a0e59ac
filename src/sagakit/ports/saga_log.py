"""The saga log port: an append-only record of every saga's transitions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from sagakit.core.machine import SagaRecord

__all__ = ["ImmediateSagaLog", "SagaLog"]


@runtime_checkable
class SagaLog(Protocol):
    """Append-only, per-saga sequences of records with optimistic concurrency.

    ``version`` in :meth:`append` is the number of records the writer has seen
    for that saga; if the log holds another number (another orchestrator got
    there first), ``append`` raises :class:`~sagakit.errors.SagaLogConflict` and
    writes nothing. A batch is written whole or not at all. An empty batch
    writes nothing but is checked all the same, so an empty append at version
    0 tells whether a saga id is new.
    """

    async def append(self, saga_id: str, version: int, records: Sequence[SagaRecord]) -> None: ...

    async def read(self, saga_id: str) -> list[SagaRecord]:
        """Every record of the saga in order; an empty list for an unknown saga."""
        ...

    async def unfinished(self) -> list[str]:
        """Ids of the sagas whose log does not end with ``SagaFinished``, oldest first."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class ImmediateSagaLog(SagaLog, Protocol):
    """A saga log that appends without awaiting (the in-memory one).

    The orchestrator calls :meth:`append_now` instead of awaiting
    :meth:`SagaLog.append` when a log offers it, which saves a coroutine per
    transition; the semantics are exactly those of ``append``.

    ``volatile`` is True when the records do not outlive the process. The
    orchestrator then writes the transitions of a run of synchronous steps in
    one batch, before it next awaits (or when it stops): the write-ahead order
    exists for whoever reads the log after a crash, and a volatile log has no
    such reader, while between two awaits no coroutine can read it either. A
    new saga's opening records wait too: an empty append checks that its id
    is new. A log that is immediate but durable (a synchronous file, say) must
    say False.
    """

    volatile: bool

    def append_now(self, saga_id: str, version: int, records: Sequence[SagaRecord]) -> None: ...
