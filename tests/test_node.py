"""The protocol node end to end: ``python main.py`` (and ``sagakit node``) as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SEED_CASES = REPO.parent / "shared" / "seed-cases"
MAIN = [sys.executable, str(REPO / "main.py")]
_SCRIPT = Path(sys.executable).parent / "sagakit"
CLI = [str(_SCRIPT), "node"] if _SCRIPT.exists() else [sys.executable, "-m", "sagakit.cli", "node"]


@dataclass
class Run:
    lines: list[str]
    messages: list[dict[str, Any]]
    stderr: str
    code: int

    @property
    def stdout(self) -> str:
        return "\n".join(self.lines)

    def replies(self, dest: str = "c") -> list[dict[str, Any]]:
        """Bodies of the messages sent to ``dest``, in order."""
        return [m["body"] for m in self.messages if m["dest"] == dest]

    def reply(self, msg_id: int, dest: str = "c") -> dict[str, Any]:
        found = [b for b in self.replies(dest) if b.get("in_reply_to") == msg_id]
        assert len(found) == 1, (msg_id, self.stdout, self.stderr)
        return found[0]

    def events(self, saga_id: str | None = None) -> list[dict[str, Any]]:
        """Events as printed: messages to event_bus whose body is an event."""
        return [
            m
            for m in self.messages
            if m["dest"] == "event_bus"
            and m["body"].get("type", "")[:1].isupper()
            and (saga_id is None or m["body"].get("saga_id") == saga_id)
        ]

    def event_types(self, saga_id: str | None = None) -> list[str]:
        return [m["body"]["type"] for m in self.events(saga_id)]


def run_node(data: bytes | str, cmd: list[str] = MAIN, *, from_file: bool = False) -> Run:
    """Feed ``data`` to the node, close stdin, and collect what it printed.

    ``from_file``: stdin is a regular file holding ``data`` (``node < file``), not a pipe.
    """
    raw = data.encode() if isinstance(data, str) else data
    if from_file:
        with tempfile.TemporaryFile() as stdin:
            stdin.write(raw)
            stdin.seek(0)
            proc = subprocess.run(cmd, stdin=stdin, capture_output=True, timeout=10, cwd=REPO)
    else:
        proc = subprocess.run(cmd, input=raw, capture_output=True, timeout=10, cwd=REPO)
    lines = proc.stdout.decode().splitlines()
    messages = []
    for line in lines:
        value = json.loads(line)  # nothing but JSON objects on stdout, one per line
        assert isinstance(value, dict), line
        messages.append(value)
    return Run(lines, messages, proc.stderr.decode(), proc.returncode)


def msg(dest: str, body: dict[str, Any], src: str = "c") -> str:
    return json.dumps({"src": src, "dest": dest, "body": body}) + "\n"


def execute(msg_id: int, saga_id: str, steps: list[str], **extra: Any) -> str:
    body = {"type": "execute", "msg_id": msg_id, "saga_id": saga_id, "steps": steps}
    return msg("saga", {**body, **extra})


# --- the seed cases, as the judge runs them -------------------------------------------


def seed_cases() -> list[Path]:
    return sorted(SEED_CASES.glob("*.case"))


def parse_case(path: Path) -> tuple[str, list[str]]:
    _, rest = path.read_text().split("--- input\n", 1)
    raw_input, expected = rest.split("--- expected\n", 1)
    return raw_input, [line for line in expected.splitlines() if line.strip()]


def test_seed_cases_are_there() -> None:
    assert len(seed_cases()) >= 6, f"no seed cases found in {SEED_CASES}"


@pytest.mark.parametrize("path", seed_cases(), ids=lambda p: p.stem)
def test_seed_case(path: Path) -> None:
    raw_input, expected = parse_case(path)
    run = run_node(raw_input)
    assert run.code == 0, run.stderr
    for line in expected:
        assert any(line in out for out in run.lines), f"not printed verbatim: {line}"


# --- init ------------------------------------------------------------------------------


@pytest.mark.parametrize("node", ["n1", "saga", "event_bus", "inventory", "payment", "shipping"])
@pytest.mark.parametrize("with_ids", [True, False], ids=["ids", "no_ids"])
def test_init_and_per_node_msg_ids(node: str, with_ids: bool) -> None:
    ids = {"node_id": node, "node_ids": [node, "other"]} if with_ids else {}
    other = "payment" if node == "saga" else "saga"
    run = run_node(
        msg(node, {"type": "init", "msg_id": 1, **ids})
        + msg(other, {"type": "init", "msg_id": 2})
        + msg(node, {"type": "init", "msg_id": 3, **ids})
    )
    assert run.code == 0
    assert run.lines[0] == (
        f'{{"src": "{node}", "dest": "c", "body": '
        '{"type": "init_ok", "in_reply_to": 1, "msg_id": 0}}'
    )
    # Each node counts its own messages from 0.
    assert run.messages[1] == {
        "src": other,
        "dest": "c",
        "body": {"type": "init_ok", "in_reply_to": 2, "msg_id": 0},
    }
    assert run.messages[2] == {
        "src": node,
        "dest": "c",
        "body": {"type": "init_ok", "in_reply_to": 3, "msg_id": 1},
    }


# --- execute (seed 002) ---------------------------------------------------------------


def test_execute_success_verbatim() -> None:
    run = run_node(execute(7, "b-1", ["book_flight", "book_hotel", "book_car"]))
    assert run.lines == [
        '{"src": "saga", "dest": "c", "body": {"type": "saga_completed", "in_reply_to": 7, '
        '"saga_id": "b-1", "state": "completed", "completed_steps": 3}}'
    ]


@pytest.mark.parametrize(
    ("fail_step", "compensated"),
    [("a", []), ("b", ["a"]), ("c", ["b", "a"])],
    ids=["first", "middle", "last"],
)
def test_execute_compensates_in_reverse(fail_step: str, compensated: list[str]) -> None:
    run = run_node(execute(1, "s", ["a", "b", "c"], fail_step=fail_step))
    assert run.replies() == [
        {
            "type": "saga_compensated",
            "in_reply_to": 1,
            "saga_id": "s",
            "state": "compensated",
            "compensated_steps": compensated,
        }
    ]


def without_in_reply_to(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "in_reply_to"}


@pytest.mark.parametrize("first_fail", [None, "b"])
def test_repeated_execute_is_answered_from_the_record(first_fail: str | None) -> None:
    first = {"fail_step": first_fail} if first_fail else {}
    run = run_node(
        execute(1, "s", ["a", "b", "c"], **first)
        + execute(2, "s", ["a", "b", "c"], **first)
        + execute(3, "s", ["a", "b", "c"], fail_step="c" if first_fail is None else "a")
        + execute(4, "s", ["a", "b", "c"])
    )
    replies = [run.reply(n) for n in (1, 2, 3, 4)]
    assert all(without_in_reply_to(r) == without_in_reply_to(replies[0]) for r in replies)
    assert replies[0]["type"] == ("saga_completed" if first_fail is None else "saga_compensated")


def test_same_saga_id_with_other_steps_is_a_conflict() -> None:
    run = run_node(execute(1, "s", ["a", "b"]) + execute(2, "s", ["a", "b", "c"]))
    assert run.reply(1)["type"] == "saga_completed"
    error = run.reply(2)
    assert error["type"] == "error"
    assert error["code"] == 22


def test_unknown_type_is_not_supported() -> None:
    run = run_node(msg("saga", {"type": "frobnicate", "msg_id": 5}))
    assert run.lines[0].startswith(
        '{"src": "saga", "dest": "c", "body": {"type": "error", "in_reply_to": 5, "code": 10, '
    )


GOOD = {"type": "execute", "msg_id": 9, "saga_id": "s", "steps": ["a", "b"]}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"saga_id": None}, "saga_id"),
        ({"saga_id": 5}, "saga_id"),
        ({"steps": "a"}, "steps"),
        ({"steps": None}, "steps"),
        ({"steps": ["a", 3]}, "steps"),
        ({"fail_step": 1}, "fail_step"),
    ],
)
def test_malformed_execute_names_the_field(change: dict[str, Any], field: str) -> None:
    body = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    error = run_node(msg("saga", body)).reply(9)
    assert error["type"] == "error"
    assert error["code"] == 12
    assert field in error["text"]


@pytest.mark.parametrize(
    "change",
    [
        {"steps": "a"},
        {"steps": ["a", 3]},
        {"steps": ["a", "a"]},
        {"steps": ["a", " "]},
        {"steps": [str(i) for i in range(100)] + [""]},  # a list too long to cache
        {"fail_step": 1},
    ],
)
def test_every_execute_error_echoes_the_saga_id(change: dict[str, Any]) -> None:
    # Seed 002, hint 5: "saga_id must be echoed back in every response so the
    # caller can correlate requests", refusals of a bad step list included.
    error = run_node(msg("saga", {**GOOD, **change})).reply(9)
    assert (error["type"], error["code"], error.get("saga_id")) == ("error", 12, "s")


@pytest.mark.parametrize("msg_id", [None, "9", 9.0, True])
def test_a_refused_msg_id_echoes_the_saga_id(msg_id: Any) -> None:
    # Without a usable msg_id the reply has no in_reply_to: the saga id is what
    # correlates it (seed 002, hint 5), for an execute and for a reserve_inventory.
    execute_body = {k: v for k, v in {**GOOD, "msg_id": msg_id}.items() if v is not None}
    body = {"type": "reserve_inventory", "saga_id": "r", "sku": "abc123", "quantity": 1}
    reserve_body = body if msg_id is None else {**body, "msg_id": msg_id}
    run = run_node(INIT + msg("saga", execute_body) + msg("inventory", reserve_body))
    errors = [b for b in run.replies() if b["type"] == "error"]
    assert [(b["code"], b.get("saga_id")) for b in errors] == [(12, "s"), (12, "r")]
    assert all("msg_id" in b["text"] and "in_reply_to" not in b for b in errors)


def test_execute_without_msg_id_is_malformed() -> None:
    body = {k: v for k, v in GOOD.items() if k != "msg_id"}
    run = run_node(msg("saga", body))
    assert len(run.messages) == 1, run.stdout
    reply = run.messages[0]["body"]
    assert reply["type"] == "error"
    assert reply["code"] == 12
    assert "msg_id" in reply["text"]


# --- input forms and bad input ---------------------------------------------------------


def test_bad_input_is_reported_on_stderr_and_skipped() -> None:
    run = run_node(
        execute(1, "s1", ["a"])
        + "this is not json at all\n"
        + "[1, 2, 3]\n"
        + execute(2, "s2", ["a"])
    )
    assert run.code == 0
    assert [b["in_reply_to"] for b in run.replies()] == [1, 2]
    assert "this is not json at all" in run.stderr
    assert len(run.stderr.strip().splitlines()) >= 2


def test_truncated_last_line_but_one_does_not_swallow_the_last_message() -> None:
    line = execute(2, "s2", ["a"])
    run = run_node(execute(1, "s1", ["a"]) + line[:30] + "\n" + line.rstrip("\n"))
    assert run.code == 0
    assert [b["in_reply_to"] for b in run.replies()] == [1, 2]


def test_pretty_printed_and_back_to_back_input() -> None:
    def body(n: int) -> dict[str, Any]:
        return {"type": "execute", "msg_id": n, "saga_id": f"s{n}", "steps": ["a"]}

    def value(n: int, **kw: Any) -> str:
        return json.dumps({"src": "c", "dest": "saga", "body": body(n)}, **kw)

    text = (
        value(1, indent=0)
        + "\n"
        + value(2, indent=2)
        + value(3)
        + value(4, separators=(",", ":"))
        + " "
        + value(5)
        + "\n"
    )
    run = run_node(text)
    assert [b["in_reply_to"] for b in run.replies()] == [1, 2, 3, 4, 5]


def test_a_thousand_executes_are_answered_in_order() -> None:
    steps = ["a", "b", "c"]
    text = "".join(
        execute(n, f"saga-{n}", steps, **({"fail_step": "b"} if n % 3 == 0 else {}))
        for n in range(1, 1001)
    )
    run = run_node(text)
    assert run.code == 0
    replies = run.replies()
    assert [b["in_reply_to"] for b in replies] == list(range(1, 1001))
    assert all(b["saga_id"] == f"saga-{b['in_reply_to']}" for b in replies)
    assert sum(b["type"] == "saga_compensated" for b in replies) == 333


def test_a_regular_file_on_stdin_gives_what_a_pipe_gives() -> None:
    """A file is read on the loop's thread, a pipe by a reader thread: same output."""
    steps = ["a", "b", "c"]
    text = "".join(
        execute(n, f"saga-{n}", steps, **({"fail_step": "c"} if n % 4 == 0 else {}))
        for n in range(1, 3001)
    )
    text += '{"src": "c", "dest": "saga",\n "body": {"type": "execute", "msg_id": 9000,'
    text += ' "saga_id": "pretty", "steps": ["a"]}}\nnot json\n' + execute(9001, "saga-1", steps)
    piped, filed = run_node(text), run_node(text, from_file=True)
    assert filed.code == piped.code == 0
    assert filed.lines == piped.lines
    assert len(filed.replies()) == 3002
    assert "not JSON" in filed.stderr


