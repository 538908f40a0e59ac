"""The demo's durability part: a worker killed in the middle of a saga, another finishing it.

Everything happens on an SQLite file in a temporary folder. A worker process
(``sagakit worker``) takes the saga recorded by ``Orchestrator.start`` and is
killed with SIGKILL while its second step is under way; once its lease
expires, a new worker (this process) claims the saga and carries it on from
its log. The timeline shows the interrupted step announced again as attempt 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text

from sagakit.core.records import StepStarted
from sagakit.core.saga import SagaDefinition, Step, StepContext
from sagakit.ports.saga_log import SagaLog

__all__ = ["SAGAS", "TRIP", "run_durability"]

LEASE_TTL = 1.0
SAGA_ID = "trip-durable"


async def book_flight(ctx: StepContext) -> dict[str, str]:
    return {"confirmation": "FL-301"}


async def book_hotel(ctx: StepContext) -> dict[str, str]:
    if ctx.attempt == 1:
        # The first worker is killed while it waits here for the hotel's answer.
        await asyncio.sleep(60)
    return {"confirmation": "HT-301"}


async def book_car(ctx: StepContext) -> dict[str, str]:
    return {"confirmation": "CR-301"}


async def cancel(ctx: StepContext) -> None:
    return None


TRIP = SagaDefinition(
    "durable-booking",
    [
        Step("book_flight", book_flight, cancel),
        Step("book_hotel", book_hotel, cancel),
        Step("book_car", book_car, cancel),
    ],
)
SAGAS = [TRIP]


def _worker(url: str, stderr: Path) -> subprocess.Popen[bytes]:
    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    with open(stderr, "wb") as err:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sagakit.cli",
                "worker",
                "--store",
                url,
                "--sagas",
                "sagakit.cli.demo_durable:SAGAS",
                "--owner",
                "worker-1",
                "--lease-ttl",
                str(LEASE_TTL),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


async def _wait_for_hotel(log: SagaLog, worker: subprocess.Popen[bytes]) -> bool:
    """Whether the worker got as far as starting the hotel step (within 30 s)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and worker.poll() is None:
        records = await log.read(SAGA_ID)
        if any(type(r) is StepStarted and r.step == 1 for r in records):
            return True
        await asyncio.sleep(0.05)
    return False


async def run_durability(console: Console) -> tuple[str, str, tuple[str, ...]]:
    """Run the scene; return the saga's id, final state and completed steps."""
    from sagakit.cli.sagas import timeline_table
    from sagakit.orchestration import Orchestrator

    with tempfile.TemporaryDirectory(prefix="sagakit-demo-") as folder:
        url = f"sqlite:///{folder}/sagas.db"
        console.print(Text("The saga log: an SQLite file in a temporary folder.", style="dim"))
        orchestrator = Orchestrator(url, sagas=SAGAS, owner="worker-2", lease_ttl=LEASE_TTL)
        try:
            await orchestrator.start(TRIP, SAGA_ID, {"traveller": "grace", "nights": 2})
            worker = _worker(url, Path(folder) / "worker-1.log")
            try:
                reached = await _wait_for_hotel(orchestrator.log, worker)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    worker.send_signal(signal.SIGKILL)
                worker.wait()
            if not reached:
                log = (Path(folder) / "worker-1.log").read_text(errors="replace")
                raise RuntimeError(f"worker-1 never reached book_hotel:\n{log[-2000:]}")
            console.print(
                Text("worker-1 took the saga and was killed (SIGKILL) while booking the hotel.")
            )
            console.print(
                Text(f"worker-2 claims it once worker-1's lease ({LEASE_TTL:.0f}s) expires...")
            )
            await asyncio.sleep(LEASE_TTL)
            await orchestrator.recover()
            outcome = await orchestrator.result(SAGA_ID, timeout=30)
            history = await orchestrator.log.history(SAGA_ID)
            # Without times: the demo prints the same thing every run.
            console.print(timeline_table(SAGA_ID, history, times=False))
            return SAGA_ID, str(outcome.state), tuple(outcome.completed_steps)
        finally:
            await orchestrator.close()
