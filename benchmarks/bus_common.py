"""What the event-bus benchmarks share: the choreography driven on a bus, the raw chains.

The subject of every ``bus_*`` benchmark is the e-commerce choreography of
:mod:`sagakit.choreography.ecommerce` (Inventory, Payment, Shipping and the
tracker) on one backend's bus: every saga is three events
(``InventoryReserved -> PaymentCharged -> ShipmentCreated``, or for every
third, told to fail, ``InventoryReserved -> PaymentFailed ->
InventoryReleased``). A saga's latency runs from its order to the tracker
seeing its final event. With ``in flight`` N, N orders are outstanding at
every moment: each finished saga starts the next order.

Each backend module supplies its bus (URL, options, clean-up) and its raw
baselines; :func:`chains` runs the "N round-trip chains at once" shape those
baselines share, and :func:`versus` makes a table row of two such runs.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

from benchmarks.timing import BenchmarkError, Comparison, Config, Stopwatch, Timing, compare
from sagakit.choreography.ecommerce import STATUS_AFTER, Faults, Inventory, Payment, Shipping
from sagakit.choreography.tracker import DEFAULT_MAX_SAGAS, SagaTracker
from sagakit.core.event import Event
from sagakit.core.machine import SagaStatus
from sagakit.ports.event_bus import EventBus

__all__ = ["GOAL", "Run", "chains", "private_server", "shop", "versus", "warm_up"]

GOAL = 0.5  # issue 8: at least half the raw round trip's rate, at 1 and at 64 in flight

# One measurement: (sagas, in flight) -> its timing, run in a fresh event loop.
Run = Callable[[int, int], Coroutine[Any, Any, Timing]]


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
        # Every saga is checked at the end: kept, however many (10,000 by default).
        super().__init__(STATUS_AFTER, max_sagas=max(orders.count, DEFAULT_MAX_SAGAS))
        self.orders = orders

    async def _on_event(self, event: Event) -> None:
        before = self.sagas.get(event.saga_id)
        was_final = before is not None and before.status.is_final
        await super()._on_event(event)
        if not was_final and self.sagas[event.saga_id].status.is_final:
            self.orders.finished(event.saga_id)


async def shop(bus: EventBus, count: int, in_flight: int, *, per_saga: float = 0.02) -> Timing:
    """Run ``count`` sagas of the choreography on ``bus``, ``in_flight`` at a time, and check
    that each ended as told. The caller closes the bus (and clears what it left)."""
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
    async with asyncio.timeout(60 + count * per_saga):
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
    return Timing(elapsed.wall, elapsed.cpu, orders.latencies)


async def chains(
    count: int,
    in_flight: int,
    saga: Callable[[int, int], Awaitable[None]],
    *,
    per_saga: float = 0.02,
) -> Timing:
    """``in_flight`` lanes at once, each running its share of ``count`` sagas in sequence;
    ``saga(lane, k)`` is one saga's three round trips, timed as its latency."""
    latencies: list[float] = []

    async def lane(number: int, sagas: int) -> None:
        for k in range(sagas):
            start = time.perf_counter()
            await saga(number, k)
            latencies.append(time.perf_counter() - start)

    share, extra = divmod(count, in_flight)
    clock = Stopwatch()
    async with asyncio.timeout(60 + count * per_saga):
        await asyncio.gather(*(lane(i, share + (i < extra)) for i in range(in_flight)))
    elapsed = clock.stop()
    if len(latencies) != count:
        raise BenchmarkError(f"the raw round trips finished {len(latencies)} of {count}")
    return Timing(elapsed.wall, elapsed.cpu, latencies)


def warm_up(*runs: Run, count: int = 60, in_flight: int = 8) -> None:
    """An unmeasured first round: connections and first-call costs fall on no clock."""
    for run in runs:
        asyncio.run(run(count, in_flight))


def versus(
    config: Config,
    *,
    key: str,
    title: str,
    count: int,
    in_flight: int,
    subject: tuple[str, Run],
    baseline: tuple[str, Run],
    goal: float | None = None,
) -> Comparison:
    """One table row: ``subject`` against ``baseline``, each on ``count`` sagas."""
    return compare(
        config,
        key=key,
        title=title,
        unit="sagas/s",
        size=count,
        subject=(subject[0], lambda: asyncio.run(subject[1](count, in_flight))),
        baseline=(baseline[0], lambda: asyncio.run(baseline[1](count, in_flight))),
        goal=goal,
    )


@contextmanager
def private_server(
    name: str,
    command: Callable[[int, str], list[str]],
    ready: Callable[[socket.socket], bool],
) -> Iterator[int]:
    """A server process of this run on a free loopback port (yielded), its files in a
    temporary directory: ``command(port, directory)`` starts it, ``ready(sock)`` tells
    that it takes clients."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix=f"sagakit-bench-{name}-") as directory:
        process = subprocess.Popen(
            command(port, directory), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                        if ready(sock):
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or process.poll() is not None:
                    raise BenchmarkError(f"the private {name} did not start")
                time.sleep(0.02)
            yield port
        finally:
            process.terminate()
            process.wait(timeout=10)