def test_a_regular_file_on_stdin_runs_the_choreography() -> None:
    run = run_node(INIT + reserve(2, "saga42", fail_payment=True), from_file=True)
    assert run.event_types() == ["InventoryReserved", "PaymentFailed", "InventoryReleased"]


# --- choreography (seeds 000/001) -------------------------------------------------------

INIT = msg(
    "event_bus", {"type": "init", "msg_id": 1, "services": ["inventory", "payment", "shipping"]}
)


def reserve(msg_id: int, saga_id: str, **flags: Any) -> str:
    body = {"type": "reserve_inventory", "msg_id": msg_id, "saga_id": saga_id, "sku": "abc123"}
    return msg("inventory", {**body, "quantity": 1, **flags}, src="c1")


def test_choreography_success() -> None:
    run = run_node(INIT + reserve(2, "saga42"))
    assert run.code == 0
    assert (
        '{"type": "reserve_inventory_ok", "in_reply_to": 2, "saga_id": "saga42", '
        '"reservation_id": "r1"}' in run.stdout
    )
    events = run.events("saga42")
    assert [e["body"]["type"] for e in events] == [
        "InventoryReserved",
        "PaymentCharged",
        "ShipmentCreated",
    ]
    reserved, charged, shipped = events
    assert (reserved["src"], reserved["dest"]) == ("inventory", "event_bus")
    assert reserved["body"]["reservation_id"] == "r1"
    assert charged["src"] == "payment"
    assert charged["body"]["amount"] == 99.99
    assert charged["body"]["payment_id"] == "p1"
    assert shipped["src"] == "shipping"
    assert shipped["body"]["shipment_id"] == "s1"
    assert all(type(e["body"]["timestamp"]) is int for e in events)


