"""The choreography on RabbitMQ against a bare aio-pika round trip on the same server.

The subject (see :mod:`benchmarks.bus_common`) runs on an
:class:`~sagakit.adapters.amqp_bus.AmqpEventBus`: each event is published with
a publisher confirm, consumed from its service's quorum queue and from the
tracker's queue, and acknowledged.

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
from contextlib import suppress

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from benchmarks.bus_common import GOAL, chains, shop, versus, warm_up
from benchmarks.timing import BenchmarkError, Comparison, Config, Timing
from sagakit.adapters.amqp_bus import AmqpEventBus

__all__ = ["run"]

PER_SAGA = 0.05  # seconds a saga may take before a run counts as hung
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
    try:
        return await shop(bus, count, in_flight, per_saga=PER_SAGA)
    finally:
        queues = [c.queue_name for c in bus._consumers] + [c.dlq_name for c in bus._consumers]
        await bus.close()
        await _delete(prefix, sorted(set(queues)))


async def _raw(count: int, in_flight: int) -> Timing:
    prefix = f"rawbench{os.urandom(4).hex()}"
    queues = [f"{prefix}.{step}" for step in range(3)]
    connection = await aio_pika.connect(URL)
    loop = asyncio.get_running_loop()
    waiting: dict[str, asyncio.Future[None]] = {}

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

        async def saga(lane: int, k: int) -> None:
            key = f"{lane}-{k}"
            for name in queues:
                arrived = waiting[key] = loop.create_future()
                await exchange.publish(
                    aio_pika.Message(
                        BODY,
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        correlation_id=key,
                    ),
                    routing_key=name,
                )
                await arrived

        return await chains(count, in_flight, saga, per_saga=PER_SAGA)
    finally:
        await connection.close()
        await _delete(prefix, queues)


def run(config: Config) -> list[Comparison]:
    # Unmeasured first round: connections, declarations and first calls fall on no clock.
    try:
        warm_up(_shop, count=30)
    except OSError as exc:
        raise BenchmarkError(f"no RabbitMQ at {URL}: {exc}") from exc
    warm_up(_raw, count=30)
    results = []
    for in_flight, full, quick in ((1, 500, 60), (64, 5_000, 640)):
        results.append(
            versus(
                config,
                key=f"bus_amqp_{in_flight}",
                title=f"choreography on RabbitMQ, {in_flight} in flight",
                count=config.size(full, quick),
                in_flight=in_flight,
                subject=("open shop on AmqpEventBus", _shop),
                baseline=("aio-pika publish+confirm, consume, ack x3", _raw),
                goal=GOAL,
            )
        )
    return results
