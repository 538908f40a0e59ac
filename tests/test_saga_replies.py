"""The saga node writes its replies itself; they must be byte for byte what json.dumps gives."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sagakit.core.records import valid_id
from sagakit.node.host import Host
from sagakit.node.kinds import default_registry
from sagakit.node.protocol import Encoded, encode, json_string

# Names with something besides white space: a blank step name is refused (tested below).
names = st.text(min_size=1, max_size=12).filter(lambda name: name.strip() != "")
# Saga ids every saga log can keep (no NUL, no lone surrogate); others are refused below.
saga_ids = names.filter(valid_id)


def reply_line(saga_id: str, steps: list[str], fail_step: str | None, msg_id: int) -> str:
    lines: list[str] = []
    host = Host(default_registry(), lines.append)
    body: dict[str, Any] = {"type": "execute", "msg_id": msg_id, "saga_id": saga_id}
    body["steps"] = steps
    if fail_step is not None:
        body["fail_step"] = fail_step
    asyncio.run(host.dispatch({"src": "client", "dest": "saga", "body": body}))
    assert len(lines) == 1
    return lines[0]


@settings(max_examples=300, deadline=None)
@given(
    saga_id=saga_ids,
    steps=st.lists(names, min_size=1, max_size=5, unique=True),
    fail_at=st.none() | st.integers(min_value=0, max_value=4),
    msg_id=st.integers(min_value=-(2**70), max_value=2**70),
)
def test_execute_replies_are_what_json_dumps_writes(
    saga_id: str, steps: list[str], fail_at: int | None, msg_id: int
) -> None:
    fail_step = None if fail_at is None or fail_at >= len(steps) else steps[fail_at]
    if fail_step is None:
        expected: dict[str, Any] = {
            "type": "saga_completed",
            "in_reply_to": msg_id,
            "saga_id": saga_id,
            "state": "completed",
            "completed_steps": len(steps),
        }
    else:
        done = steps[: steps.index(fail_step)]
        expected = {
            "type": "saga_compensated",
            "in_reply_to": msg_id,
            "saga_id": saga_id,
            "state": "compensated",
            "compensated_steps": done[::-1],
        }
    wanted = json.dumps({"src": "saga", "dest": "client", "body": expected})
    assert reply_line(saga_id, steps, fail_step, msg_id) == wanted


@given(text=st.text())
def test_json_string_is_json_dumps_of_a_string(text: str) -> None:
    assert json_string(text) == json.dumps(text)


def test_an_encoded_body_is_wrapped_in_the_envelope_unchanged() -> None:
    body = Encoded('{"type": "x", "n": 1}')
    assert encode("a", "b", body) == json.dumps({"src": "a", "dest": "b", "body": json.loads(body)})


def test_a_blank_step_name_is_a_malformed_request_not_a_crash() -> None:
    line = json.loads(reply_line("s1", ["book", " \r"], None, 7))
    assert line["body"]["type"] == "error"
    assert line["body"]["code"] == 12
    assert line["body"]["text"].startswith("steps: ")


@pytest.mark.parametrize("saga_id", ["\x00", "s\ud800", "\u00e9" * 600])
def test_a_saga_id_no_log_can_keep_is_a_malformed_request_naming_it(saga_id: str) -> None:
    """The identifier rule of every saga log, memory included: NUL, a lone surrogate
    or over 1,024 bytes of UTF-8 (here 600 characters, 1,200 bytes)."""
    body = json.loads(reply_line(saga_id, ["a"], None, 7))["body"]
    assert (body["type"], body["code"], body["in_reply_to"]) == ("error", 12, 7)
    assert body["text"].startswith("saga_id: ")
    assert body["saga_id"] == saga_id
