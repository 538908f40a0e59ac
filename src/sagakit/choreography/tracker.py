"""A tracker that follows every event on a bus and tells where each saga stands."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sagakit.core.event import Event
from sagakit.core.machine import SagaStatus
from sagakit.ports.event_bus import ALL_EVENTS, EventBus, Subscription

__all__ = ["SagaTracker", "TrackedSaga"]


@dataclass(slots=True)
class TrackedSaga:
    saga_id: str
    status: SagaStatus = SagaStatus.RUNNING
    events: list[Event] = field(default_factory=list)
    seen: set[str] = field(default_factory=set, repr=False)  # event ids, for redeliveries


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
    """

    def __init__(self, status_after: Mapping[str, SagaStatus]) -> None:
        self._status_after = dict(status_after)
        self.sagas: dict[str, TrackedSaga] = {}
        self._subscription: Subscription | None = None

    async def attach(self, bus: EventBus) -> None:
        self._subscription = await bus.subscribe(ALL_EVENTS, self._on_event)

    async def detach(self) -> None:
        if self._subscription is not None:
            await self._subscription.cancel()
            self._subscription = None

    async def _on_event(self, event: Event) -> None:
        saga = self.sagas.get(event.saga_id)
        if saga is None:
            saga = self.sagas[event.saga_id] = TrackedSaga(event.saga_id)
        if event.event_id in saga.seen:
            return  # a redelivery: at-least-once buses send some events twice
        saga.seen.add(event.event_id)
        saga.events.append(event)
        status = self._status_after.get(event.type)
        # A status only moves forward: a late or repeated event (at-least-once
        # buses redeliver, and a retried delivery may arrive after later
        # events) must not reopen a finished saga or undo a compensation.
        if status is not None and _RANK[status] > _RANK[saga.status]:
            saga.status = status

    def __getitem__(self, saga_id: str) -> TrackedSaga:
        return self.sagas[saga_id]