def test_choreography_payment_failure() -> None:
    run = run_node(INIT + reserve(2, "saga43", fail_payment=True))
    assert run.reply(2, "c1")["reservation_id"] == "r1"
    events = run.events("saga43")
    assert [e["body"]["type"] for e in events] == [
        "InventoryReserved",
        "PaymentFailed",
        "InventoryReleased",
    ]
    assert events[1]["src"] == "payment"
    assert events[1]["body"]["reason"] == "insufficient_funds"
    assert events[2]["src"] == "inventory"
    assert events[2]["body"]["reservation_id"] == "r1"


def test_choreography_shipping_failure() -> None:
    run = run_node(INIT + reserve(2, "saga44", fail_shipping=True))
    assert run.event_types("saga44") == [
        "InventoryReserved",
        "PaymentCharged",
        "ShipmentFailed",
        "PaymentRefunded",
        "InventoryReleased",
    ]


def test_choreography_inventory_failure() -> None:
    run = run_node(INIT + reserve(2, "saga45", fail_inventory=True))
    error = run.reply(2, "c1")
    assert error["type"] == "error"
    assert error["code"] == 14
    assert error["saga_id"] == "saga45"
    assert run.event_types() == ["InventoryReservationFailed"]


def test_repeated_reserve_is_idempotent() -> None:
    run = run_node(INIT + reserve(2, "saga42") + reserve(3, "saga42"))
    assert run.reply(2, "c1")["reservation_id"] == run.reply(3, "c1")["reservation_id"] == "r1"
    assert run.event_types() == ["InventoryReserved", "PaymentCharged", "ShipmentCreated"]


