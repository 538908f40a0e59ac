"""Saga logs for orchestrator tests: the in-memory log seen as a durable one.

:class:`BufferedLog` behaves as a durable log does towards the driver: it says
``durable``, its journals keep staged records until ``flush``, and every call
suspends once (a round trip). So the driver's flush path runs without a
database. :class:`FlakyLog` fails the next calls with a retryable
BackendUnavailable, as a database restarting would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from sagakit.adapters.memory_log import InMemorySagaLog
from sagakit.core.records import SagaRecord, SagaStatus
from sagakit.core.saga import SagaDefinition
from sagakit.errors import BackendUnavailable
from sagakit.orchestration import Orchestrator
from sagakit.ports.saga_log import Claim, Journal, Lease, LoggedRecord, SagaSummary

__all__ = ["BufferedLog", "FlakyLog", "start_in", "unfinished"]


def start_in(store: str, saga: SagaDefinition, saga_id: str) -> None:
    """Record ``saga`` as ``saga_id`` in the log at ``store`` for a worker to run
    (from a test that is not async itself)."""

    async def start() -> None:
        orchestrator = Orchestrator(store)
        try:
            await orchestrator.start(saga, saga_id)
        finally:
            await orchestrator.close()

    asyncio.run(start())


async def unfinished(log: Any) -> list[str]:
    """The ids of the log's unfinished sagas, oldest first."""
    listed = await log.list(status=[SagaStatus.RUNNING, SagaStatus.COMPENSATING], limit=10_000)
    return [s.saga_id for s in reversed(listed)]


class _BufferedJournal:
    def __init__(self, inner: Journal, log: BufferedLog) -> None:
        self._inner = inner
        self._log = log
        self._staged: list[SagaRecord] = []

    @property
    def saga_id(self) -> str:
        return self._inner.saga_id

    @property
    def lease(self) -> Lease | None:
        return self._inner.lease

    @property
    def version(self) -> int:
        return self._inner.version + len(self._staged)

    def stage(self, records: Sequence[SagaRecord]) -> None:
        self._staged += records

    async def flush(self) -> None:
        await asyncio.sleep(0)
        await self._log._fail_maybe()
        staged, self._staged = self._staged, []
        try:
            self._inner.stage(staged)
        except BaseException:
            self._staged = staged + self._staged
            raise
        self._log.flushes += 1


class BufferedLog:
    """An in-memory log that acts durable (see the module docstring)."""

    durable = True

    def __init__(self, inner: InMemorySagaLog | None = None) -> None:
        self.inner = inner or InMemorySagaLog()
        self.flushes = 0

    async def _fail_maybe(self) -> None:
        return None

    def _wrap(self, journal: Any) -> Any:
        return None if journal is None else _BufferedJournal(journal, self)

    async def create(
        self, saga_id: str, opening: Sequence[SagaRecord], *, owner: str | None, ttl: float
    ) -> Any:
        await asyncio.sleep(0)
        await self._fail_maybe()
        return self._wrap(await self.inner.create(saga_id, opening, owner=owner, ttl=ttl))

    async def claim(self, saga_id: str, *, owner: str, ttl: float) -> Claim | None:
        await asyncio.sleep(0)
        await self._fail_maybe()
        claim = await self.inner.claim(saga_id, owner=owner, ttl=ttl)
        return None if claim is None else Claim(claim.records, self._wrap(claim.journal))

    async def claim_next(self, *, owner: str, ttl: float, limit: int) -> list[Claim]:
        await asyncio.sleep(0)
        await self._fail_maybe()
        claims = await self.inner.claim_next(owner=owner, ttl=ttl, limit=limit)
        return [Claim(c.records, self._wrap(c.journal)) for c in claims]

    async def renew(self, journals: Sequence[Any], *, ttl: float) -> list[str]:
        await self._fail_maybe()
        return await self.inner.renew([j._inner for j in journals], ttl=ttl)

    async def release(self, journal: Any) -> None:
        await self.inner.release(journal._inner)

    async def read(self, saga_id: str) -> list[SagaRecord]:
        await asyncio.sleep(0)
        return await self.inner.read(saga_id)

    async def history(self, saga_id: str) -> list[LoggedRecord]:
        return await self.inner.history(saga_id)

    async def status(self, saga_id: str) -> SagaSummary | None:
        return await self.inner.status(saga_id)

    async def list(self, *, status: Any = None, limit: int = 100) -> list[SagaSummary]:
        return await self.inner.list(status=status, limit=limit)

    async def close(self) -> None:
        await self.inner.close()


class FlakyLog(BufferedLog):
    """Fails the next ``failures`` writes, claims and renewals with BackendUnavailable."""

    def __init__(self, inner: InMemorySagaLog | None = None) -> None:
        super().__init__(inner)
        self.failures = 0
        self.failed = 0

    async def _fail_maybe(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            self.failed += 1
            raise BackendUnavailable("flaky", "connection lost (the server is restarting)")
