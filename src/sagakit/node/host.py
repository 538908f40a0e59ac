"""The host: one process serving many named nodes, routing each message by ``dest``.

Which code serves a node name is looked up in a :class:`Registry` of node kinds,
so a new protocol is a new kind registered by name; the router never changes.
"""

from __future__ import annotations

import logging
import reprlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from sagakit.errors import DefinitionError
from sagakit.node.framing import MAX_LINE
from sagakit.node.protocol import (
    MAX_ID,
    BadInput,
    Encoded,
    ErrorCode,
    RequestError,
    SameLine,
    encode,
    error_body,
    msg_id_of,
    require_msg_id,
)

__all__ = ["Host", "Node", "NodeSettings", "Registry"]

log = logging.getLogger("sagakit.node")

# Bad input is quoted in the log, never whole: a message can be megabytes long
# or nested hundreds deep (a plain repr would recurse as deep).
_quote = reprlib.Repr()
_quote.maxlevel, _quote.maxstring, _quote.maxother = 3, 200, 200
_quote.maxdict = _quote.maxlist = 8

Body = dict[str, Any]
Reply = Body | Encoded | None
RequestHandler = Callable[[str, Body], Awaitable[Reply]]
N = TypeVar("N", bound="type[Node]")


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """The node's limits (``python3 main.py --help`` names the options and variables).

    ``max_sagas``: the finished sagas each node kind keeps to answer a retry
    from its record (the saga node's log, the shop's reservations); beyond it
    the oldest is forgotten, and a request naming a forgotten saga id runs as
    a new saga. ``max_records``: the saga node's in-memory log keeps finished
    sagas weighing at most this many records and steps in all, oldest forgotten
    first, as past ``max_sagas`` (its ``memory://?max_records=``): a saga can
    have any number of steps. ``max_line``: the longest line (or value over several lines)
    read, in characters. ``max_plain_nodes``: nodes of unregistered names kept.
    ``store``: the saga log's URL for the ``saga`` node (in memory otherwise).
    ``owner``: the name the ``saga`` node takes leases under (default: its node
    id, or its name before an ``init``, ``@`` the host name). ``retry_for``: how
    long a request retries a store that is down before it is answered code 11.
    """

    max_sagas: int = 100_000
    # The in-memory log's own default (DEFAULT_MAX_RECORDS): about 1 GiB at worst.
    max_records: int = 1_000_000
    max_line: int = MAX_LINE
    max_plain_nodes: int = 4096
    # The saga node's log, when not in memory: sqlite:///path keeps every saga
    # across restarts (a retry after a restart is answered from the file).
    store: str | None = None
    # Stable across restarts by default, so that a node restarted on its store
    # takes over the sagas its predecessor left in flight at once (see SagaNode).
    owner: str | None = None
    retry_for: float = 30.0


class Node:
    """A named node. Methods ``on_<type>(src, body)`` handle requests of that type
    and return the reply body, or None to send no reply.

    Every node answers ``init``. Its ``msg_id`` counter numbers the messages it
    sends that carry one (``init_ok``), from 0.

    ``settles``: the host awaits :meth:`settle` after each request to this
    kind, before it reads the next one (a kind whose requests set off work
    that goes on after the reply, such as events on a bus).
    """

    _handlers: ClassVar[dict[str, str]] = {}
    settles: ClassVar[bool] = False

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

    @staticmethod
    def init_ids(body: Body) -> tuple[str | None, list[str]]:
        """An ``init``'s ``node_id`` and ``node_ids``, checked, and its ``msg_id`` (a kind
        whose ``init`` changes more checks them first: a refused request changes nothing)."""
        # init_ok answers it: without one the reply would say "in_reply_to": null,
        # which answers nothing (every other request is refused so too).
        require_msg_id(body)
        node_id = body.get("node_id")
        node_ids = body.get("node_ids", [])
        if node_id is not None and type(node_id) is not str:
            raise RequestError(ErrorCode.MALFORMED_REQUEST, "node_id: must be a string")
        if type(node_ids) is not list or not all(type(n) is str for n in node_ids):
            raise RequestError(ErrorCode.MALFORMED_REQUEST, "node_ids: must be a list of strings")
        return node_id, node_ids

    async def on_init(self, src: str, body: Body) -> Body | None:
        self.node_id, self.node_ids = self.init_ids(body)
        return {"type": "init_ok", "in_reply_to": body["msg_id"], "msg_id": self.next_msg_id()}

    async def open(self) -> None:
        """Reach what the node stores into, before any input; raises SagakitError if not."""

    async def settle(self) -> None:
        """Complete the work the last request set off (only for kinds that ``settles``)."""

    async def finish(self) -> None:
        """Called at end of input: complete the work still in flight."""


