"""Conformance suite for saga log backends.

A backend's tests subclass :class:`SagaLogConformance` (whose name does not start
with ``Test``, so pytest collects it only through the subclasses) and implement
:meth:`SagaLogConformance.make_log`, returning an empty, ready log::

    class TestSQLiteSagaLog(SagaLogConformance):
        async def make_log(self) -> SagaLog:
            return SQLiteSagaLog(tmp_path / "sagas.db")

Every value recorded here is JSON-friendly, so that durable backends, which
serialise records, must hand back records equal to those appended, of the same
kind (NamedTuples of different kinds with equal fields compare equal, so kinds
are compared too).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from sagakit.core.machine import (
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
)
from sagakit.errors import SagaError, SagaLogConflict
from sagakit.ports.saga_log import SagaLog

__all__ = ["SagaLogConformance", "typed"]


def typed(records: Sequence[Any]) -> list[tuple[str, Any]]:
    return [(type(r).__name__, r) for r in records]


def opening(saga: str = "order", data: dict[str, Any] | None = None) -> list[SagaRecord]:
    return [SagaStarted(saga, ("reserve", "charge"), data or {"amount": 3}), StepStarted(0)]


FINISHED: list[SagaRecord] = [
    StepCompleted(0, {"id": "r-1"}),
    StepStarted(1),
    StepCompleted(1, 42),
    SagaFinished(SagaStatus.COMPLETED),
]

EVERY_KIND: list[SagaRecord] = [
    SagaStarted("order", ("reserve", "charge", "ship"), {"amount": 3, "items": ["a", "b"]}),
    StepStarted(0),
    StepCompleted(0, {"id": "r-1", "nested": {"n": [1, 2.5, None, True]}}),
    StepStarted(1, attempt=2),
    StepCompleted(1),
    StepStarted(2),
    StepFailed(2, "Boom: out of stock", attempt=3),
    CompensationStarted(1),
    CompensationCompleted(1),
    CompensationStarted(0),
    CompensationFailed(0, "RuntimeError: cannot undo \u00e9\u00e8 \u2603"),
    SagaFinished(SagaStatus.FAILED),
]


class SagaLogConformance(ABC):
    """What every :class:`~sagakit.ports.saga_log.SagaLog` backend must do."""

    @abstractmethod
    async def make_log(self) -> SagaLog:
        """A new, empty saga log."""

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[SagaLog]:
        log = await self.make_log()
        try:
            yield log
        finally:
            await log.close()

    async def test_is_a_saga_log(self) -> None:
        async with self.opened() as log:
            assert isinstance(log, SagaLog)

    async def test_read_of_an_unknown_saga_is_empty(self) -> None:
        async with self.opened() as log:
            assert await log.read("nobody") == []
            assert await log.unfinished() == []

    async def test_append_then_read_gives_back_the_records(self) -> None:
        async with self.opened() as log:
            await log.append("o-1", 0, opening())
            assert typed(await log.read("o-1")) == typed(opening())
            await log.append("o-1", 2, FINISHED[:2])
            await log.append("o-1", 4, FINISHED[2:])
            assert typed(await log.read("o-1")) == typed(opening() + FINISHED)

    async def test_every_record_kind_round_trips(self) -> None:
        async with self.opened() as log:
            await log.append("o-1", 0, EVERY_KIND[:1])
            for version in range(1, len(EVERY_KIND)):
                await log.append("o-1", version, EVERY_KIND[version : version + 1])
            assert typed(await log.read("o-1")) == typed(EVERY_KIND)
            await log.append("o-2", 0, EVERY_KIND)
            assert typed(await log.read("o-2")) == typed(EVERY_KIND)

    async def test_saga_finished_status_reads_back_as_a_status(self) -> None:
        async with self.opened() as log:
            await log.append("o-1", 0, [*opening(), SagaFinished(SagaStatus.COMPENSATED)])
            last = (await log.read("o-1"))[-1]
            assert type(last) is SagaFinished
            assert last.status is SagaStatus.COMPENSATED

    @pytest.mark.parametrize(("version", "actual"), [(1, 0), (5, 0)])
    async def test_first_append_with_a_wrong_version_conflicts(
        self, version: int, actual: int
    ) -> None:
        async with self.opened() as log:
            with pytest.raises(SagaLogConflict) as excinfo:
                await log.append("o-1", version, opening())
            error = excinfo.value
            assert isinstance(error, SagaError)
            assert (error.saga_id, error.expected, error.actual) == ("o-1", version, actual)
            assert await log.read("o-1") == []
            assert await log.unfinished() == []

    @pytest.mark.parametrize("version", [0, 1, 2, 4, 7])
    async def test_append_with_a_stale_or_future_version_conflicts_and_writes_nothing(
        self, version: int
    ) -> None:
        async with self.opened() as log:
            await log.append("o-1", 0, opening())
            await log.append("o-1", 2, FINISHED[:1])
            with pytest.raises(SagaLogConflict) as excinfo:
                await log.append("o-1", version, FINISHED[1:])
            assert (excinfo.value.expected, excinfo.value.actual) == (version, 3)
            assert typed(await log.read("o-1")) == typed(opening() + FINISHED[:1])
            assert await log.unfinished() == ["o-1"]
            # The writer that saw everything still appends.
            await log.append("o-1", 3, FINISHED[1:])
            assert typed(await log.read("o-1")) == typed(opening() + FINISHED)

    async def test_a_batch_is_written_whole_or_not_at_all(self) -> None:
        async with self.opened() as log:
            await log.append("o-1", 0, opening())
            with pytest.raises(SagaLogConflict):
                await log.append("o-1", 1, FINISHED)  # would finish the saga
            assert typed(await log.read("o-1")) == typed(opening())
            assert await log.unfinished() == ["o-1"]
            await log.append("o-1", 2, FINISHED)
            assert len(await log.read("o-1")) == 2 + len(FINISHED)

    async def test_concurrent_writers_at_one_version_one_wins_whole(self) -> None:
        async with self.opened() as log:
            await log.append("o-1", 0, opening())
            batches = [
                [StepCompleted(0, {"writer": w}), StepStarted(1), StepCompleted(1, w)]
                for w in range(5)
            ]
            results = await asyncio.gather(
                *(log.append("o-1", 2, batch) for batch in batches), return_exceptions=True
            )
            winners = [i for i, r in enumerate(results) if r is None]
            assert len(winners) == 1
            losers = [r for r in results if r is not None]
            assert all(isinstance(r, SagaLogConflict) for r in losers)
            assert typed(await log.read("o-1")) == typed(opening() + batches[winners[0]])

    async def test_sagas_are_isolated(self) -> None:
        async with self.opened() as log:
            await log.append("o-1", 0, opening("order"))
            await log.append("o-2", 0, opening("refund", {"amount": 9}))
            await log.append("o-1", 2, FINISHED)
            assert typed(await log.read("o-2")) == typed(opening("refund", {"amount": 9}))
            assert typed(await log.read("o-1")) == typed(opening("order") + FINISHED)
            # Versions count per saga.
            with pytest.raises(SagaLogConflict) as excinfo:
                await log.append("o-2", 6, FINISHED)
            assert excinfo.value.actual == 2
            await log.append("o-2", 2, FINISHED[:1])
            assert len(await log.read("o-2")) == 3
            assert await log.read("o-3") == []

    async def test_unfinished_lists_sagas_not_ending_with_saga_finished_in_first_append_order(
        self,
    ) -> None:
        async with self.opened() as log:
            for saga_id in ("c", "a", "d", "b"):
                await log.append(saga_id, 0, opening())
            assert await log.unfinished() == ["c", "a", "d", "b"]
            await log.append("a", 2, FINISHED)
            # Appending to an older saga does not move it.
            await log.append("c", 2, FINISHED[:1])
            assert await log.unfinished() == ["c", "d", "b"]
            await log.append("c", 3, FINISHED[1:])
            await log.append("b", 2, [StepFailed(0, "x"), SagaFinished(SagaStatus.COMPENSATED)])
            assert await log.unfinished() == ["d"]
            await log.append("d", 2, FINISHED)
            assert await log.unfinished() == []

    async def test_a_saga_finished_anywhere_but_last_does_not_finish_it(self) -> None:
        async with self.opened() as log:
            await log.append("o-1", 0, [*opening(), *FINISHED, StepStarted(1)])
            assert await log.unfinished() == ["o-1"]

    async def test_an_empty_batch_leaves_no_trace(self) -> None:
        """As in a table of records, where an empty batch inserts no row: the saga stays
        unknown, so unfinished() (which recover() reads back) does not list it."""
        async with self.opened() as log:
            await log.append("o-1", 0, [])
            assert await log.read("o-1") == []
            assert await log.unfinished() == []
            await log.append("o-1", 0, opening())
            assert typed(await log.read("o-1")) == typed(opening())

    async def test_read_returns_a_copy(self) -> None:
        async with self.opened() as log:
            await log.append("o-1", 0, opening())
            records = await log.read("o-1")
            records.append(SagaFinished(SagaStatus.COMPLETED))
            records[0] = StepStarted(9)
            assert typed(await log.read("o-1")) == typed(opening())
            assert await log.unfinished() == ["o-1"]
            empty = await log.read("nobody")
            empty.append(StepStarted(0))
            assert await log.read("nobody") == []

    async def test_appended_sequence_is_not_kept_by_reference(self) -> None:
        async with self.opened() as log:
            batch = opening()
            await log.append("o-1", 0, batch)
            batch.append(SagaFinished(SagaStatus.COMPLETED))
            assert typed(await log.read("o-1")) == typed(opening())

    async def test_append_accepts_a_tuple(self) -> None:
        async with self.opened() as log:
            await log.append("o-1", 0, tuple(opening()))
            assert typed(await log.read("o-1")) == typed(opening())

    async def test_a_finished_saga_can_still_be_appended_to(self) -> None:
        """The port forbids nothing after SagaFinished; a backend must not lose such records."""
        async with self.opened() as log:
            await log.append("o-1", 0, [*opening(), *FINISHED])
            await log.append("o-1", 6, [StepStarted(1)])
            assert typed(await log.read("o-1")) == typed([*opening(), *FINISHED, StepStarted(1)])
            assert await log.unfinished() == ["o-1"]
            await log.append("o-1", 7, [SagaFinished(SagaStatus.COMPLETED)])
            await log.append("o-2", 0, [*opening(), SagaFinished(SagaStatus.COMPLETED)])
            await log.append("o-2", 3, [StepStarted(0)])
            assert len(await log.read("o-1")) == 8
            assert typed((await log.read("o-2"))[-2:]) == typed(
                [SagaFinished(SagaStatus.COMPLETED), StepStarted(0)]
            )
            with pytest.raises(SagaLogConflict):
                await log.append("o-1", 6, [StepStarted(1)])

    async def test_an_empty_batch_still_checks_the_version(self) -> None:
        """So that an empty append at version 0 tells whether a saga id is new."""
        async with self.opened() as log:
            await log.append("o-1", 0, [])
            await log.append("o-1", 0, opening())
            with pytest.raises(SagaLogConflict):
                await log.append("o-1", 0, [])
            with pytest.raises(SagaLogConflict):
                await log.append("o-2", 1, [])
            await log.append("o-1", 2, [])
            assert typed(await log.read("o-1")) == typed(opening())
