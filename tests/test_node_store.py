"""``python3 main.py --store sqlite:///path``: the saga node's log outlives the process."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from sagakit.adapters.sqlite_log import SQLiteSagaLog
from sagakit.core.records import (
    SagaFinished,
    SagaRecord,
    SagaStarted,
    SagaStatus,
    StepCompleted,
    StepStarted,
)
from sagakit.core.saga import NO_INPUT
from sagakit.node.runner import UsageError, parse_settings
from sagakit.ports.saga_log import LoggedRecord, SagaSummary
from tests.test_node import MAIN, REPO, execute, run_node


def test_a_restarted_node_answers_a_repeated_execute_from_the_file(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'sagas.db'}"
    first = run_node(execute(1, "s", ["a", "b"], fail_step="b"), [*MAIN, "--store", store])
    assert first.code == 0, first.stderr
    assert first.reply(1)["compensated_steps"] == ["a"]
    # A new process on the same file: the record answers, whatever fail_step now says.
    again = run_node(
        execute(2, "s", ["a", "b"]) + execute(3, "s", ["a", "c"]) + execute(4, "t", ["a"]),
        [*MAIN, "--store", store],
    )
    assert again.code == 0, again.stderr
    assert again.reply(2) | {"in_reply_to": 1} == first.reply(1)
    assert (again.reply(3)["type"], again.reply(3)["code"]) == ("error", 22)
    assert again.reply(4)["type"] == "saga_completed"


def test_a_store_that_cannot_be_opened_stops_the_node_at_once(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.db"
    foreign.write_text("not a database")
    for store in (f"sqlite:///{foreign}", "nosuch://x", f"sqlite:///{tmp_path}/no/dir/x.db"):
        proc = subprocess.run(
            [*MAIN, "--store", store],
            input=execute(1, "s", ["a"]).encode(),
            capture_output=True,
            timeout=20,
            cwd=REPO,
        )
        assert proc.returncode == 2, (store, proc.stderr)
        assert proc.stdout == b""
        err = proc.stderr.decode()
        assert "cannot serve" in err
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err


# --- a saga left in flight by a dead node ---------------------------------------------
# The node leases each saga it runs for 30 s (the orchestrator's default) and
# renews it every 10 s while it runs. A node killed mid-saga leaves the saga
# running in the file, leased to it. The same node restarted (the same owner:
# its node id, or "saga" before an init, @ the host) takes the saga over at
# once; another node asked to execute that saga id waits for the lease to run
# out. Either claims the saga and carries it on: the step that was started and
# never finished runs again, as attempt 2.

NODE_LEASE = 30.0  # the lease the node takes (Orchestrator's DEFAULT_LEASE_TTL)


def _plant_in_flight(
    db: Path,
    saga_id: str,
    steps: tuple[str, ...],
    *,
    lease_left: float,
    owner: str = "dead-node",
) -> float:
    """Record ``saga_id`` as a node that died mid-saga would have left it: the first step
    completed, the second started and not finished, under a 30 s lease of ``owner``
    that has ``lease_left`` seconds to go (negative: expired that long ago).

    The records are those the node writes for ``steps`` (its definition is named
    "execute", its input empty), so their fingerprint is the node's. Returns the
    lease's expiry, on the log's clock (the wall clock, as the node's).
    """
    # The dead node started the saga NODE_LEASE - lease_left seconds ago.
    ago = NODE_LEASE - lease_left

    async def plant() -> float:
        log = SQLiteSagaLog(db, clock=lambda: time.time() - ago)
        try:
            opening = [SagaStarted("execute", steps, NO_INPUT), StepStarted(0)]
            journal = await log.create(saga_id, opening, owner=owner, ttl=NODE_LEASE)
            assert journal is not None
            assert journal.lease is not None
            journal.stage([StepCompleted(0), StepStarted(1)])
            await journal.flush()
            return journal.lease.expires_at
        finally:
            await log.close()

    return asyncio.run(plant())


def _history(db: Path, saga_id: str) -> list[LoggedRecord]:
    async def read() -> list[LoggedRecord]:
        log = SQLiteSagaLog(db)
        try:
            return await log.history(saga_id)
        finally:
            await log.close()

    return asyncio.run(read())


def _summary(db: Path, saga_id: str) -> SagaSummary | None:
    async def read() -> SagaSummary | None:
        log = SQLiteSagaLog(db)
        try:
            return await log.status(saga_id)
        finally:
            await log.close()

    return asyncio.run(read())


def _records(history: list[LoggedRecord]) -> list[SagaRecord]:
    return [entry.record for entry in history]


@pytest.mark.parametrize(
    ("fail_step", "reply"),
    [
        (None, {"type": "saga_completed", "state": "completed", "completed_steps": 3}),
        # The step in flight fails on its second attempt: the first step is undone.
        ("b", {"type": "saga_compensated", "state": "compensated", "compensated_steps": ["a"]}),
        (
            "c",
            {"type": "saga_compensated", "state": "compensated", "compensated_steps": ["b", "a"]},
        ),
    ],
)
def test_a_node_waits_out_a_dead_nodes_lease_then_takes_its_saga_over(
    tmp_path: Path, fail_step: str | None, reply: dict[str, Any]
) -> None:
    db = tmp_path / "sagas.db"
    expires_at = _plant_in_flight(db, "s", ("a", "b", "c"), lease_left=2.0)
    extra = {} if fail_step is None else {"fail_step": fail_step}
    began = time.time()
    run = run_node(
        execute(1, "s", ["a", "b", "c"], **extra) + execute(2, "t", ["a"]),
        [*MAIN, "--store", f"sqlite:///{db}"],
    )
    took = time.time() - began
    assert run.code == 0, run.stderr
    assert run.reply(1) == {"in_reply_to": 1, "saga_id": "s", **reply}

    history = _history(db, "s")
    records = _records(history)
    # What the dead node wrote is kept as it was; the takeover goes on from there.
    assert records[:4] == [
        SagaStarted("execute", ("a", "b", "c"), {}),
        StepStarted(0),
        StepCompleted(0),
        StepStarted(1),
    ]
    assert records[4] == StepStarted(1, attempt=2)
    assert [r for r in records if type(r) is StepStarted and r.attempt > 1] == [records[4]]
    assert records[-1] == SagaFinished(SagaStatus(reply["state"]))
    # It waited for the lease, on the log's clock (the one that decides expiry),
    # and took the saga over within a few of its polls (1 s apart) after that.
    takeover = history[4].recorded_at
    assert expires_at <= takeover < expires_at + 5.0
    assert took >= expires_at - began
    summary = _summary(db, "s")
    assert summary is not None
    assert (summary.status, summary.owner) == (SagaStatus(reply["state"]), None)
    # Messages are served in order: the request after the waiting one waited too.
    assert [body["in_reply_to"] for body in run.replies()] == [1, 2]
    assert run.reply(2)["type"] == "saga_completed"
    assert _history(db, "t")[0].recorded_at >= takeover


def test_a_dead_nodes_expired_lease_is_taken_over_at_once(tmp_path: Path) -> None:
    db = tmp_path / "sagas.db"
    # The node died a minute ago: its 30 s lease ran out 30 s ago.
    expires_at = _plant_in_flight(db, "s", ("a", "b", "c"), lease_left=-30.0)
    began = time.time()
    run = run_node(execute(1, "s", ["a", "b", "c"]), [*MAIN, "--store", f"sqlite:///{db}"])
    assert run.code == 0, run.stderr
    assert run.reply(1)["type"] == "saga_completed"
    assert run.reply(1)["completed_steps"] == 3
    history = _history(db, "s")
    assert history[4].record == StepStarted(1, attempt=2)
    assert history[4].recorded_at > expires_at + 29
    # No wait: the takeover came as soon as the node was up (a bound generous for a
    # slow machine, and far below the 30 s a lease taken for live would hold it).
    assert history[4].recorded_at - began < 5.0


def _init(node_id: str) -> str:
    body = {"type": "init", "msg_id": 0, "node_id": node_id, "node_ids": [node_id]}
    return json.dumps({"src": "c0", "dest": "saga", "body": body}) + "\n"


HOST = socket.gethostname()


@pytest.mark.parametrize(
    ("owner", "before", "options"),
    [
        (f"saga@{HOST}", "", []),  # no init: the node's name
        (f"n1@{HOST}", _init("n1"), []),
        ("blue", _init("n1"), ["--owner", "blue"]),
    ],
)
def test_the_same_node_restarted_takes_its_own_saga_over_at_once(
    tmp_path: Path, owner: str, before: str, options: list[str]
) -> None:
    db = tmp_path / "sagas.db"
    # The lease the dead node took is live for another 25 s: it is the node's own.
    _plant_in_flight(db, "s", ("a", "b", "c"), lease_left=25.0, owner=owner)
    began = time.time()
    run = run_node(
        before + execute(1, "s", ["a", "b", "c"]), [*MAIN, "--store", f"sqlite:///{db}", *options]
    )
    assert run.code == 0, run.stderr
    assert run.reply(1)["type"] == "saga_completed"
    history = _history(db, "s")
    assert history[4].record == StepStarted(1, attempt=2)
    assert history[4].recorded_at - began < 5.0  # far below the 25 s left
    summary = _summary(db, "s")
    assert summary is not None
    assert (summary.status, summary.owner) == (SagaStatus.COMPLETED, None)


def test_another_node_on_the_host_does_not_take_a_live_lease(tmp_path: Path) -> None:
    db = tmp_path / "sagas.db"
    # n2's live lease; this node is n1, so it waits: a conflicting step list shows it
    # (answered at once, the saga left as it was) without the test waiting 25 s.
    _plant_in_flight(db, "s", ("a", "b", "c"), lease_left=25.0, owner=f"n2@{HOST}")
    before = _history(db, "s")
    run = run_node(
        _init("n1") + execute(1, "s", ["a", "b"]) + execute(2, "t", ["a"]),
        [*MAIN, "--store", f"sqlite:///{db}"],
    )
    assert run.code == 0, run.stderr
    assert (run.reply(1)["type"], run.reply(1)["code"]) == ("error", 22)
    assert _history(db, "s") == before
    summary = _summary(db, "t")
    assert summary is not None
    history = _history(db, "t")
    assert history[-1].record == SagaFinished(SagaStatus.COMPLETED)


@pytest.mark.parametrize(
    ("argv", "environ"),
    [(["--owner", "x" * 1025], {}), ([], {"SAGAKIT_OWNER": "é" * 513})],
)
def test_an_owner_no_store_can_keep_is_refused_at_start(
    argv: list[str], environ: dict[str, str]
) -> None:
    with pytest.raises(UsageError, match=r"(?i)owner must be text without NUL, at most 1,024"):
        parse_settings(argv, environ)


def test_a_saga_in_flight_under_another_step_list_is_a_conflict_at_once(
    tmp_path: Path,
) -> None:
    db = tmp_path / "sagas.db"
    # The dead node's lease is live for another 25 s: a conflict is answered
    # without waiting for it, and leaves the saga as it was.
    _plant_in_flight(db, "s", ("a", "b", "c"), lease_left=25.0)
    before = _history(db, "s")
    run = run_node(
        execute(1, "s", ["a", "b"]) + execute(2, "s", ["a", "c", "b"]) + execute(3, "t", ["a"]),
        [*MAIN, "--store", f"sqlite:///{db}"],
    )
    assert run.code == 0, run.stderr
    for msg_id in (1, 2):
        body = run.reply(msg_id)
        assert (body["type"], body["code"], body["saga_id"]) == ("error", 22, "s"), body
    assert run.reply(3)["type"] == "saga_completed"
    assert _history(db, "s") == before
    summary = _summary(db, "s")
    assert summary is not None
    assert (summary.status, summary.owner) == (SagaStatus.RUNNING, "dead-node")


def test_a_killed_nodes_saga_is_carried_on_by_the_next_node(tmp_path: Path) -> None:
    """A real kill: a node SIGKILLed in the middle of a saga, and a new node on its file.

    The node's steps are instant, so the saga is made long (20,000 steps, about two
    seconds) and the node killed as soon as the log shows it running. The file is
    opened with ``synchronous=normal``: safe against a killed process, which is all
    this test does to it, and fast on any disk. The dead node's lease has 30 s to
    run, but the new node is the same node (the same owner): it takes the saga over
    at once. The waiting of another node is shown by the tests above.
    """
    db = tmp_path / "sagas.db"
    store = f"sqlite:///{db}?synchronous=normal"
    steps = [f"step-{i}" for i in range(20_000)]
    request = execute(1, "big", steps)
    # The schema is made by a node first, so that the test's reads never race to make it.
    assert run_node("", [*MAIN, "--store", store]).code == 0

    # The with closes its stdin and waits for it, however the test leaves.
    with subprocess.Popen(
        [*MAIN, "--store", store],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    ) as node:
        try:
            assert node.stdin is not None
            node.stdin.write(request.encode())
            node.stdin.flush()
            deadline = time.monotonic() + 30
            while _summary(db, "big") is None:
                assert time.monotonic() < deadline, "the node never started the saga"
                assert node.poll() is None, "the node stopped by itself"
                time.sleep(0.002)
        finally:
            node.kill()
    killed = _summary(db, "big")
    assert killed is not None
    assert killed.status is SagaStatus.RUNNING, "the saga ended before the kill"
    assert killed.owner is not None
    assert killed.lease_expires_at == pytest.approx(killed.created_at + NODE_LEASE, abs=1e-3)
    left = _records(_history(db, "big"))
    # Every flush leaves the log at a step's intent: the step in flight at the kill.
    in_flight = left[-1]
    assert type(in_flight) is StepStarted
    assert in_flight.attempt == 1

    assert killed.owner == f"saga@{HOST}"
    began = time.time()
    proc = subprocess.run(
        [*MAIN, "--store", store],
        input=request.encode(),
        capture_output=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["body"] == {
        "type": "saga_completed",
        "in_reply_to": 1,
        "saga_id": "big",
        "state": "completed",
        "completed_steps": len(steps),
    }
    history = _history(db, "big")
    records = _records(history)
    assert records[: len(left)] == left
    takeover = history[len(left)]
    assert takeover.record == StepStarted(in_flight.step, attempt=2)
    assert takeover.recorded_at - began < 10.0  # not after the 30 s lease
    assert killed.lease_expires_at is not None
    assert takeover.recorded_at < killed.lease_expires_at
    assert [r for r in records if type(r) is StepStarted and r.attempt > 1] == [takeover.record]
    assert sum(type(r) is StepCompleted for r in records) == len(steps)
    assert records[-1] == SagaFinished(SagaStatus.COMPLETED)
