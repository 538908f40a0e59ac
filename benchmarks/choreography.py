"""In-memory choreography: order sagas per second through the shop on the in-process bus.

The subject is :func:`sagakit.choreography.ecommerce.open_shop` on an
:class:`~sagakit.InMemoryEventBus`: every saga is three events
(``InventoryReserved -> PaymentCharged -> ShipmentCreated``, or for the third
told to fail ``InventoryReserved -> PaymentFailed -> InventoryReleased``), each
seen by the tracker too. The baseline is a bare pub/sub (a dict of lists of
async handlers, each awaiting the next publish) routing the same three events
per saga with the same failure branch, so the ratio is what sagakit's events,
bus and services add over the least in-process choreography can cost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from benchmarks.timing import BenchmarkError, Comparison, Config, Stopwatch, Timing, compare
from sagakit import InMemoryEventBus, SagaStatus
from sagakit.choreography.ecommerce import open_shop

__all__ = ["run"]

Handler = Callable[[str], Awaitable[None]]


def _saga_ids(count: int) -> tuple[list[str], set[str]]:
    saga_ids = [f"saga-{i}" for i in range(count)]
    return saga_ids, set(saga_ids[::3])


async def _shop(count: int) -> Timing:
    bus = InMemoryEventBus()
    shop = await open_shop(bus)
    # Every saga is checked at the end: the tracker keeps them all (10,000 by default).
    shop.tracker.max_sagas = max(count, shop.tracker.max_sagas)
    saga_ids, failing = _saga_ids(count)
    for saga_id in failing:
        shop.faults.fail(saga_id, "payment")
    order = shop.order
    clock = Stopwatch()
    for saga_id in saga_ids:
        await order(saga_id, "abc123", 1)
    # Orders only enqueue their first event; the choreography runs in drain().
    await bus.drain()
    elapsed = clock.stop()

    sagas = shop.tracker.sagas
    if bus.failures:
        raise BenchmarkError(f"{len(bus.failures)} handler failures, first: {bus.failures[0]}")
    if len(sagas) != count:
        raise BenchmarkError(f"tracker saw {len(sagas)} sagas of {count}")
    for saga_id, saga in sagas.items():
        expected = SagaStatus.COMPENSATED if saga_id in failing else SagaStatus.COMPLETED
        if saga.status is not expected or len(saga.events) != 3:
            raise BenchmarkError(
                f"saga {saga_id} ended {saga.status} after {len(saga.events)} events;"
                f" expected {expected} after 3"
            )
    await bus.close()
    return elapsed


class _BarePubSub:
    """The least a pub/sub can be: handlers called in turn, each awaited."""

    def __init__(self) -> None:
        self.handlers: dict[str, list[Handler]] = {}

    def subscribe(self, event_type: str, handler: Handler) -> None:
        self.handlers.setdefault(event_type, []).append(handler)

    async def publish(self, event_type: str, saga_id: str) -> None:
        for handler in self.handlers.get(event_type, ()):
            await handler(saga_id)


async def _bare(count: int) -> Timing:
    bus = _BarePubSub()
    saga_ids, failing = _saga_ids(count)
    status: dict[str, str] = {}

    async def charge(saga_id: str) -> None:
        await bus.publish("payment_failed" if saga_id in failing else "charged", saga_id)

    async def ship(saga_id: str) -> None:
        await bus.publish("shipped", saga_id)

    async def release(saga_id: str) -> None:
        await bus.publish("released", saga_id)

    async def completed(saga_id: str) -> None:
        status[saga_id] = "completed"

    async def compensated(saga_id: str) -> None:
        status[saga_id] = "compensated"

    bus.subscribe("reserved", charge)
    bus.subscribe("charged", ship)
    bus.subscribe("shipped", completed)
    bus.subscribe("payment_failed", release)
    bus.subscribe("released", compensated)

    publish = bus.publish
    clock = Stopwatch()
    for saga_id in saga_ids:
        await publish("reserved", saga_id)
    elapsed = clock.stop()

    if len(status) != count or sum(v == "compensated" for v in status.values()) != len(failing):
        raise BenchmarkError("the bare pub/sub loop lost sagas")
    return elapsed


def run(config: Config) -> list[Comparison]:
    count = config.size(20_000, 2_000)
    # Unmeasured first round: first-call costs fall on no one's clock.
    asyncio.run(_shop(300))
    asyncio.run(_bare(300))
    return [
        compare(
            config,
            key="choreography",
            title="choreography, in-memory bus",
            unit="sagas/s",
            size=count,
            subject=("open_shop on InMemoryEventBus", lambda: asyncio.run(_shop(count))),
            baseline=("bare dict-of-handlers pub/sub", lambda: asyncio.run(_bare(count))),
        )
    ]
