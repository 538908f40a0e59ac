"""Conformance suite for saga log backends (the :class:`~sagakit.ports.saga_log.SagaLog` port).

A backend's tests subclass :class:`SagaLogConformance` (whose name does not start
with ``Test``, so pytest collects it only through the subclasses) and implement
:meth:`SagaLogConformance.make_log`, returning a new, empty, ready log::

    class TestSQLiteSagaLog(SagaLogConformance):
        @pytest.fixture(autouse=True)
        def _folder(self, tmp_path: Path) -> None:
            self.path = tmp_path / "sagas.db"

        async def make_log(self) -> SagaLog:
            return SQLiteSagaLog(self.path)

        async def make_sibling(self, log: SagaLog) -> SagaLog | None:
            return SQLiteSagaLog(self.path)  # a second log on the same store

Leases expire on the log's own clock, which is the database server's on
PostgreSQL, so the suite lets time pass for real by default: leases meant to
expire are :attr:`SagaLogConformance.short_ttl` long (0.2 s) and
:meth:`SagaLogConformance.advance_clock` sleeps. A backend with an injectable
clock may override ``advance_clock`` to move it instead.

Values recorded here are JSON values, so a durable backend, which serialises
records, must hand back records equal to those written and of the same kind
(compared by :func:`typed`).

Writes go through a journal: ``stage`` then ``flush``. On a log that is not
durable ``stage`` applies at once, so a fenced write may fail in ``stage`` or
in ``flush``; :func:`write` does both, and the tests expect the error from it.
"""

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
from sagakit.errors import LeaseLost, SagaError
from sagakit.ports.saga_log import Claim, Journal, Lease, SagaLog

__all__ = ["EVERY_KIND", "FINISHED", "SagaLogConformance", "opening", "typed", "write"]

LONG_TTL = 60.0  # a lease that does not expire during a test


def typed(records: Sequence[Any]) -> list[tuple[str, Any]]:
    """Records with their kind: dataclasses of different kinds never compare equal, but a
    backend handing back a dict or a tuple must still fail."""
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


