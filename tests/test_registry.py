"""A new protocol is a new node kind in a registry: the router (Host) does not change."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

from sagakit.node.host import Body, Host, Node, Registry
from sagakit.node.kinds import default_registry
from sagakit.node.protocol import ErrorCode, RequestError, require_str
from sagakit.node.runner import serve


class EchoNode(Node):
    """A protocol the package does not ship: echo, as in Maelstrom's first exercise."""

    async def on_echo(self, src: str, body: Body) -> Body | None:
        text = require_str(body, "echo")
        if text == "refuse":
            raise RequestError(ErrorCode.PRECONDITION_FAILED, "echo: refused as asked")
        return {"type": "echo_ok", "in_reply_to": body["msg_id"], "echo": text}


def registry_with_echo() -> Registry:
    registry = default_registry()
    registry.register("echo")(EchoNode)
    return registry


def run(registry: Registry, *messages: dict[str, Any]) -> list[dict[str, Any]]:
    stdin = io.BytesIO("".join(json.dumps(m) + "\n" for m in messages).encode())
    stdout = io.BytesIO()
    assert asyncio.run(serve(stdin, stdout, registry))
    return [json.loads(line) for line in stdout.getvalue().decode().splitlines()]


def test_a_registered_kind_is_served_by_the_unchanged_router() -> None:
    out = run(
        registry_with_echo(),
        {"src": "c1", "dest": "echo", "body": {"type": "init", "msg_id": 1}},
        {"src": "c1", "dest": "echo", "body": {"type": "echo", "msg_id": 2, "echo": "hi"}},
        {"src": "c1", "dest": "echo", "body": {"type": "echo", "msg_id": 3, "echo": "refuse"}},
        {"src": "c1", "dest": "echo", "body": {"type": "echo", "msg_id": 4}},
    )
    assert [m["body"] for m in out] == [
        {"type": "init_ok", "in_reply_to": 1, "msg_id": 0},
        {"type": "echo_ok", "in_reply_to": 2, "echo": "hi"},
        {"type": "error", "in_reply_to": 3, "code": 22, "text": "echo: refused as asked"},
        {
            "type": "error",
            "in_reply_to": 4,
            "code": 12,
            "text": "echo: required, a non-empty string",
        },
    ]
    assert {m["src"] for m in out} == {"echo"}


def test_the_shipped_kinds_keep_working_beside_a_new_one() -> None:
    out = run(
        registry_with_echo(),
        {
            "src": "c1",
            "dest": "saga",
            "body": {"type": "execute", "msg_id": 1, "saga_id": "s1", "steps": ["a"]},
        },
    )
    assert out[0]["body"]["type"] == "saga_completed"


def test_names_not_registered_get_the_default_kind() -> None:
    registry = Registry()
    assert registry.kind_of("anything") is Node
    host = Host(registry, lambda line: None)
    assert type(host.node("n7")) is Node
    assert host.node("n7") is host.node("n7")