# Bad input reported one warning each up to this many; past them, one warning
# for every this many more: a stream of short bad lines (a million "1") would
# otherwise write some forty times its size on stderr, one warning a line.
REPORTED = 1000
_MORE = "%d more bad inputs (past the first %d, one in %d is shown); the last: "

# The longest text an error reply carries.
MAX_TEXT = 1000


def _refusal(body: Body, code: int, text: str, **extra: Any) -> Body:
    """An error reply to ``body``, with its saga_id when it has a usable one,
    whatever the refusal: the seed wants the saga_id echoed in every response,
    and it is what ties an error to a request without an integer msg_id."""
    if len(text) > MAX_TEXT:
        # Texts quote what was refused (a conflict both step lists): the reply to a
        # request of megabytes stays a line a client can read and log.
        text = text[: MAX_TEXT - 3] + "..."
    if "saga_id" not in extra:
        saga_id = body.get("saga_id")
        if type(saga_id) is str and 0 < len(saga_id) <= MAX_ID:
            extra["saga_id"] = saga_id
    return error_body(msg_id_of(body), code, text, **extra)


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

    A name no kind is registered for gets a node of the default kind only when
    a request it handles (``init``) names it, and the host keeps at most
    ``max_plain_nodes`` of those, dropping the longest-kept first: a dropped
    node's ``msg_id`` counter starts again from 0. Any number of distinct
    ``dest`` names thus costs bounded memory.
    """

    def __init__(
        self,
        registry: Registry,
        write: Callable[[str], None],
        settings: NodeSettings | None = None,
    ) -> None:
        self.registry = registry
        self._write = write
        self.settings = settings or NodeSettings()
        self.nodes: dict[str, Node] = {}
        self._plain: dict[str, None] = {}  # default-kind node names, oldest first
        self._max_plain = max(1, self.settings.max_plain_nodes)
        self._shared: dict[str, Any] = {}
        # While the values of one line are served: the skips held back, the
        # first one's warning (format and arguments) and how many there were.
        self._held: list[Any] | None = None
        self._held_count = 0
        self._warnings = 0  # about bad input, written or not (see _warn)

    def node(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            kind = self.registry.kind_of(name)
            node = self.nodes[name] = kind(name, self)
            if kind is self.registry.default and name not in self.registry.kinds:
                if len(self._plain) >= self._max_plain:
                    oldest = next(iter(self._plain))
                    del self._plain[oldest]
                    del self.nodes[oldest]
                self._plain[name] = None
        return node

    def shared(self, key: str, make: Callable[[], Any]) -> Any:
        value = self._shared.get(key)
        if value is None:
            value = self._shared[key] = make()
        return value

    def send(self, src: str, dest: str, body: Body | Encoded) -> None:
        try:
            line = encode(src, dest, body)
        except (ValueError, TypeError, RecursionError) as exc:
            # A value JSON cannot carry (NaN, infinity): printing it would put
            # a line on stdout that no client can parse.
            log.error("dropped a message from %s to %s that is not JSON: %s", src, dest, exc)
            return
        self._write(line)

    async def dispatch(self, message: Any) -> None:
        """Handle one decoded input value. Never raises for bad input."""
        if type(message) is not dict:
            if type(message) is SameLine:
                await self._dispatch_line(message)
            elif type(message) is BadInput:
                if message.message is not None:
                    self._unreadable(message, message.message)
                else:
                    self._skipped(
                        "skipped input that is not JSON: %s: %s", message.reason, message.text
                    )
            else:
                self._skipped("skipped a JSON %s: messages are objects", type(message).__name__)
            return
        src, dest, body = message.get("src"), message.get("dest"), message.get("body")
        if type(src) is not str or type(dest) is not str:
            self._skipped("skipped a message without string src and dest: %s", _quote.repr(message))
            return
        if type(body) is not dict:
            self.send(
                dest, src, error_body(None, ErrorCode.MALFORMED_REQUEST, "body: must be an object")
            )
            return
        msg_type = body.get("type")
        if type(msg_type) is not str:
            self.send(
                dest, src, _refusal(body, ErrorCode.MALFORMED_REQUEST, "type: required, a string")
            )
            return
        node = self.nodes.get(dest)
        if node is None:
            if msg_type not in self.registry.kind_of(dest)._handlers:
                # Answered without making a node: a request may name any dest.
                self._not_supported(dest, src, msg_type, body)
                return
            node = self.node(dest)
        handler = node.handlers.get(msg_type)
        if handler is None:
            self._not_supported(dest, src, msg_type, body)
            return
        try:
            reply = await handler(src, body)
        except RequestError as exc:
            reply = _refusal(body, exc.code, exc.text, **exc.extra)
        except DefinitionError as exc:
            # The API refused a value from the request: bad input, and it names the field.
            reply = _refusal(body, ErrorCode.MALFORMED_REQUEST, str(exc))
        except Exception as exc:
            log.exception("node %s crashed on %s", dest, msg_type)
            reply = _refusal(body, ErrorCode.CRASH, f"{type(exc).__name__}: {exc}")
        if reply is not None:
            try:
                line = encode(dest, src, reply)
            except (ValueError, TypeError, RecursionError) as exc:
                log.error(
                    "node %s replied to %s with a body that is not JSON: %s", dest, msg_type, exc
                )
                line = encode(dest, src, _refusal(body, ErrorCode.CRASH, "reply is not JSON"))
            self._write(line)
        if node.settles:
            await node.settle()

    def _unreadable(self, bad: BadInput, message: Body) -> None:
        """A message refused only for a number or a raw control character in it:
        answered (error 12, naming why), since its sender waits for a reply."""
        self._skipped("refused a message with %s: %s", bad.reason, bad.text)
        body = message.get("body")
        body = body if type(body) is dict else {}
        self.send(
            message["dest"], message["src"], _refusal(body, ErrorCode.MALFORMED_REQUEST, bad.reason)
        )

    def _skipped(self, text: str, *args: Any) -> None:
        if self._held is None:
            self._warn(text, *args)
            return
        self._held_count += 1
        if not self._held:
            self._held[:] = (text, *args)

    async def _dispatch_line(self, values: SameLine) -> None:
        """The values of one line, in order, with what they skip reported once: a
        line of a million bad values is one warning, not a million."""
        self._held, self._held_count = [], 0
        try:
            for value in values:
                try:
                    await self.dispatch(value)
                except Exception:  # a bug, as in the runner: the line's next value still runs
                    log.exception("internal error while handling a message; skipped")
        finally:
            held, count = self._held, self._held_count
            self._held = None
        if count == 1:
            self._warn(*held)
        elif count:
            self._warn(
                "skipped %d values on one line that are not messages; the first: " + held[0],
                count,
                *held[1:],
            )

    def _warn(self, text: str, *args: Any) -> None:
        """A warning about bad input: each of the first REPORTED ones, then one for
        every REPORTED more, so that stderr grows by a bounded share of the input."""
        self._warnings += 1
        if self._warnings <= REPORTED:
            log.warning(text, *args)
        elif self._warnings % REPORTED == 0:
            log.warning(_MORE + text, REPORTED, REPORTED, REPORTED, *args)

    def _warned_since(self) -> None:
        """The warnings held back since the last one written, counted (at end of input)."""
        unwritten = self._warnings % REPORTED if self._warnings > REPORTED else 0
        if unwritten:
            log.warning(
                "%d more bad inputs (past the first %d, one in %d is shown)",
                unwritten,
                REPORTED,
                REPORTED,
            )

    def _not_supported(self, dest: str, src: str, msg_type: str, body: Body) -> None:
        text = f"node {dest[:200]!r} does not support {msg_type[:200]!r}"
        self.send(dest, src, _refusal(body, ErrorCode.NOT_SUPPORTED, text))

    async def finish(self) -> None:
        self._warned_since()
        for node in list(self.nodes.values()):
            await node.finish()
