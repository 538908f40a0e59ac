"""The choreography on RabbitMQ against a bare aio-pika round trip on the same server.

The subject is the e-commerce choreography of
:mod:`sagakit.choreography.ecommerce` (Inventory, Payment, Shipping and the
tracker) on an :class:`~sagakit.adapters.amqp_bus.AmqpEventBus`: every saga is
three events (``InventoryReserved -> PaymentCharged -> ShipmentCreated``, or
for every third, told to fail, ``InventoryReserved -> PaymentFailed ->
InventoryReleased``), each published with a publisher confirm, consumed from
its service's quorum queue and from the tracker's queue, and acknowledged. A
saga's latency runs from its order to the tracker seeing its final event. With
``in flight`` N, N orders are outstanding at every moment: each finished saga
starts the next order.

The baseline is the least a three-step choreography must do on RabbitMQ,
through aio-pika with no sagakit code: per saga, three times in sequence,
publish a persistent event to a quorum queue and await its confirm, receive it
on that queue's consumer, acknowledge it. With N in flight, N such chains run
at once on one connection (one confirming channel, a consumer per step).

The server is this machine's RabbitMQ (``SAGAKIT_BENCH_AMQP_URL``, else
``SAGAKIT_TEST_AMQP_URL``, else ``amqp://guest:guest@127.0.0.1:5672/``). Goal
(issue 8): at least 50% of the baseline's rate, at 1 and at 64 in flight.
"""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import suppress

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from benchmarks.timing import BenchmarkError, Comparison, Config, Stopwatch, Timing, compare
from sagakit.adapters.amqp_bus import AmqpEventBus
from sagakit.choreography.ecommerce import STATUS_AFTER, Faults, Inventory, Payment, Shipping
from sagakit.choreography.tracker import SagaTracker
from sagakit.core.event import Event
from sagakit.core.machine import SagaStatus

__all__ = ["run"]

GOAL = 0.5
URL = (
    os.environ.get("SAGAKIT_BENCH_AMQP_URL")
    or os.environ.get("SAGAKIT_TEST_AMQP_URL")
    or "amqp://guest:guest@127.0.0.1:5672/"
)
BODY = (
    b'{"v":1,"id":"0123456789abcdef0123456789abcdef","type":"InventoryReserved",'
    b'"saga_id":"saga-0","payload":{"reservation_id":"r1","sku":"abc123","quantity":1},'
    b'"time":1700000000,"source":"inventory","headers":{}}'
)


class _Orders:
    """Keeps ``in_flight`` orders outstanding until ``count`` sagas have ended."""

    def __init__(self, inventory: Inventory, count: int) -> None:
        self.inventory, self.count = inventory, count
        self.started: dict[str, float] = {}
        self.latencies: list[float] = []
        self.done = asyncio.Event()
        self.tasks: set[asyncio.Task[object]] = set()
        self.next = 0

    def start(self) -> None:
        if self.next < self.count:
            saga_id = f"saga-{self.next}"
            self.next += 1
            self.started[saga_id] = time.perf_counter()
            task = asyncio.get_running_loop().create_task(
                self.inventory.reserve(saga_id, "abc123", 1)
            )
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def finished(self, saga_id: str) -> None:
        self.latencies.append(time.perf_counter() - self.started[saga_id])
        if len(self.latencies) == self.count:
            self.done.set()
        self.start()


class _Tracker(SagaTracker):
    def __init__(self, orders: _Orders) -> None:
        super().__init__(STATUS_AFTER)
        self.orders = orders

    async def _on_event(self, event: Event) -> None:
        before = self.sagas.get(event.saga_id)
        was_final = before is not None and before.status.is_final
        await super()._on_event(event)
        if not was_final and self.sagas[event.saga_id].status.is_final:
            self.orders.finished(event.saga_id)


async def _delete(prefix: str, queues: list[str]) -> None:
    # Each measurement leaves nothing behind: none pays for an earlier one's queues.
    connection = await aio_pika.connect(URL)
    try:
        for name in queues:
            channel = await connection.channel()
            with suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(name)
            if not channel.is_closed:
                await channel.close()
        channel = await connection.channel()
        await channel.exchange_delete(f"{prefix}.events")
    finally:
        await connection.close()


