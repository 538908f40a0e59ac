"""The harness and sample records of the saga log conformance suite (see saga_log.py)."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from sagakit.core.records import (
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
from sagakit.ports.saga_log import Journal, SagaLog

__all__ = [
    "EVERY_KIND",
    "FINISHED",
    "LONG_TTL",
    "SagaLogHarness",
    "opening",
    "typed",
    "write",
]

LONG_TTL = 60.0  # a lease that does not expire during a test


def typed(records: Sequence[Any]) -> list[tuple[str, Any]]:
    """Records with their kind's name, so that a backend handing back a plain tuple, a
    dict or a record of another kind with the same fields fails the comparison."""
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
    StepCompleted(0, {"id": "r-1", "nested": {"n": [1, 2.5, None, True, -(2**63)]}}),
    StepStarted(1, attempt=2),
    StepCompleted(1),
    StepStarted(2),
    StepFailed(2, "Boom: out of stock", attempt=3),
    CompensationStarted(1),
    CompensationCompleted(1),
    CompensationStarted(0, attempt=2),
    CompensationFailed(0, "RuntimeError: cannot undo \u00e9\u00e8 \u2603 \U0001f600", attempt=4),
    SagaFinished(SagaStatus.FAILED),
]


async def write(journal: Journal, records: Sequence[SagaRecord]) -> None:
    """Stage then flush: what the driver does for one decision."""
    journal.stage(records)
    await journal.flush()


class SagaLogHarness(ABC):
    """What a backend's test class provides, and the helpers every test uses."""

    short_ttl: float = 0.2  # a lease the test lets expire
    clock_slack: float = 0.15  # added to short_ttl when letting it expire

    @abstractmethod
    async def make_log(self) -> SagaLog:
        """A new, empty saga log."""

    async def make_sibling(self, log: SagaLog) -> SagaLog | None:
        """A second log on the same store as ``log`` (another process would open the
        same), or None when the backend cannot share its store (``memory://``)."""
        return None

    async def advance_clock(self, log: SagaLog, seconds: float) -> None:
        """Let ``seconds`` pass on the log's clock (for real, unless overridden)."""
        await asyncio.sleep(seconds)

    async def expire_short_leases(self, log: SagaLog) -> None:
        await self.advance_clock(log, self.short_ttl + self.clock_slack)

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[SagaLog]:
        log = await self.make_log()
        try:
            yield log
        finally:
            await log.close()

    @asynccontextmanager
    async def sibling(self, log: SagaLog) -> AsyncIterator[SagaLog]:
        other = await self.make_sibling(log)
        if other is None:
            pytest.skip("this backend cannot open a second log on the same store")
        try:
            yield other
        finally:
            await other.close()

    async def started(
        self,
        log: SagaLog,
        saga_id: str,
        records: Sequence[SagaRecord] | None = None,
        *,
        owner: str | None = "w-1",
        ttl: float = LONG_TTL,
    ) -> Journal:
        journal = await log.create(
            saga_id, opening() if records is None else records, owner=owner, ttl=ttl
        )
        assert journal is not None
        return journal
