"""The saga log conformance suite, part two: claims, renewals and releases (see saga_log.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from conformance.saga_log_base import (
    FINISHED,
    LONG_TTL,
    SagaLogHarness,
    opening,
    typed,
    write,
)
from sagakit.core.records import SagaFinished, SagaStatus, StepCompleted
from sagakit.errors import LeaseLost
from sagakit.ports.saga_log import Claim, SagaLog

__all__ = ["SagaLogLeaseTests"]


class SagaLogLeaseTests(SagaLogHarness):
    """Leases: who may take a saga over, and when."""

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

    async def test_a_limit_beyond_any_count_means_all(self) -> None:
        # Any whole number >= 0 is a limit (the port's rule): SQLite's 64-bit
        # integers once turned 2**70 into an OverflowError.
        async with self.opened() as log:
            await self.started(log, "o-1", owner=None)
            assert [s.saga_id for s in await log.list(limit=2**70)] == ["o-1"]
            claims = await log.claim_next(owner="w-1", ttl=LONG_TTL, limit=2**70)
            assert [c.journal.saga_id for c in claims] == ["o-1"]

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
