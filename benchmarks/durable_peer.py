"""One side of the durable-saga benchmark, in a process of its own.

``python -m benchmarks.durable_peer sagakit URL COUNT IN_FLIGHT`` or
``python -m benchmarks.durable_peer dbos POSTGRES_URL COUNT IN_FLIGHT`` runs
COUNT 3-step sagas, IN_FLIGHT at a time, every third failing at its last step
(so two compensations run), and prints one JSON line: the timed region's wall
and CPU seconds, each saga's latency, and how the sagas ended.

A process per side and per measurement: DBOS is a process-wide singleton with
threads of its own, and a fresh process gives both sides the same cold start
(which stays outside the timed region: a short warm-up runs first).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

STEPS = ("reserve", "charge", "ship")
FAIL_EVERY = 3  # every third saga fails at its last step
WARM_UP = 20


class Refused(Exception):
    """The simulated failure of the last step."""


async def _timed(
    run_one: Callable[[str, bool], Awaitable[str]], prefix: str, count: int, in_flight: int
) -> dict[str, Any]:
    for i in range(WARM_UP):
        await run_one(f"warm-{prefix}-{i}", i % FAIL_EVERY == FAIL_EVERY - 1)
    latencies: list[float] = []
    states: Counter[str] = Counter()
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            begun = time.perf_counter()
            state = await run_one(f"{prefix}-{i}", i % FAIL_EVERY == FAIL_EVERY - 1)
            latencies.append(time.perf_counter() - begun)
            states[state] += 1

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return {
        "wall": time.perf_counter() - wall,
        "cpu": time.process_time() - cpu,
        "latencies": latencies,
        "states": dict(states),
    }


async def _sagakit(url: str, count: int, in_flight: int) -> dict[str, Any]:
    from sagakit import Orchestrator, SagaDefinition, Step, StepContext

    async def act(ctx: StepContext) -> int:
        if ctx.step == STEPS[-1] and ctx.data.get("fail"):
            raise Refused(ctx.saga_id)
        return 1

    async def undo(ctx: StepContext) -> None:
        return None

    saga = SagaDefinition("bench", [Step(name, act, undo) for name in STEPS])
    orchestrator = Orchestrator(url, sagas=[saga])

    async def run_one(saga_id: str, fail: bool) -> str:
        outcome = await orchestrator.run(saga, saga_id, {"fail": True} if fail else None)
        return str(outcome.state)

    try:
        return await _timed(run_one, uuid.uuid4().hex[:8], count, in_flight)
    finally:
        await orchestrator.close()


async def _dbos(url: str, count: int, in_flight: int) -> dict[str, Any]:
    from dbos import DBOS, DBOSConfig, SetWorkflowID

    config: DBOSConfig = {
        "name": "sagakit-bench",
        "system_database_url": url,
        "sys_db_pool_size": max(20, in_flight + 4),
        "log_level": "WARNING",
    }
    DBOS(config=config)

    @DBOS.step()
    async def act(name: str, fail: bool) -> int:
        if name == STEPS[-1] and fail:
            raise Refused(name)
        return 1

    @DBOS.step()
    async def undo(name: str) -> None:
        return None

    # The saga as DBOS users write it: a workflow of steps with a hand-written
    # list of undo calls, compensating newest first when a step fails.
    @DBOS.workflow()
    async def saga(fail: bool) -> str:
        done: list[str] = []
        try:
            for name in STEPS:
                await act(name, fail)
                done.append(name)
        except Refused:
            for name in reversed(done):
                await undo(name)
            return "compensated"
        return "completed"

    DBOS.launch()

    async def run_one(saga_id: str, fail: bool) -> str:
        with SetWorkflowID(saga_id):
            return await saga(fail)

    try:
        return await _timed(run_one, uuid.uuid4().hex[:8], count, in_flight)
    finally:
        DBOS.destroy()


def main(argv: list[str]) -> int:
    peer, url, count, in_flight = argv[0], argv[1], int(argv[2]), int(argv[3])
    body = _sagakit if peer == "sagakit" else _dbos
    result = asyncio.run(body(url, count, in_flight))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
