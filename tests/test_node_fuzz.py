"""The node over arbitrary byte streams (issue 9, section 7): a property test.

Streams mix well-formed requests, near-valid ones (wrong types, huge numbers,
deep nesting, NaN, truncations) and random bytes, and are fed in random
pieces after random pauses. Whatever the stream: the node serves to the end of input, prints only
JSON objects, answers every well-formed request exactly once, and prints the
same for every way of cutting the stream. The node runs in process (through
``runner.serve`` on in-memory streams) for speed, and as a subprocess for a few.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import subprocess
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagakit.node.runner import serve
from tests.test_node import MAIN, REPO

# msg_ids of the requests whose replies are counted: apart from any other.
COUNTED = 1_000_000


class _Pieces:
    """stdin handing out the given pieces, one per read, each after a pause."""

    def __init__(self, pieces: list[bytes], pauses: list[float] | None = None) -> None:
        self._pieces = list(pieces)
        self._pauses = list(pauses or [])

    def read1(self, size: int = -1) -> bytes:
        if self._pauses:
            time.sleep(self._pauses.pop(0))
        return self._pieces.pop(0) if self._pieces else b""

    read = read1


def serve_pieces(pieces: list[bytes], pauses: list[float] | None = None) -> tuple[bool, bytes]:
    out = io.BytesIO()
    served = asyncio.run(serve(_Pieces(pieces, pauses), out))  # type: ignore[arg-type]
    return served, out.getvalue()


def strict(line: str) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} printed")

    return json.loads(line, parse_constant=refuse)


def untimed(output: bytes) -> list[dict[str, Any]]:
    messages = [strict(line) for line in output.decode().splitlines()]
    for m in messages:
        assert type(m) is dict, m
        m["body"].pop("timestamp", None)  # the events' wall clock, in seconds
    return messages


step_names = st.lists(st.sampled_from(["a", "b", "c", "d", "é", "x y"]), max_size=4, unique=True)
saga_ids = st.sampled_from(["s1", "s2", "s3", "\u2603", "s\ud800"])


@st.composite
def good_request(draw: st.DrawFn, msg_id: int) -> dict[str, Any]:
    kind = draw(st.sampled_from(["execute", "init", "reserve", "unknown"]))
    if kind == "execute":
        steps = draw(step_names)
        body: dict[str, Any] = {"type": "execute", "saga_id": draw(saga_ids), "steps": steps}
        if draw(st.booleans()):
            body["fail_step"] = draw(st.sampled_from([*steps, "zz"]))
        dest = "saga"
    elif kind == "init":
        dest = draw(st.sampled_from(["saga", "event_bus", "inventory", "n1", "n2"]))
        body = {"type": "init"}
        if dest == "event_bus" and draw(st.booleans()):
            body["services"] = draw(
                st.lists(st.sampled_from(["inventory", "payment", "shipping"]), unique=True)
            )
    elif kind == "reserve":
        dest = "inventory"
        body = {
            "type": "reserve_inventory",
            "saga_id": draw(saga_ids),
            "sku": draw(st.sampled_from(["abc", "def"])),
            "quantity": draw(st.integers(-2, 3) | st.just(10**30)),
        }
        for service in ("inventory", "payment", "shipping"):
            if draw(st.booleans()):
                body[f"fail_{service}"] = True
    else:
        dest = draw(st.sampled_from(["saga", "nobody", "x" * 50]))
        body = {"type": "frobnicate"}
    body["msg_id"] = msg_id
    return {"src": draw(st.sampled_from(["c1", "c2"])), "dest": dest, "body": body}


json_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)

near_valid_texts = st.sampled_from(
    [
        "1" * 4301,
        "[" * 1100 + "]" * 1100,
        '{"src": "c", "dest": "saga", "body": {"type": "execute", "msg_id": NaN}}',
        '{"src": "c", "dest": "inventory", "body": {"type": "reserve_inventory", "msg_id": 3, '
        '"saga_id": "q", "sku": "a", "quantity": 1e400}}',
        '{"src": "c", "dest": "saga", "body": {"type": "execute", "msg_id": 4, "saga_id": "s9", '
        '"steps": ["a", "a"]}}',
        '{"src": 5, "dest": "saga", "body": {}}',
        '{"src": "c", "dest": "saga", "body": []}',
        '{"src": "c", "dest": "saga", "body": {"type": 7}}',
        "\ufeff{}",
        '{"x": "\x01"}',
        "{",
        "[",
        '"open',
        "}]",
    ]
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """A byte stream, and the msg_ids of its well-formed one-line requests."""
    parts: list[bytes] = []
    counted: list[int] = []
    for i in range(draw(st.integers(1, 12))):
        what = draw(st.sampled_from(["good", "good", "pretty", "near", "junk", "bytes", "cut"]))
        if what == "good":
            msg_id = COUNTED + i
            counted.append(msg_id)
            text = json.dumps(draw(good_request(msg_id)), separators=(",", ":"))
            parts.append(text.encode() + b"\n")
        elif what == "pretty":
            # Not counted: a preceding broken value may swallow its first lines.
            text = json.dumps(draw(good_request(i)), indent=draw(st.sampled_from([0, 2])))
            parts.append(text.encode() + b"\n")
        elif what == "near":
            parts.append(draw(near_valid_texts).encode("utf-8", "surrogatepass") + b"\n")
        elif what == "junk":
            parts.append(json.dumps(draw(json_junk)).encode() + b"\n")
        elif what == "bytes":
            parts.append(draw(st.binary(max_size=40)) + b"\n")
        else:
            text = json.dumps(draw(good_request(i)))
            parts.append(text[: draw(st.integers(1, len(text) - 1))].encode() + b"\n")
    return b"".join(parts), counted


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@settings(
    deadline=None,
    max_examples=120,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    stream=streams(),
    cuts=st.lists(st.integers(0, 1 << 20), max_size=12),
    pauses=st.lists(st.sampled_from([0.0, 0.0, 0.001, 0.003]), max_size=13),
)
def test_any_stream_in_any_pieces(
    stream: tuple[bytes, list[int]], cuts: list[int], pauses: list[float]
) -> None:
    data, counted = stream
    served_whole, whole = serve_pieces([data])
    served_split, pieces = serve_pieces(split(data, cuts), pauses)
    byte_by_byte = len(data) < 600 and serve_pieces([data[i : i + 1] for i in range(len(data))])
    assert served_whole
    assert served_split
    messages = untimed(whole)
    assert untimed(pieces) == messages
    if byte_by_byte:
        assert untimed(byte_by_byte[1]) == messages
    replies = [m["body"].get("in_reply_to") for m in messages]
    for msg_id in counted:
        assert replies.count(msg_id) == 1, (msg_id, whole)


@settings(deadline=None, max_examples=5)
@given(stream=streams(), noise=st.binary(min_size=1, max_size=2000))
def test_the_process_serves_any_stream_to_the_end(
    stream: tuple[bytes, list[int]], noise: bytes
) -> None:
    data, counted = stream
    data = noise + b"\n" + data
    proc = subprocess.run(MAIN, input=data, capture_output=True, timeout=30, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert b"Traceback" not in proc.stderr
    messages = untimed(proc.stdout)
    assert messages == untimed(serve_pieces([data])[1])
    replies = [m["body"].get("in_reply_to") for m in messages]
    assert all(replies.count(msg_id) == 1 for msg_id in counted)
