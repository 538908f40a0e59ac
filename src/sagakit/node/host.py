"""The host: one process serving many named nodes, routing each message by ``dest``.

Which code serves a node name is looked up in a :class:`Registry` of node kinds,
so a new protocol is a new kind registered by name; the router never changes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

from sagakit.errors import DefinitionError
from sagakit.node.protocol import (
    BadInput,
    Encoded,
    ErrorCode,
    RequestError,
    encode,
    error_body,
    msg_id_of,
)

__all__ = ["Host", "Node", "Registry"]

log = logging.getLogger("sagakit.node")

Body = dict[str, Any]
Reply = Body | Encoded | None
RequestHandler = Callable[[str, Body], Awaitable[Reply]]
N = TypeVar("N", bound="type[Node]")


class Node:
    """A named node. Methods ``on_<type>(src, body)`` handle requests of that type
    and return the reply body, or None to send no reply.

    Every node answers ``init``. Its ``msg_id`` counter numbers the messages it
    sends that carry one (``init_ok``), from 0.
    """

    _handlers: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._handlers = _handlers_of(cls)

    def __init__(self, name: str, host: Host) -> None:
        self.name = name
        self.host = host
        self.node_id: str | None = None
        self.node_ids: list[str] = []
        self._next_msg_id = 0
        # This node's request handlers by message type, bound once: the router
        # looks one up for every message.
        self.handlers: dict[str, RequestHandler] = {
            msg_type: getattr(self, attr) for msg_type, attr in self._handlers.items()
        }

    def next_msg_id(self) -> int:
        msg_id = self._next_msg_id
        self._next_msg_id += 1
        return msg_id

    def send(self, dest: str, body: Body) -> None:
        self.host.send(self.name, dest, body)

    async def on_init(self, src: str, body: Body) -> Body | None:
        node_id = body.get("node_id")
        node_ids = body.get("node_ids", [])
        if node_id is not None and type(node_id) is not str:
            raise RequestError(ErrorCode.MALFORMED_REQUEST, "node_id: must be a string")
        if type(node_ids) is not list or not all(type(n) is str for n in node_ids):
            raise RequestError(ErrorCode.MALFORMED_REQUEST, "node_ids: must be a list of strings")
        self.node_id, self.node_ids = node_id, node_ids
        return {"type": "init_ok", "in_reply_to": msg_id_of(body), "msg_id": self.next_msg_id()}

    async def finish(self) -> None:
        """Called at end of input: complete the work still in flight."""


def _handlers_of(cls: type[Node]) -> dict[str, str]:
    return {
        attr[3:]: attr
        for klass in reversed(cls.__mro__)
        for attr in vars(klass)
        if attr.startswith("on_")
    }


# __init_subclass__ runs for subclasses only; the base kind serves unknown names.
Node._handlers = _handlers_of(Node)


class Registry:
    """Node kinds by node name; names not registered get the ``default`` kind."""

    def __init__(self, default: type[Node] = Node) -> None:
        self.kinds: dict[str, type[Node]] = {}
        self.default = default

    def register(self, *names: str) -> Callable[[N], N]:
        def add(kind: N) -> N:
            for name in names:
                self.kinds[name] = kind
            return kind

        return add

    def kind_of(self, name: str) -> type[Node]:
        return self.kinds.get(name, self.default)


class Host:
    """Routes messages to nodes, sends their replies, and collects output lines.

    Nodes of one kind can share state through :meth:`shared` (the e-commerce
    services share one bus, say) without the router knowing about it.
    """

    def __init__(self, registry: Registry, write: Callable[[str], None]) -> None:
        self.registry = registry
        self._write = write
        self.nodes: dict[str, Node] = {}
        self._shared: dict[str, Any] = {}

    def node(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            node = self.nodes[name] = self.registry.kind_of(name)(name, self)
        return node

    def shared(self, key: str, make: Callable[[], Any]) -> Any:
        value = self._shared.get(key)
        if value is None:
            value = self._shared[key] = make()
        return value

    def send(self, src: str, dest: str, body: Body | Encoded) -> None:
        self._write(encode(src, dest, body))

    async def dispatch(self, message: Any) -> None:
        """Handle one decoded input value. Never raises for bad input."""
        if type(message) is not dict:
            if type(message) is BadInput:
                log.warning(
                    "skipped input that is not JSON: %s: %.200s", message.reason, message.text
                )
            else:
                log.warning("skipped a JSON %s: messages are objects", type(message).__name__)
            return
        src, dest, body = message.get("src"), message.get("dest"), message.get("body")
        if type(src) is not str or type(dest) is not str:
            log.warning("skipped a message without string src and dest: %.200s", message)
            return
        if type(body) is not dict:
            self.send(
                dest, src, error_body(None, ErrorCode.MALFORMED_REQUEST, "body: must be an object")
            )
            return
        msg_type = body.get("type")
        if type(msg_type) is not str:
            self.send(
                dest,
                src,
                error_body(
                    msg_id_of(body), ErrorCode.MALFORMED_REQUEST, "type: required, a string"
                ),
            )
            return
        handler = (self.nodes.get(dest) or self.node(dest)).handlers.get(msg_type)
        if handler is None:
            text = f"node {dest!r} does not support {msg_type!r}"
            self.send(dest, src, error_body(msg_id_of(body), ErrorCode.NOT_SUPPORTED, text))
            return
        try:
            reply = await handler(src, body)
        except RequestError as exc:
            reply = error_body(msg_id_of(body), exc.code, exc.text, **exc.extra)
        except DefinitionError as exc:
            # The API refused a value from the request: bad input, and it names the field.
            reply = error_body(msg_id_of(body), ErrorCode.MALFORMED_REQUEST, str(exc))
        except Exception as exc:
            log.exception("node %s crashed on %s", dest, msg_type)
            reply = error_body(msg_id_of(body), ErrorCode.CRASH, f"{type(exc).__name__}: {exc}")
        if reply is not None:
            self._write(encode(dest, src, reply))

    async def finish(self) -> None:
        for node in list(self.nodes.values()):
            await node.finish()
