"""The in-memory saga log: real, complete, and gone with the process."""

from __future__ import annotations

from collections.abc import Sequence

from sagakit.core.machine import SagaFinished, SagaRecord
from sagakit.errors import SagaLogConflict

__all__ = ["InMemorySagaLog"]


class InMemorySagaLog:
    """A :class:`~sagakit.ports.saga_log.SagaLog` held in a dict.

    Records are stored as given, not serialised, so results need not be JSON
    here; the durable logs require JSON-serialisable inputs and results.
    """

    # Gone with the process: the orchestrator may batch synchronous transitions.
    volatile = True

    def __init__(self) -> None:
        # dicts keep insertion order: the first append of a saga fixes its place.
        self._logs: dict[str, list[SagaRecord] | tuple[SagaRecord, ...]] = {}

    @classmethod
    def from_url(cls, url: str) -> InMemorySagaLog:
        return cls()

    async def append(self, saga_id: str, version: int, records: Sequence[SagaRecord]) -> None:
        self.append_now(saga_id, version, records)

    def append_now(self, saga_id: str, version: int, records: Sequence[SagaRecord]) -> None:
        logs = self._logs
        if version == 0 and records:
            # A new saga's opening records: the commonest write, in one look at
            # the index (it outgrows the caches), where get then set took two.
            # A finished saga's records stop changing, and they are most of what
            # this log holds: kept in an exactly sized tuple, not a list with room
            # to grow (and, when given a tuple, as given: see happy_path_log).
            new = tuple(records) if type(records[-1]) is SagaFinished else list(records)
            kept = logs.setdefault(saga_id, new)
            if kept is not new:
                raise SagaLogConflict(saga_id, version, len(kept))
            return
        log = logs.get(saga_id)
        if log is None:
            if version != 0:
                raise SagaLogConflict(saga_id, version, 0)
            return  # an empty batch leaves no trace, as it inserts no row in SQL
        if len(log) != version:
            raise SagaLogConflict(saga_id, version, len(log))
        if not records:
            return
        if type(log) is list and type(records[-1]) is not SagaFinished:
            log += records
        else:
            logs[saga_id] = (*log, *records)

    async def read(self, saga_id: str) -> list[SagaRecord]:
        return list(self._logs.get(saga_id, ()))

    async def unfinished(self) -> list[str]:
        return [
            saga_id
            for saga_id, log in self._logs.items()
            if not log or type(log[-1]) is not SagaFinished
        ]

    async def close(self) -> None:
        # Nothing to release; the records stay readable, as a closed file's data would.
        return None
