"""A tracker that follows every event on a bus and tells where each saga stands."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sagakit.core.event import Event
from sagakit.core.machine import SagaStatus
from sagakit.errors import DefinitionError
from sagakit.ports.event_bus import ALL_EVENTS, EventBus, Subscription

__all__ = ["DEFAULT_MAX_EVENTS", "DEFAULT_MAX_SAGAS", "SagaTracker", "TrackedSaga"]

# A tracker runs as long as its bus: what it keeps is bounded, as everything in a
# long-running process must be (at most max_sagas * max_events events).
DEFAULT_MAX_SAGAS = 10_000
DEFAULT_MAX_EVENTS = 1_000


@dataclass(slots=True)
class TrackedSaga:
    saga_id: str
    status: SagaStatus = SagaStatus.RUNNING
    events: list[Event] = field(default_factory=list)
    seen: set[str] = field(default_factory=set, repr=False)  # event ids, for redeliveries
    dropped: int = 0  # events past max_events: they moved the status, but are not kept


# Running, then compensating, then finished; the first final status seen stays.
_RANK = {
    SagaStatus.RUNNING: 0,
    SagaStatus.COMPENSATING: 1,
    SagaStatus.COMPLETED: 2,
    SagaStatus.COMPENSATED: 2,
    SagaStatus.FAILED: 2,
}


class SagaTracker:
    """Keeps each saga's events in arrival order, and its status.

    ``status_after`` maps event types to the status a saga has once that event
    is seen; other events leave the status as it was, and so do events that
    would move it back (a late event cannot reopen a finished saga). Events
    seen twice (same event id) are kept once. A choreography has no
    coordinator to ask, so this mapping is where its meaning lives.

    Bounded: it keeps up to ``max_sagas`` sagas (past that it forgets the one
    that finished first, or, when none has finished, the one seen first) and up
    to ``max_events`` events of each (later ones still move its status and are
    counted in ``dropped``; a redelivery of one may be counted twice). An event
    of a saga forgotten meanwhile starts it anew.
    """

    def __init__(
        self,
        status_after: Mapping[str, SagaStatus],
        *,
        max_sagas: int = DEFAULT_MAX_SAGAS,
        max_events: int = DEFAULT_MAX_EVENTS,
    ) -> None:
        for name, value in (("max_sagas", max_sagas), ("max_events", max_events)):
            if type(value) is not int or value < 1:
                raise DefinitionError(name, f"must be a whole number >= 1, got {value!r}")
        self._status_after = dict(status_after)
        self.max_sagas, self.max_events = max_sagas, max_events
        self.sagas: dict[str, TrackedSaga] = {}  # first seen first
        self._finished: dict[str, None] = {}  # finished first first
        self._subscription: Subscription | None = None

    async def attach(self, bus: EventBus) -> None:
        self._subscription = await bus.subscribe(ALL_EVENTS, self._on_event)

    async def detach(self) -> None:
        if self._subscription is not None:
            await self._subscription.cancel()
            self._subscription = None

    def forget(self, saga_id: str) -> None:
        """Drop what is kept of a saga (nothing happens if it is not kept)."""
        self.sagas.pop(saga_id, None)
        self._finished.pop(saga_id, None)

    async def _on_event(self, event: Event) -> None:
        saga = self.sagas.get(event.saga_id)
        if saga is None:
            if len(self.sagas) >= self.max_sagas:
                self._forget_one()
            saga = self.sagas[event.saga_id] = TrackedSaga(event.saga_id)
        if event.event_id in saga.seen:
            return  # a redelivery: at-least-once buses send some events twice
        if len(saga.events) < self.max_events:
            saga.seen.add(event.event_id)
            saga.events.append(event)
        else:
            saga.dropped += 1
        status = self._status_after.get(event.type)
        # A status only moves forward: a late or repeated event (at-least-once
        # buses redeliver, and a retried delivery may arrive after later
        # events) must not reopen a finished saga or undo a compensation.
        if status is not None and _RANK[status] > _RANK[saga.status]:
            saga.status = status
            if status.is_final:
                self._finished[saga.saga_id] = None
                if len(self._finished) > self.max_sagas:  # ids deleted from sagas by hand
                    self._finished = {s: None for s in self._finished if s in self.sagas}

    def _forget_one(self) -> None:
        # Ids forgotten by a caller deleting from ``sagas`` itself are skipped here.
        while self._finished:
            saga_id = next(iter(self._finished))
            del self._finished[saga_id]
            if saga_id in self.sagas:
                del self.sagas[saga_id]
                return
        if self.sagas:
            del self.sagas[next(iter(self.sagas))]

    def __getitem__(self, saga_id: str) -> TrackedSaga:
        return self.sagas[saga_id]
