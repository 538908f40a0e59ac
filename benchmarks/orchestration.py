"""In-memory orchestration: 3-step sagas per second through ``sagakit.Orchestrator``.

The floor is a bare asyncio loop that awaits, per saga, three coroutines that
each yield to the event loop once: the least an async 3-step saga can cost.
Both run through the same driver (:func:`_drive`), so the harness's own
overhead is the same on either side of the ratio.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from benchmarks.timing import BenchmarkError, Comparison, Config, Stopwatch, Timing, compare
from sagakit import Orchestrator, SagaDefinition, SagaStatus, Step, StepContext

__all__ = ["run"]

GOAL = 0.25
IN_FLIGHT = 64


async def _book(ctx: StepContext) -> int:
    # A small result, so the orchestrator's result bookkeeping is exercised.
    return 1


async def _cancel(ctx: StepContext) -> None:
    return None


SAGA = SagaDefinition("bench", [Step(name, _book, _cancel) for name in ("a", "b", "c")])


async def _drive(
    run_one: Callable[[str], Awaitable[Any]], saga_ids: list[str], in_flight: int
) -> tuple[Timing, list[Any]]:
    """Run every saga id through ``run_one``, ``in_flight`` at a time; time it.

    Concurrency is batches of ``gather``: each saga is its own task, as it would
    be in a service handling concurrent requests.
    """
    results: list[Any] = []
    clock = Stopwatch()
    if in_flight == 1:
        append = results.append
        for saga_id in saga_ids:
            append(await run_one(saga_id))
    else:
        for start in range(0, len(saga_ids), in_flight):
            batch = saga_ids[start : start + in_flight]
            results.extend(await asyncio.gather(*(run_one(saga_id) for saga_id in batch)))
    return clock.stop(), results


async def _orchestrated(count: int, in_flight: int) -> Timing:
    # A fresh orchestrator (and in-memory log) per measurement: a log grown by
    # earlier repeats would make later ones pay for a bigger heap.
    orchestrator = Orchestrator()
    saga_ids = [f"saga-{i}" for i in range(count)]

    def run_one(saga_id: str) -> Awaitable[Any]:
        return orchestrator.run(SAGA, saga_id)

    elapsed, outcomes = await _drive(run_one, saga_ids, in_flight)
    done = sum(1 for outcome in outcomes if outcome.state is SagaStatus.COMPLETED)
    unfinished = await orchestrator.list(
        status=[SagaStatus.RUNNING, SagaStatus.COMPENSATING], limit=1
    )
    if done != count or unfinished:
        raise BenchmarkError(f"orchestrator completed {done} of {count} sagas")
    return elapsed


async def _yield_once() -> None:
    await asyncio.sleep(0)


async def _floor_saga(saga_id: str) -> str:
    await _yield_once()
    await _yield_once()
    await _yield_once()
    return saga_id


async def _floor(count: int, in_flight: int) -> Timing:
    saga_ids = [f"saga-{i}" for i in range(count)]
    elapsed, results = await _drive(_floor_saga, saga_ids, in_flight)
    if len(results) != count:
        raise BenchmarkError(f"floor loop finished {len(results)} of {count} sagas")
    return elapsed


def _measure(
    body: Callable[[int, int], Coroutine[Any, Any, Timing]], count: int, in_flight: int
) -> Callable[[], Timing]:
    # asyncio.run per measurement: each starts on a fresh event loop.
    return lambda: asyncio.run(body(count, in_flight))


def run(config: Config) -> list[Comparison]:
    count = config.size(20_000, 2_000)
    # One short unmeasured round of each, so first-call costs (imports, caches)
    # fall on no one's clock.
    asyncio.run(_orchestrated(200, IN_FLIGHT))
    asyncio.run(_floor(200, IN_FLIGHT))
    return [
        compare(
            config,
            key=key,
            title=f"orchestration, {label}",
            unit="sagas/s",
            size=count,
            subject=("Orchestrator.run", _measure(_orchestrated, count, in_flight)),
            baseline=("3x await asyncio.sleep(0)", _measure(_floor, count, in_flight)),
            goal=GOAL,
        )
        for key, label, in_flight in (
            ("orchestration-seq", "sequential", 1),
            (f"orchestration-{IN_FLIGHT}", f"{IN_FLIGHT} in flight", IN_FLIGHT),
        )
    ]