def test_init_with_some_services() -> None:
    init = msg("event_bus", {"type": "init", "msg_id": 1, "services": ["inventory", "payment"]})
    run = run_node(init + reserve(2, "saga42"))
    assert run.reply(1)["type"] == "init_ok"
    assert run.event_types() == ["InventoryReserved", "PaymentCharged"]


def test_init_with_an_unknown_service() -> None:
    init = msg("event_bus", {"type": "init", "msg_id": 1, "services": ["inventory", "billing"]})
    error = run_node(init).reply(1)
    assert error["type"] == "error"
    assert error["code"] == 12
    assert "services" in error["text"]


def test_all_work_finishes_at_end_of_input() -> None:
    # stdin closes right after the requests: the events still come out.
    run = run_node(INIT + "".join(reserve(n, f"s{n}") for n in range(2, 12)))
    assert run.code == 0
    assert run.event_types().count("ShipmentCreated") == 10


# --- the same node through ``sagakit node`` ---------------------------------------------


def test_cli_node_serves_the_seed_cases() -> None:
    for name in ("orchestration-compensate", "choreography-success"):
        raw_input, expected = parse_case(SEED_CASES / f"{name}.case")
        run = run_node(raw_input, CLI)
        assert run.code == 0, run.stderr
        assert all(line in run.stdout for line in expected), run.stdout