async def _shop(count: int, in_flight: int) -> Timing:
    prefix = f"bench{os.urandom(4).hex()}"
    bus = AmqpEventBus(f"{URL}?prefix={prefix}&prefetch={max(64, 2 * in_flight)}")
    faults = Faults()
    inventory = Inventory(None, faults)
    orders = _Orders(inventory, count)
    tracker = _Tracker(orders)
    await tracker.attach(bus)
    for service in (inventory, Payment(faults=faults), Shipping(faults)):
        await service.attach(bus)
    queues = [c.queue_name for c in bus._consumers] + [c.dlq_name for c in bus._consumers]
    failing = {f"saga-{i}" for i in range(0, count, 3)}
    for saga_id in failing:
        faults.fail(saga_id, "payment")
    try:
        clock = Stopwatch()
        for _ in range(in_flight):
            orders.start()
        async with asyncio.timeout(60 + count / 20):
            await orders.done.wait()
        elapsed = clock.stop()
        for saga_id, saga in tracker.sagas.items():
            expected = SagaStatus.COMPENSATED if saga_id in failing else SagaStatus.COMPLETED
            if saga.status is not expected or len(saga.events) != 3:
                raise BenchmarkError(
                    f"saga {saga_id} ended {saga.status} after {len(saga.events)} events;"
                    f" expected {expected} after 3"
                )
    finally:
        await bus.close()
        await _delete(prefix, sorted(set(queues)))
    return Timing(elapsed.wall, elapsed.cpu, orders.latencies)


async def _raw(count: int, in_flight: int) -> Timing:
    prefix = f"rawbench{os.urandom(4).hex()}"
    queues = [f"{prefix}.{step}" for step in range(3)]
    connection = await aio_pika.connect(URL)
    loop = asyncio.get_running_loop()
    waiting: dict[str, asyncio.Future[None]] = {}
    latencies: list[float] = []

    async def received(message: AbstractIncomingMessage) -> None:
        await message.ack()
        waiting.pop(message.correlation_id or "").set_result(None)

    try:
        publisher = await connection.channel(publisher_confirms=True)
        for name in queues:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=max(64, 2 * in_flight))
            queue = await channel.declare_queue(
                name, durable=True, arguments={"x-queue-type": "quorum"}
            )
            await queue.consume(received)
        exchange = publisher.default_exchange

        async def chain(lane: int, sagas: int) -> None:
            for k in range(sagas):
                saga = f"{lane}-{k}"
                start = time.perf_counter()
                for name in queues:
                    arrived = waiting[saga] = loop.create_future()
                    await exchange.publish(
                        aio_pika.Message(
                            BODY,
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            correlation_id=saga,
                        ),
                        routing_key=name,
                    )
                    await arrived
                latencies.append(time.perf_counter() - start)

        share, extra = divmod(count, in_flight)
        clock = Stopwatch()
        async with asyncio.timeout(60 + count / 20):
            await asyncio.gather(*(chain(i, share + (i < extra)) for i in range(in_flight)))
        elapsed = clock.stop()
    finally:
        await connection.close()
        await _delete(prefix, queues)
    if len(latencies) != count:
        raise BenchmarkError(f"the raw round trips finished {len(latencies)} of {count}")
    return Timing(elapsed.wall, elapsed.cpu, latencies)


def run(config: Config) -> list[Comparison]:
    # Unmeasured first round: connections, declarations and first calls fall on no clock.
    try:
        asyncio.run(_shop(30, 8))
    except OSError as exc:
        raise BenchmarkError(f"no RabbitMQ at {URL}: {exc}") from exc
    asyncio.run(_raw(30, 8))
    results = []
    for in_flight, full, quick in ((1, 500, 60), (64, 5_000, 640)):
        count = config.size(full, quick)
        results.append(
            compare(
                config,
                key=f"bus_amqp_{in_flight}",
                title=f"choreography on RabbitMQ, {in_flight} in flight",
                unit="sagas/s",
                size=count,
                subject=(
                    "open shop on AmqpEventBus",
                    lambda n=in_flight, c=count: asyncio.run(_shop(c, n)),
                ),
                baseline=(
                    "aio-pika publish+confirm, consume, ack x3",
                    lambda n=in_flight, c=count: asyncio.run(_raw(c, n)),
                ),
                goal=GOAL,
            )
        )
    return results
