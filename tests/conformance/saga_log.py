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
from typing import Any

import pytest

from conformance.saga_log_base import (
    EVERY_KIND,
    FINISHED,
    LONG_TTL,
    SagaLogHarness,
    opening,
    typed,
    write,
)
from conformance.saga_log_leases import SagaLogLeaseTests
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
from sagakit.errors import DefinitionError, LeaseLost, SagaError
from sagakit.ports.saga_log import Journal, Lease, SagaLog

__all__ = [
    "EVERY_KIND",
    "FINISHED",
    "SagaLogConformance",
    "SagaLogHarness",
    "opening",
    "typed",
    "write",
]


class SagaLogConformance(SagaLogLeaseTests):
    """What every :class:`~sagakit.ports.saga_log.SagaLog` backend must do."""

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

    @pytest.mark.parametrize(
        "saga_id", ["", "nul\x00inside", "lone \ud800 surrogate", "x" * 1025, "\u00e9" * 513]
    )
    async def test_a_saga_id_no_backend_can_keep_is_refused_alone(self, saga_id: str) -> None:
        """One identifier rule for every backend (core.records.valid_id): what PostgreSQL
        cannot keep as a key is refused in memory and on SQLite too, and naming it in a
        read finds nothing."""
        async with self.opened() as log:
            with pytest.raises(DefinitionError) as excinfo:
                await log.create(saga_id, opening(), owner="w-1", ttl=LONG_TTL)
            assert excinfo.value.field == "saga_id"
            assert await log.read(saga_id) == []
            assert await log.history(saga_id) == []
            assert await log.status(saga_id) is None
            assert await log.claim(saga_id, owner="w-1", ttl=LONG_TTL) is None
            await self.started(log, "x" * 1024)  # the longest ids that fit
            await self.started(log, "\u00e9" * 512)
            assert len(await log.list()) == 2

    @pytest.mark.parametrize("name", ["", "a\x00b", "\udfff", "x" * 1025])
    async def test_a_definition_name_no_backend_can_keep_is_refused(self, name: str) -> None:
        """PostgreSQL refused it, naming ``saga``; memory and SQLite kept it (or failed
        with a SagaError about the input): code that worked there failed on PostgreSQL."""
        async with self.opened() as log:
            for owner in ("w-1", None):
                with pytest.raises(DefinitionError) as excinfo:
                    await log.create(
                        "o-1", [SagaStarted(name, ("a",), {}), StepStarted(0)], owner=owner, ttl=1
                    )
                assert excinfo.value.field == "saga"
            assert await log.read("o-1") == []

    async def test_what_is_not_a_record_is_refused_naming_records(self) -> None:
        """memory:// kept a string among the records (read back as is); SQLite and
        PostgreSQL failed with the codec's AttributeError."""
        async with self.opened() as log:
            with pytest.raises(DefinitionError) as excinfo:
                await log.create("o-1", [*opening(), "junk"], owner="w-1", ttl=LONG_TTL)  # type: ignore[list-item]
            assert excinfo.value.field == "records"
            assert await log.read("o-1") == []
            journal = await self.started(log, "o-2")
            with pytest.raises(DefinitionError) as excinfo:
                journal.stage([StepCompleted(0, 1), ("step_completed", 0)])  # type: ignore[list-item]
            assert excinfo.value.field == "records"
            await write(journal, [StepCompleted(0, 1)])  # nothing of the refused batch
            assert typed(await log.read("o-2")) == typed([*opening(), StepCompleted(0, 1)])

    async def test_a_bad_opening_is_refused_naming_it(self) -> None:
        async with self.opened() as log:
            for records in ([], [StepStarted(0)]):
                with pytest.raises(DefinitionError) as excinfo:
                    await log.create("o-1", records, owner="w-1", ttl=LONG_TTL)
                assert excinfo.value.field == "opening"
            assert await log.read("o-1") == []

    @pytest.mark.parametrize("owner", ["", "a\x00b", "\udfff", "x" * 1025])
    async def test_an_owner_no_backend_can_keep_is_refused(self, owner: str) -> None:
        async with self.opened() as log:
            with pytest.raises(DefinitionError) as excinfo:
                await log.create("o-1", opening(), owner=owner, ttl=LONG_TTL)
            assert excinfo.value.field == "owner"
            with pytest.raises(DefinitionError):
                await log.claim_next(owner=owner, ttl=LONG_TTL, limit=1)
            assert await log.read("o-1") == []

    # 1e-9: a lease that expires as it is taken (the clocks do not resolve it).
    @pytest.mark.parametrize(
        "ttl", [0, -1, 1e-9, 0.0009, float("nan"), float("inf"), True, "5", None]
    )
    async def test_a_bad_lease_ttl_is_refused_naming_it(self, ttl: Any) -> None:
        async with self.opened() as log:
            for owner in ("w-1", None):  # unused without an owner, but checked alike
                with pytest.raises(DefinitionError) as excinfo:
                    await log.create("o-1", opening(), owner=owner, ttl=ttl)
                assert excinfo.value.field == "ttl"
            assert await log.read("o-1") == []
            await self.started(log, "o-2", owner=None)
            for call in (
                lambda: log.claim("o-2", owner="w-1", ttl=ttl),
                lambda: log.claim_next(owner="w-1", ttl=ttl, limit=1),
            ):
                with pytest.raises(DefinitionError) as excinfo:
                    await call()
                assert excinfo.value.field == "ttl"
            summary = await log.status("o-2")
            assert summary is not None
            assert summary.owner is None
            # A renewal too: memory:// took NaN (a lease that never expired) or -1 (one
            # expired at once) where the durable logs refused them.
            held = await self.started(log, "o-3", owner="w-1")
            before = await log.status("o-3")
            for journals in ([held], []):
                with pytest.raises(DefinitionError) as excinfo:
                    await log.renew(journals, ttl=ttl)
                assert excinfo.value.field == "ttl"
            assert await log.status("o-3") == before

    @pytest.mark.parametrize("limit", [-1, 2.5, "3", True, None])
    async def test_a_bad_limit_is_refused_naming_it(self, limit: Any) -> None:
        async with self.opened() as log:
            for call in (
                lambda: log.list(limit=limit),
                lambda: log.claim_next(owner="w-1", ttl=LONG_TTL, limit=limit),
            ):
                with pytest.raises(DefinitionError) as excinfo:
                    await call()
                assert excinfo.value.field == "limit"

    async def test_list_takes_a_status_or_its_text_and_refuses_others(self) -> None:
        async with self.opened() as log:
            await write(await self.started(log, "done"), FINISHED)
            await self.started(log, "running")
            for status in ("completed", SagaStatus.COMPLETED, ["completed"], ("completed",)):
                assert [s.saga_id for s in await log.list(status=status)] == ["done"]
            assert await log.list(status=[]) == []
            for bad in ("bogus", ["completed", "nope"], 5):
                with pytest.raises(DefinitionError) as excinfo:
                    await log.list(status=bad)
                assert excinfo.value.field == "status"

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

    async def test_a_saga_created_finished_holds_no_lease(self) -> None:
        """A saga of no steps opens finished. On PostgreSQL it kept its creator's
        lease: listed as held, as no finished saga is anywhere else."""
        async with self.opened() as log:
            records = [SagaStarted("empty", (), {}), SagaFinished(SagaStatus.COMPLETED)]
            journal = await self.started(log, "e-1", records, owner="w-1")
            summary = await log.status("e-1")
            assert summary is not None
            assert summary.status is SagaStatus.COMPLETED
            assert (summary.owner, summary.lease_expires_at) == (None, None)
            with pytest.raises(LeaseLost):
                await write(journal, [SagaFinished(SagaStatus.COMPLETED)])

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

    async def test_readers_never_see_part_of_a_batch(self) -> None:
        async with self.opened() as log:
            journal = await self.started(log, "o-1")
            seen: set[int] = set()
            writing = True

            async def reader() -> None:
                while writing:
                    seen.add(len(await log.read("o-1")))
                    summary = await log.status("o-1")
                    assert summary is not None
                    seen.add(summary.records)
                    await asyncio.sleep(0)

            task = asyncio.create_task(reader())
            for step in range(30):
                await write(
                    journal,
                    [StepCompleted(step, step), StepStarted(step + 1), StepFailed(step + 1, "x")],
                )
            writing = False
            await task
            assert all(count % 3 == 2 for count in seen), sorted(seen)
            assert len(await log.read("o-1")) == 92

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