def test_cli_node_choreography_and_bad_input() -> None:
    run = run_node(INIT + "not json\n" + reserve(2, "saga43", fail_payment=True), CLI)
    assert run.code == 0, run.stderr
    assert run.event_types("saga43") == ["InventoryReserved", "PaymentFailed", "InventoryReleased"]
    assert "not json" in run.stderr


def test_a_closed_stdout_stops_the_node_without_a_traceback(tmp_path: Path) -> None:
    """Nobody can read a reply once stdout is closed: the node stops reading, says so on
    stderr and exits 1, instead of working through the rest of its input for no one."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(execute(n, f"s{n}", ["a", "b"]) + "\n" for n in range(1, 200_001)))
    with requests.open("rb") as stdin:
        proc = subprocess.Popen(
            MAIN, cwd=REPO, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["body"]["in_reply_to"] == 1
        proc.stdout.close()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert b"stdout is closed" in err
    assert b"Traceback" not in err


def test_an_interrupt_while_waiting_for_input_ends_the_node_at_once() -> None:
    """Ctrl-C on an interactive node must not wait for another line of input (the stdin
    reader must not be a thread that shutdown joins) nor abort the interpreter."""
    with subprocess.Popen(
        MAIN, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdin.write(msg("n1", {"type": "init", "msg_id": 1}).encode() + b"\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["body"]["type"] == "init_ok"
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=10)
        finally:
            proc.kill()
        errors = proc.stderr.read()
    assert code == 130
    assert b"Fatal Python error" not in errors
    assert b"Traceback" not in errors


# A node whose "die" request signals the node's own process, then yields to the
# event loop, in the middle of a chunk whose earlier replies are not written yet.
_SIGNAL_SELF = """
import asyncio, os, signal, sys
from sagakit.node.host import Node
from sagakit.node.kinds import default_registry
from sagakit.node.runner import exit_now, serve

class Dying(Node):
    async def on_die(self, src, body):
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        await asyncio.sleep(1)

registry = default_registry()
registry.register("dying")(Dying)
try:
    asyncio.run(serve(sys.stdin.buffer, sys.stdout.buffer, registry))
except KeyboardInterrupt:
    exit_now(130)
except asyncio.CancelledError:
    exit_now(143)
exit_now(0)
"""


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_mid_chunk_loses_no_reply_already_made(name: str, code: int) -> None:
    # The sagas before the signal ran to the end: their replies are written
    # before the node exits, not dropped with the buffer of the event-loop turn.
    data = execute(1, "a", ["x"]) + execute(2, "b", ["x"]) + msg("dying", {"type": "die"})
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, "-c", _SIGNAL_SELF, name],
        input=(data + execute(3, "c", ["x"])).encode(),
        capture_output=True,
        timeout=20,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == code, proc.stderr
    replies = [json.loads(line)["body"] for line in proc.stdout.decode().splitlines()]
    assert [b["in_reply_to"] for b in replies] == [1, 2]
    assert b"Traceback" not in proc.stderr
