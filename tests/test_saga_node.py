"""The saga node and the node's entry point, in process: what the subprocess tests cannot see."""

from __future__ import annotations

import gc
import io
import json
import sys
from collections.abc import Iterator

import pytest

from sagakit.core.machine import SagaStarted
from sagakit.node import runner
from sagakit.node.host import Host
from sagakit.node.kinds import default_registry
from sagakit.node.saga_node import SagaNode


def execute(msg_id: int, saga_id: str, steps: list[str], **extra: object) -> dict[str, object]:
    body = {"type": "execute", "msg_id": msg_id, "saga_id": saga_id, "steps": steps, **extra}
    return {"src": "c", "dest": "saga", "body": body}


async def test_a_saga_told_to_fail_keeps_no_input_in_the_log() -> None:
    # The node keeps every saga's log for its whole life: the simulated failure
    # lives in the definition, so the log holds nothing per saga for it.
    out: list[str] = []
    host = Host(default_registry(), out.append)
    await host.dispatch(execute(1, "s1", ["a", "b", "c"], fail_step="b"))
    await host.dispatch(execute(2, "s2", ["a", "b", "c"]))
    node = host.nodes["saga"]
    assert isinstance(node, SagaNode)
    for saga_id in ("s1", "s2"):
        started = (await node.orchestrator.log.read(saga_id))[0]
        assert type(started) is SagaStarted
        assert dict(started.data) == {}
    bodies = [json.loads(line)["body"] for line in out]
    assert [b["type"] for b in bodies] == ["saga_compensated", "saga_completed"]
    assert bodies[0]["compensated_steps"] == ["a"]


async def test_a_long_step_list_builds_a_definition_only_for_each_failure_asked_for() -> None:
    out: list[str] = []
    host = Host(default_registry(), out.append)
    steps = [f"step-{i}" for i in range(SagaNode.MAX_CACHED_STEPS)]
    await host.dispatch(execute(1, "s1", steps, fail_step="step-7"))
    await host.dispatch(execute(2, "s2", steps, fail_step="step-7"))
    await host.dispatch(execute(3, "s3", steps))
    await host.dispatch(execute(4, "s4", steps, fail_step="nope"))
    node = host.nodes["saga"]
    assert isinstance(node, SagaNode)
    # One list of steps, built twice over: no failure, and a failure at step-7
    # (a fail_step naming no step runs the one failing nowhere, and is not kept).
    assert sorted(map(str, node._definitions[tuple(steps)])) == ["None", "step-7"]
    bodies = [json.loads(line)["body"] for line in out]
    assert [b["type"] for b in bodies] == [
        "saga_compensated",
        "saga_compensated",
        "saga_completed",
        "saga_completed",  # a fail_step naming no step fails nothing
    ]
    assert bodies[0]["compensated_steps"] == [f"step-{i}" for i in reversed(range(7))]
    assert bodies[3]["completed_steps"] == len(steps)


async def test_a_step_list_too_long_to_cache_is_built_per_request() -> None:
    out: list[str] = []
    host = Host(default_registry(), out.append)
    steps = [f"step-{i}" for i in range(SagaNode.MAX_CACHED_STEPS + 1)]
    await host.dispatch(execute(1, "s1", steps, fail_step="step-3"))
    await host.dispatch(execute(2, "s2", steps))
    node = host.nodes["saga"]
    assert isinstance(node, SagaNode)
    assert node._definitions == {}
    bodies = [json.loads(line)["body"] for line in out]
    assert bodies[0]["compensated_steps"] == ["step-2", "step-1", "step-0"]
    assert bodies[1]["completed_steps"] == len(steps)


@pytest.fixture
def collector_state() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    gc.enable()


@pytest.mark.usefixtures("collector_state")
def test_main_turns_the_collector_back_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # main.py turns the collector off while it imports; a node left without it
    # would never free a reference cycle.
    line = json.dumps(execute(1, "s1", ["a", "b"])) + "\n"
    stdin = io.TextIOWrapper(io.BytesIO(line.encode()))
    stdout = io.TextIOWrapper(io.BytesIO())
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", stdout)
    gc.disable()
    assert runner.main() == 0
    assert gc.isenabled()
    reply = json.loads(stdout.buffer.getvalue())  # type: ignore[attr-defined]
    assert reply["body"]["type"] == "saga_completed"
