"""Keeping leases alive, and riding out a backend's passing failures.

A worker drives a saga only under its lease. :func:`renew_leases` renews every
lease a worker holds, each third of a lease's life, and marks the sagas whose
lease was lost, so that their drivers stop before their next action.
:func:`retrying` is how every call to the saga log survives a database
restart: a retryable :class:`~sagakit.errors.BackendError` is tried again, with
backoff, for a bounded time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Container, Iterable
from typing import TypeVar

from sagakit.core.records import SagaStatus
from sagakit.errors import BackendError
from sagakit.ports.saga_log import Claim, Journal, SagaLog

__all__ = [
    "LEFT_BEHIND_SCAN",
    "Unrunnable",
    "claim_left_behind",
    "give_back",
    "renew_leases",
    "retrying",
    "wait_for_holder",
]

log = logging.getLogger("sagakit.orchestrator")

T = TypeVar("T")


async def renew_leases(
    saga_log: SagaLog, held: dict[str, Journal], lost: set[str], ttl: float
) -> None:
    """Renew the ``held`` leases each third of their life, while any is held; add the ids
    of those found lost to ``lost`` (both are the caller's, shared with its drivers)."""
    interval = ttl / 3
    while True:
        await asyncio.sleep(interval)
        if not held:
            return
        try:
            gone = await saga_log.renew(list(held.values()), ttl=ttl)
        except BackendError as exc:
            # Tried again next round, sooner; a lease that runs out meanwhile is
            # found lost at the next write (the epoch is checked on every one).
            log.warning("renewing leases failed: %s", exc)
            interval = max(ttl / 10, 0.01)
            continue
        interval = ttl / 3
        for saga_id in gone:
            if saga_id in held:
                log.warning("saga %s: its lease was lost; stopping its driver", saga_id)
                lost.add(saga_id)


# How many of the newest unfinished sagas a worker looks through, when it starts
# serving or recovering, for those still leased to its own name.
LEFT_BEHIND_SCAN = 1000


async def claim_left_behind(
    saga_log: SagaLog,
    owner: str,
    ttl: float,
    busy: Container[str],
    retry_for: float,
) -> list[Claim]:
    """Claim the unfinished sagas still leased to ``owner`` that are not ``busy`` here.

    A worker named by its operator (``owner``) that died or was restarted left
    its sagas leased to that name; the same name claims them at once (a saga log
    lets a lease's owner claim it again) instead of waiting out leases no one
    renews. Among the newest LEFT_BEHIND_SCAN unfinished sagas: older ones are
    claimed as usual once their leases expire.
    """
    unfinished = [SagaStatus.RUNNING, SagaStatus.COMPENSATING]
    summaries = await retrying(
        lambda: saga_log.list(status=unfinished, limit=LEFT_BEHIND_SCAN), retry_for
    )
    claims: list[Claim] = []
    for summary in summaries:
        saga_id = summary.saga_id
        if summary.owner != owner or saga_id in busy:
            continue
        claim = await retrying(
            lambda: saga_log.claim(saga_id, owner=owner, ttl=ttl),  # noqa: B023 - awaited here
            retry_for,
        )
        if claim is not None:
            log.info("saga %s: left leased to %s by an earlier process; taken over", saga_id, owner)
            claims.append(claim)
    return claims


async def give_back(saga_log: SagaLog, journals: Iterable[Journal]) -> None:
    """Give these leases up (a lease since taken over is left alone: the log checks the
    epoch). A failure is only logged: the lease then expires as it would have anyway."""
    for journal in journals:
        try:
            await saga_log.release(journal)
        except Exception:
            log.exception("saga %s: could not give its lease up", journal.saga_id)


class Unrunnable:
    """The leases of sagas a worker claimed but lacks the definition of.

    Each is kept, unrenewed, until it expires: given up at once, the saga would
    come back at the very next claim, again and again. Those left when the worker
    stops are given up (see :func:`give_back`), so that a worker restarted with
    the definition takes them at once; expired ones are dropped as others come.
    """

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._held: dict[str, tuple[Journal, float]] = {}

    def keep(self, journal: Journal) -> None:
        now = time.monotonic()
        for expired in [s for s, (_, at) in self._held.items() if now - at > self._ttl]:
            del self._held[expired]
        self._held[journal.saga_id] = (journal, now)

    def journals(self) -> list[Journal]:
        return [journal for journal, _ in self._held.values()]


async def wait_for_holder(
    saga_log: SagaLog, saga_id: str, poll_interval: float, retry_for: float
) -> None:
    """Wait until the saga is finished or its lease is given up, or for a while
    (the caller then tries to claim it again: the log, on its own clock, says
    whether the lease expired)."""
    delay = 0.01
    deadline = time.monotonic() + poll_interval
    while time.monotonic() < deadline:
        await asyncio.sleep(delay)
        summary = await retrying(lambda: saga_log.status(saga_id), retry_for)
        if summary is None or summary.status.is_final or summary.owner is None:
            return
        delay = min(delay * 2, poll_interval)


async def retrying(call: Callable[[], Awaitable[T]], retry_for: float) -> T:
    """``call()``, tried again with backoff while it fails with a retryable BackendError,
    for up to ``retry_for`` seconds."""
    deadline = time.monotonic() + retry_for
    delay = 0.05
    while True:
        try:
            return await call()
        except BackendError as exc:
            if not exc.retryable or time.monotonic() + delay > deadline:
                raise
            log.warning("%s; retrying in %.2fs", exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)