class SagaLogConformance(ABC):
    """What every :class:`~sagakit.ports.saga_log.SagaLog` backend must do."""

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

    # --- shape ----------------------------------------------------------------------

    async def test_is_a_saga_log(self) -> None:
        async with self.opened() as log:
            assert isinstance(log, SagaLog)
            assert isinstance(log.durable, bool)

    async def test_an_unknown_saga_reads_empty(self) -> None:
        async with self.opened() as log:
            assert await log.read("nobody") == []
            assert await log.history("nobody") == []
            assert await log.status("nobody") is None
            assert await log.list() == []
            assert await log.claim("nobody", owner="w-1", ttl=LONG_TTL) is None
            assert await log.claim_next(owner="w-1", ttl=LONG_TTL, limit=10) == []

    # --- create ---------------------------------------------------------------------

    async def test_create_then_read_gives_back_the_opening(self) -> None:
        async with self.opened() as log:
            journal = await self.started(log, "o-1")
            assert isinstance(journal, Journal)
            assert journal.saga_id == "o-1"
            assert journal.version == 2
            assert typed(await log.read("o-1")) == typed(opening())

    async def test_every_record_kind_round_trips(self) -> None:
        async with self.opened() as log:
            await self.started(log, "at-once", EVERY_KIND)
            assert typed(await log.read("at-once")) == typed(EVERY_KIND)
            journal = await self.started(log, "one-by-one", EVERY_KIND[:1])
            for record in EVERY_KIND[1:]:
                await write(journal, [record])
            assert journal.version == len(EVERY_KIND)
            assert typed(await log.read("one-by-one")) == typed(EVERY_KIND)
            last = (await log.read("one-by-one"))[-1]
            assert type(last) is SagaFinished
            assert last.status is SagaStatus.FAILED
            started = (await log.read("one-by-one"))[0]
            assert type(started) is SagaStarted
            assert started.steps == ("reserve", "charge", "ship")  # a tuple, as written

    async def test_create_of_an_existing_saga_returns_none_and_writes_nothing(self) -> None:
        async with self.opened() as log:
            first = await self.started(log, "o-1")
            again = await log.create(
                "o-1", opening("refund", {"amount": 9}), owner="w-2", ttl=LONG_TTL
            )
            assert again is None
            assert typed(await log.read("o-1")) == typed(opening())
            summary = await log.status("o-1")
            assert summary is not None
            assert (summary.saga, summary.owner, summary.records) == ("order", "w-1", 2)
            await write(first, FINISHED)  # the first creator's lease is untouched
            assert len(await log.read("o-1")) == 6
            # A finished saga's id stays taken.
            assert await log.create("o-1", opening(), owner=None, ttl=LONG_TTL) is None

    async def test_concurrent_creates_of_one_saga_id_one_wins(self) -> None:
        async with self.opened() as log:
            results = await asyncio.gather(
                *(
                    log.create("o-1", opening("order", {"by": i}), owner=f"w-{i}", ttl=LONG_TTL)
                    for i in range(8)
                )
            )
            winners = [i for i, journal in enumerate(results) if journal is not None]
            assert len(winners) == 1
            assert typed(await log.read("o-1")) == typed(opening("order", {"by": winners[0]}))
            summary = await log.status("o-1")
            assert summary is not None
            assert summary.owner == f"w-{winners[0]}"

    async def test_create_with_an_owner_leases_the_saga(self) -> None:
        async with self.opened() as log:
            journal = await self.started(log, "o-1", owner="w-1", ttl=30.0)
            lease = journal.lease
            assert isinstance(lease, Lease)
            assert lease.owner == "w-1"
            summary = await log.status("o-1")
            assert summary is not None
            assert summary.owner == "w-1"
            assert summary.lease_expires_at == pytest.approx(lease.expires_at)
            # Measured on the log's clock: about ttl after the saga was written.
            assert lease.expires_at - 30.0 == pytest.approx(summary.created_at, abs=5.0)
            # A live lease keeps others out.
            assert await log.claim("o-1", owner="w-2", ttl=LONG_TTL) is None
            assert await log.claim_next(owner="w-2", ttl=LONG_TTL, limit=10) == []

    async def test_create_without_an_owner_only_records_the_saga(self) -> None:
        async with self.opened() as log:
            journal = await self.started(log, "o-1", owner=None)
            assert journal.lease is None
            summary = await log.status("o-1")
            assert summary is not None
            assert (summary.owner, summary.lease_expires_at) == (None, None)
            assert summary.status is SagaStatus.RUNNING
            claim = await log.claim("o-1", owner="w-2", ttl=LONG_TTL)
            assert claim is not None
            assert typed(claim.records) == typed(opening())

    async def test_a_non_json_value_is_refused_and_nothing_is_written(self) -> None:
        async with self.opened() as log:
            bad: list[Any] = [{1, 2}, object(), {1: "int key"}, 2**70, b"bytes"]
            for i, value in enumerate(bad):
                with pytest.raises((TypeError, ValueError, SagaError)):
                    await log.create(f"bad-{i}", opening("order", {"v": value}), owner="w", ttl=1)
                assert await log.read(f"bad-{i}") == []
                assert await log.status(f"bad-{i}") is None
            journal = await self.started(log, "o-1")
            for value in bad:
                with pytest.raises((TypeError, ValueError, SagaError)):
                    journal.stage([StepCompleted(0, {"ok": 1}), StepCompleted(0, value)])
                # Refused as a whole when staged: nothing of it is kept to flush later.
                assert journal.version == 2
            await journal.flush()
            assert typed(await log.read("o-1")) == typed(opening())
            await write(journal, FINISHED)  # the journal goes on
            assert typed(await log.read("o-1")) == typed(opening() + FINISHED)

    async def test_nan_and_infinity_are_refused(self) -> None:
        """JSON has no NaN or infinity: stored as null they would come back changed."""
        async with self.opened() as log:
            journal = await self.started(log, "o-1")
            for value in (float("nan"), float("inf"), [float("-inf")]):
                with pytest.raises((TypeError, ValueError, SagaError)):
                    journal.stage([StepCompleted(0, value)])
            assert journal.version == 2
            await journal.flush()
            assert typed(await log.read("o-1")) == typed(opening())

    # --- journals -------------------------------------------------------------------

    async def test_staged_records_land_in_order_on_flush(self) -> None:
        async with self.opened() as log:
            journal = await self.started(log, "o-1")
            journal.stage(FINISHED[:1])
            journal.stage(FINISHED[1:3])
            assert journal.version == 5  # staged records count
            if log.durable:
                # Not yet durable, so not yet in the log: a reader never sees a record
                # that a crash could still take back.
                assert typed(await log.read("o-1")) == typed(opening())
            await journal.flush()
            assert typed(await log.read("o-1")) == typed(opening() + FINISHED[:3])
            await journal.flush()  # nothing staged: nothing to do
            journal.stage([])
            await journal.flush()
            await write(journal, FINISHED[3:])
            assert typed(await log.read("o-1")) == typed(opening() + FINISHED)
            assert journal.version == 6
            summary = await log.status("o-1")
            assert summary is not None
            assert summary.records == 6

    async def test_a_staged_sequence_is_not_kept_by_reference(self) -> None:
        async with self.opened() as log:
            batch = list(opening())
            journal = await self.started(log, "o-1", batch)
            batch.append(SagaFinished(SagaStatus.COMPLETED))
            more = list(FINISHED[:1])
            journal.stage(more)
            more.append(StepStarted(7))
            await journal.flush()
            assert typed(await log.read("o-1")) == typed(opening() + FINISHED[:1])

    async def test_read_returns_a_copy(self) -> None:
        async with self.opened() as log:
            await self.started(log, "o-1")
            records = await log.read("o-1")
            records.append(SagaFinished(SagaStatus.COMPLETED))
            records[0] = StepStarted(9)
            assert typed(await log.read("o-1")) == typed(opening())

    async def test_a_journal_on_a_saga_claimed_by_another_owner_is_fenced(self) -> None:
        async with self.opened() as log:
            stale = await self.started(log, "o-1", owner="w-1", ttl=self.short_ttl)
            await write(stale, FINISHED[:1])
            await self.expire_short_leases(log)
            claim = await log.claim("o-1", owner="w-2", ttl=LONG_TTL)
            assert claim is not None
            assert claim.journal.lease is not None
            assert stale.lease is not None
            assert claim.journal.lease.epoch > stale.lease.epoch
            with pytest.raises(LeaseLost) as excinfo:
                await write(stale, FINISHED[1:])  # a whole batch, finishing the saga
            error = excinfo.value
            assert (error.saga_id, error.owner, error.epoch) == ("o-1", "w-1", stale.lease.epoch)
            assert typed(await log.read("o-1")) == typed(opening() + FINISHED[:1])
            summary = await log.status("o-1")
            assert summary is not None
            assert (summary.status, summary.owner, summary.records) == (
                SagaStatus.RUNNING,
                "w-2",
                3,
            )
            # Still fenced when tried again; the new holder writes on.
            with pytest.raises(LeaseLost):
                await write(stale, [StepStarted(1)])
            assert claim.journal.version == 3
            await write(claim.journal, FINISHED[1:])
            assert typed(await log.read("o-1")) == typed(opening() + FINISHED)

    async def test_an_unleased_journal_is_fenced_once_a_worker_claims_the_saga(self) -> None:
        async with self.opened() as log:
            recorded = await self.started(log, "o-1", owner=None)
            claim = await log.claim("o-1", owner="w-1", ttl=LONG_TTL)
            assert claim is not None
            with pytest.raises(LeaseLost):
                await write(recorded, FINISHED)
            assert typed(await log.read("o-1")) == typed(opening())

    async def test_reclaiming_ones_own_saga_fences_the_older_journal(self) -> None:
        async with self.opened() as log:
            old = await self.started(log, "o-1", owner="w-1")
            claim = await log.claim("o-1", owner="w-1", ttl=LONG_TTL)  # e.g. after a restart
            assert claim is not None
            assert claim.journal.lease is not None
            assert old.lease is not None
            assert claim.journal.lease.owner == "w-1"
            assert claim.journal.lease.epoch > old.lease.epoch
            with pytest.raises(LeaseLost):
                await write(old, FINISHED)
            await write(claim.journal, FINISHED)
            assert typed(await log.read("o-1")) == typed(opening() + FINISHED)

    async def test_two_writers_racing_on_one_saga_exactly_one_wins(self) -> None:
        async with self.opened() as log:
            first = await self.started(log, "o-1", owner="w-1", ttl=self.short_ttl)
            await self.expire_short_leases(log)
            second = await log.claim("o-1", owner="w-2", ttl=LONG_TTL)
            assert second is not None
            batches = {
                "w-1": [StepCompleted(0, {"by": "w-1"}), StepStarted(1)],
                "w-2": [StepCompleted(0, {"by": "w-2"}), StepStarted(1)],
            }
            results = await asyncio.gather(
                write(first, batches["w-1"]),
                write(second.journal, batches["w-2"]),
                return_exceptions=True,
            )
            assert results[1] is None
            assert isinstance(results[0], LeaseLost)
            assert typed(await log.read("o-1")) == typed(opening() + batches["w-2"])

    async def test_many_sagas_flushing_at_once_all_land(self) -> None:
        """Group commit must not lose, mix up or reorder any saga's records."""
        async with self.opened() as log:
            journals = await asyncio.gather(
                *(
                    self.started(log, f"o-{i}", opening("order", {"n": i}), owner=f"w-{i % 3}")
                    for i in range(64)
                )
            )

            async def drive(i: int, journal: Journal) -> None:
                for step in range(3):
                    await write(journal, [StepCompleted(step, {"n": i, "step": step})])
                    await write(journal, [StepStarted(step + 1, attempt=i + 1)])
                await write(journal, [SagaFinished(SagaStatus.COMPLETED)])

            await asyncio.gather(*(drive(i, j) for i, j in enumerate(journals)))
            for i in range(64):
                expected: list[SagaRecord] = opening("order", {"n": i})
                for step in range(3):
                    expected += [
                        StepCompleted(step, {"n": i, "step": step}),
                        StepStarted(step + 1, attempt=i + 1),
                    ]
                expected.append(SagaFinished(SagaStatus.COMPLETED))
                assert typed(await log.read(f"o-{i}")) == typed(expected)
            completed = await log.list(status=SagaStatus.COMPLETED, limit=1000)
            assert len(completed) == 64
            assert all(s.records == 9 for s in completed)

    async def test_a_fenced_saga_does_not_fail_others_flushing_with_it(self) -> None:
        async with self.opened() as log:
            fenced = await self.started(log, "fenced", owner="w-1", ttl=self.short_ttl)
            others = [await self.started(log, f"o-{i}", owner="w-1") for i in range(8)]
            await self.expire_short_leases(log)
            assert await log.claim("fenced", owner="w-2", ttl=LONG_TTL) is not None
            results = await asyncio.gather(
                write(fenced, FINISHED),
                *(write(journal, FINISHED) for journal in others),
                return_exceptions=True,
            )
            assert isinstance(results[0], LeaseLost)
            assert results[1:] == [None] * 8
            for i in range(8):
                assert typed(await log.read(f"o-{i}")) == typed(opening() + FINISHED)
            assert typed(await log.read("fenced")) == typed(opening())

    # --- claims ---------------------------------------------------------------------

    async def test_claim_hands_back_the_log_and_a_journal_to_go_on_with(self) -> None:
        async with self.opened() as log:
            first = await self.started(log, "o-1", owner=None)
            await write(first, FINISHED[:2])
            claim = await log.claim("o-1", owner="w-2", ttl=30.0)
            assert isinstance(claim, Claim)
            assert typed(claim.records) == typed(opening() + FINISHED[:2])
            journal = claim.journal
            assert (journal.saga_id, journal.version) == ("o-1", 4)
            assert journal.lease is not None
            assert journal.lease.owner == "w-2"
            summary = await log.status("o-1")
            assert summary is not None
            assert summary.owner == "w-2"
            assert summary.lease_expires_at == pytest.approx(journal.lease.expires_at)
            assert journal.lease.expires_at - 30.0 == pytest.approx(summary.updated_at, abs=5.0)
            await write(journal, FINISHED[2:])
            assert typed(await log.read("o-1")) == typed(opening() + FINISHED)

    async def test_a_live_lease_is_not_claimed_an_expired_one_is(self) -> None:
        async with self.opened() as log:
            await self.started(log, "o-1", owner="w-1", ttl=self.short_ttl)
            assert await log.claim("o-1", owner="w-2", ttl=LONG_TTL) is None
            await self.expire_short_leases(log)
            claim = await log.claim("o-1", owner="w-2", ttl=LONG_TTL)
            assert claim is not None
            assert claim.journal.lease is not None
            assert claim.journal.lease.owner == "w-2"
            assert await log.claim("o-1", owner="w-3", ttl=LONG_TTL) is None

    async def test_a_finished_saga_is_never_claimed(self) -> None:
        async with self.opened() as log:
            for i, end in enumerate(
                [
                    SagaStatus.COMPLETED,
                    SagaStatus.COMPENSATED,
                    SagaStatus.FAILED,
                ]
            ):
                journal = await self.started(log, f"o-{i}", owner="w-1", ttl=self.short_ttl)
                await write(journal, [SagaFinished(end)])
            await self.expire_short_leases(log)
            for i in range(3):
                assert await log.claim(f"o-{i}", owner="w-1", ttl=LONG_TTL) is None
                assert await log.claim(f"o-{i}", owner="w-2", ttl=LONG_TTL) is None
            assert await log.claim_next(owner="w-2", ttl=LONG_TTL, limit=10) == []

    async def test_concurrent_claims_of_one_saga_one_wins(self) -> None:
        async with self.opened() as log:
            await self.started(log, "o-1", owner=None)
            claims = await asyncio.gather(
                *(log.claim("o-1", owner=f"w-{i}", ttl=LONG_TTL) for i in range(8))
            )
            won = [c for c in claims if c is not None]
            assert len(won) == 1
            summary = await log.status("o-1")
            assert summary is not None
            assert won[0].journal.lease is not None
            assert summary.owner == won[0].journal.lease.owner

    async def test_claim_next_takes_the_oldest_unleased_sagas_first(self) -> None:
        async with self.opened() as log:
            for saga_id in ("c", "a", "d", "b", "e"):
                await self.started(log, saga_id, owner=None)
            await self.started(log, "held", owner="w-9")
            done = await self.started(log, "done", owner=None)
            await write(done, FINISHED)
            first = await log.claim_next(owner="w-1", ttl=LONG_TTL, limit=3)
            assert [c.journal.saga_id for c in first] == ["c", "a", "d"]
            for claim in first:
                assert typed(claim.records) == typed(opening())
                assert claim.journal.version == 2
                assert claim.journal.lease is not None
                assert claim.journal.lease.owner == "w-1"
            # Live leases, the claimer's own included, are not taken again.
            rest = await log.claim_next(owner="w-1", ttl=LONG_TTL, limit=10)
            assert [c.journal.saga_id for c in rest] == ["b", "e"]
            assert await log.claim_next(owner="w-2", ttl=LONG_TTL, limit=10) == []

    async def test_claim_next_takes_expired_leases_and_respects_limit(self) -> None:
        async with self.opened() as log:
            stale = [
                await self.started(log, f"o-{i}", owner="gone", ttl=self.short_ttl)
                for i in range(4)
            ]
            await self.expire_short_leases(log)
            assert await log.claim_next(owner="w-1", ttl=LONG_TTL, limit=0) == []
            claims = await log.claim_next(owner="w-1", ttl=LONG_TTL, limit=2)
            assert [c.journal.saga_id for c in claims] == ["o-0", "o-1"]
            with pytest.raises(LeaseLost):
                await write(stale[0], FINISHED)
            await write(stale[3], [StepCompleted(0, "still mine")])  # not claimed: not fenced
            later = await log.claim_next(owner="w-2", ttl=LONG_TTL, limit=5)
            assert [c.journal.saga_id for c in later] == ["o-2", "o-3"]
            assert typed(later[1].records) == typed([*opening(), StepCompleted(0, "still mine")])

    async def test_concurrent_claim_next_never_shares_a_saga(self) -> None:
        async with self.opened() as log:
            ids = [f"o-{i:02}" for i in range(40)]
            for saga_id in ids:
                await self.started(log, saga_id, owner=None)
            batches = await asyncio.gather(
                *(log.claim_next(owner=f"w-{i}", ttl=LONG_TTL, limit=3) for i in range(10))
            )
            await self._assert_claimed_apart(log, ids, batches)

    async def test_two_logs_on_one_store_never_share_a_saga(self) -> None:
        async with self.opened() as log, self.sibling(log) as other:
            ids = [f"o-{i:02}" for i in range(40)]
            for saga_id in ids:
                await self.started(log, saga_id, owner=None)
            batches = await asyncio.gather(
                *(
                    (log if i % 2 else other).claim_next(owner=f"w-{i}", ttl=LONG_TTL, limit=3)
                    for i in range(10)
                )
            )
            await self._assert_claimed_apart(log, ids, batches)
            # What one log writes, the other reads; and its fencing holds across them.
            claim = batches[0][0]
            theirs = await log.claim(claim.journal.saga_id, owner="w-0", ttl=LONG_TTL)
            assert theirs is not None
            with pytest.raises(LeaseLost):
                await write(claim.journal, FINISHED)
            await write(theirs.journal, FINISHED)
            assert typed(await other.read(claim.journal.saga_id)) == typed(opening() + FINISHED)

    async def _assert_claimed_apart(
        self, log: SagaLog, ids: list[str], batches: Sequence[list[Claim]]
    ) -> None:
        taken = [c.journal.saga_id for batch in batches for c in batch]
        assert len(taken) == len(set(taken))
        rest = await log.claim_next(owner="late", ttl=LONG_TTL, limit=100)
        assert sorted(taken + [c.journal.saga_id for c in rest]) == ids
        assert len(taken) == 30  # ten claimers of three each, forty sagas to take
        for i, batch in enumerate(batches):
            for claim in batch:
                summary = await log.status(claim.journal.saga_id)
                assert summary is not None
                assert summary.owner == f"w-{i}"

    # --- renew and release -----------------------------------------------------------

    async def test_renew_extends_a_lease(self) -> None:
        async with self.opened() as log:
            journal = await self.started(log, "o-1", owner="w-1", ttl=self.short_ttl)
            before = await log.status("o-1")
            assert before is not None
            assert before.lease_expires_at is not None
            assert await log.renew([journal], ttl=LONG_TTL) == []
            after = await log.status("o-1")
            assert after is not None
            assert after.lease_expires_at is not None
            assert after.lease_expires_at > before.lease_expires_at + LONG_TTL / 2
            await self.expire_short_leases(log)
            assert await log.claim("o-1", owner="w-2", ttl=LONG_TTL) is None
            await write(journal, FINISHED)
            assert len(await log.read("o-1")) == 6

    async def test_renew_reports_the_leases_lost(self) -> None:
        async with self.opened() as log:
            kept = await self.started(log, "kept", owner="w-1")
            taken = await self.started(log, "taken", owner="w-1", ttl=self.short_ttl)
            finished = await self.started(log, "finished", owner="w-1")
            await write(finished, FINISHED)
            await self.expire_short_leases(log)
            assert await log.claim("taken", owner="w-2", ttl=LONG_TTL) is not None
            lost = await log.renew([kept, taken, finished], ttl=LONG_TTL)
            assert sorted(lost) == ["finished", "taken"]
            assert await log.renew([], ttl=LONG_TTL) == []
            summary = await log.status("taken")
            assert summary is not None
            assert summary.owner == "w-2"  # the renewal did not steal it back

    async def test_release_lets_another_worker_claim_at_once(self) -> None:
        async with self.opened() as log:
            journal = await self.started(log, "o-1", owner="w-1", ttl=LONG_TTL)
            await write(journal, FINISHED[:1])
            await log.release(journal)
            summary = await log.status("o-1")
            assert summary is not None
            assert (summary.owner, summary.lease_expires_at) == (None, None)
            assert summary.status is SagaStatus.RUNNING
            claims = await log.claim_next(owner="w-2", ttl=LONG_TTL, limit=10)
            assert [c.journal.saga_id for c in claims] == ["o-1"]
            assert typed(claims[0].records) == typed(opening() + FINISHED[:1])
            with pytest.raises(LeaseLost):
                await write(journal, FINISHED[1:])

    async def test_release_of_a_lost_lease_leaves_the_new_holder_alone(self) -> None:
        async with self.opened() as log:
            stale = await self.started(log, "o-1", owner="w-1", ttl=self.short_ttl)
            await self.expire_short_leases(log)
            claim = await log.claim("o-1", owner="w-2", ttl=LONG_TTL)
            assert claim is not None
            await log.release(stale)
            summary = await log.status("o-1")
            assert summary is not None
            assert summary.owner == "w-2"
            await write(claim.journal, FINISHED)

    # --- status, list, history --------------------------------------------------------

    async def test_status_follows_the_records(self) -> None:
        async with self.opened() as log:
            journal = await self.started(log, "o-1", owner="w-1")
            summary = await log.status("o-1")
            assert summary is not None
            assert (summary.saga_id, summary.saga, summary.status, summary.records) == (
                "o-1",
                "order",
                SagaStatus.RUNNING,
                2,
            )
            assert summary.created_at <= summary.updated_at
            steps: list[tuple[list[SagaRecord], SagaStatus]] = [
                ([StepCompleted(0, 1), StepStarted(1)], SagaStatus.RUNNING),
                ([StepFailed(1, "declined")], SagaStatus.COMPENSATING),
                ([CompensationStarted(0)], SagaStatus.COMPENSATING),
                ([CompensationCompleted(0)], SagaStatus.COMPENSATING),
                ([SagaFinished(SagaStatus.COMPENSATED)], SagaStatus.COMPENSATED),
            ]
            for records, status in steps:
                await write(journal, records)
                now = await log.status("o-1")
                assert now is not None
                assert now.status is status
                assert now.records == journal.version
                assert now.created_at == summary.created_at
                assert now.updated_at >= summary.updated_at

    async def test_list_filters_by_status_newest_first(self) -> None:
        async with self.opened() as log:
            ends = {
                "a": [],
                "b": FINISHED,
                "c": [StepFailed(0, "x")],
                "d": [StepFailed(0, "x"), SagaFinished(SagaStatus.COMPENSATED)],
                "e": [],
                "f": [
                    StepFailed(0, "x"),
                    CompensationFailed(0, "y"),
                    SagaFinished(SagaStatus.FAILED),
                ],
            }
            for saga_id, records in ends.items():
                journal = await self.started(log, saga_id, owner=None)
                await write(journal, records)
                await self.advance_clock(log, 0.002)  # distinct creation times
            everything = await log.list()
            assert [s.saga_id for s in everything] == ["f", "e", "d", "c", "b", "a"]
            assert all(s.saga == "order" for s in everything)
            assert [s.saga_id for s in await log.list(limit=2)] == ["f", "e"]
            assert [s.saga_id for s in await log.list(status=SagaStatus.RUNNING)] == ["e", "a"]
            assert [s.saga_id for s in await log.list(status=SagaStatus.COMPENSATING)] == ["c"]
            finished = await log.list(
                status=[SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED]
            )
            assert [(s.saga_id, s.status) for s in finished] == [
                ("f", SagaStatus.FAILED),
                ("d", SagaStatus.COMPENSATED),
                ("b", SagaStatus.COMPLETED),
            ]
            assert all(type(s.status) is SagaStatus for s in everything)
            assert await log.list(status=[]) == []
            summary = await log.status("b")
            assert summary is not None
            assert summary in everything

    async def test_list_shows_leases(self) -> None:
        async with self.opened() as log:
            await self.started(log, "held", owner="w-1", ttl=LONG_TTL)
            await self.started(log, "free", owner=None)
            by_id = {s.saga_id: s for s in await log.list()}
            assert by_id["held"].owner == "w-1"
            assert by_id["held"].lease_expires_at is not None
            assert (by_id["free"].owner, by_id["free"].lease_expires_at) == (None, None)

    async def test_history_numbers_and_times_every_record(self) -> None:
        async with self.opened() as log:
            journal = await self.started(log, "o-1", owner="w-1")
            await self.advance_clock(log, 0.01)
            await write(journal, FINISHED[:2])
            await write(journal, FINISHED[2:])
            history = await log.history("o-1")
            assert [entry.seq for entry in history] == list(range(6))
            assert typed([entry.record for entry in history]) == typed(opening() + FINISHED)
            times = [entry.recorded_at for entry in history]
            assert times == sorted(times)
            assert times[0] == times[1]  # one batch, one moment
            assert times[2] > times[1]
            summary = await log.status("o-1")
            assert summary is not None
            assert times[0] == pytest.approx(summary.created_at)
            assert times[-1] == pytest.approx(summary.updated_at)
