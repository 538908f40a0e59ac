"""A pure core, and the stamping at the edge that it relies on.

``sagakit.core`` does no I/O, reads no clock and draws no random numbers: time and
ids come in as arguments. An :class:`Event` made without an id or a time is
unstamped; ``publish`` (every bus, through ``ports.event_bus.stamped``) and
``Service.publish`` (``new_event``) give it a fresh id and the current time.
What every bus does with an unstamped event is in the conformance suite
(``tests/conformance/event_bus.py``).
"""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

import sagakit.core
from sagakit import InMemoryEventBus, Service, handles
from sagakit.core.event import Event
from sagakit.ports.event_bus import new_event, new_event_id, stamped

CORE = Path(sagakit.core.__file__).parent

# What core may import: computation only. A module that reads a clock, draws random
# numbers or does I/O (time, datetime, random, secrets, uuid, os, io, pathlib, socket,
# asyncio, threading, subprocess, logging, sqlite3, ...) is refused; time and ids
# come in as arguments. Add a module here only if it is pure.
PURE = frozenset({
    "__future__", "abc", "bisect", "collections", "copy", "dataclasses", "enum",
    "functools", "hashlib", "heapq", "inspect", "itertools", "json", "math", "numbers",
    "operator", "orjson", "re", "string", "types", "typing",
})  # fmt: skip


def impure_imports(sources: list[Path]) -> list[str]:
    """Every import in ``sources`` (functions and ``try`` blocks too) that core may not make."""
    found = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                # A relative import from core/ ("from . import x") stays in core.
                base = {0: "", 1: "sagakit.core."}.get(node.level, "." * node.level)
                modules = [base + (node.module or "")]
            else:
                continue
            found.extend(
                f"{path.name}:{node.lineno}: {module}"
                for module in modules
                if module.partition(".")[0] not in PURE
                # Inward only: core and the errors, never ports, adapters or front ends.
                and module != "sagakit.errors"
                and not module.startswith("sagakit.core")
            )
    return sorted(found)


def test_core_imports_no_clock_randomness_or_io() -> None:
    sources = sorted(CORE.glob("*.py"))
    assert {p.name for p in sources} >= {"event.py", "envelope.py", "machine.py", "saga.py"}
    assert impure_imports(sources) == []


def test_the_purity_check_sees_impure_imports(tmp_path: Path) -> None:
    source = tmp_path / "impure.py"
    source.write_text(
        "import json\nfrom sagakit.core.event import Event\ntry:\n    from time import time\n"
        "except ImportError:\n    import os.path, uuid\nfrom sagakit.ports import event_bus\n"
        "from . import event\nfrom .. import errors\n"
    )
    assert impure_imports([source]) == [
        "impure.py:4: time",
        "impure.py:6: os.path",
        "impure.py:6: uuid",
        "impure.py:7: sagakit.ports",
        "impure.py:9: ..",
    ]


def test_core_calls_no_io_builtins() -> None:
    calls = [
        f"{path.name}:{node.lineno}: {node.func.id}()"
        for path in sorted(CORE.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in {"open", "print", "input", "__import__", "breakpoint"}
    ]
    assert calls == []


# --- stamping -------------------------------------------------------------------------


def is_fresh_id(event_id: str) -> bool:
    return len(event_id) == 32 and int(event_id, 16) >= 0


def test_an_event_made_without_an_id_or_a_time_is_unstamped() -> None:
    event = Event("OrderPlaced", "o1", {"n": 1})
    assert (event.event_id, event.timestamp) == ("", 0)


def test_stamped_gives_an_unstamped_event_a_fresh_id_and_the_time() -> None:
    event = Event("OrderPlaced", "o1", {"n": 1}, source="shop", headers={"traceparent": "t"})
    before = int(time.time())
    first, second = stamped(event), stamped(event)
    after = int(time.time())
    for done in (first, second):
        assert is_fresh_id(done.event_id)
        assert before <= done.timestamp <= after
        assert (done.type, done.saga_id, done.payload) == ("OrderPlaced", "o1", {"n": 1})
        assert (done.source, done.headers) == ("shop", {"traceparent": "t"})
    assert first.event_id != second.event_id
    assert (event.event_id, event.timestamp) == ("", 0), "the event itself is not changed"


def test_stamped_keeps_an_id_and_a_time_the_event_has() -> None:
    event = Event("OrderPlaced", "o1", event_id="e1", timestamp=5)
    assert stamped(event) is event
    only_id = stamped(Event("OrderPlaced", "o1", event_id="e1"))
    assert only_id.event_id == "e1"
    assert abs(only_id.timestamp - time.time()) < 5
    only_time = stamped(Event("OrderPlaced", "o1", timestamp=5))
    assert is_fresh_id(only_time.event_id)
    assert only_time.timestamp == 5


def test_new_event_is_stamped_as_it_is_made() -> None:
    before = int(time.time())
    event = new_event("OrderPlaced", "o1", {"n": 1}, source="shop")
    assert is_fresh_id(event.event_id)
    assert before <= event.timestamp <= int(time.time())
    assert (event.payload, event.source) == ({"n": 1}, "shop")
    assert stamped(event) is event
    assert new_event("OrderPlaced", "o1", {}).event_id != event.event_id


def test_new_event_ids_are_distinct_hex() -> None:
    ids = {new_event_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(is_fresh_id(i) for i in ids)


@pytest.mark.parametrize("envelope", [False, True])
async def test_publish_stamps_at_publish_and_keeps_what_is_given(envelope: bool) -> None:
    bus = InMemoryEventBus(envelope=envelope)
    got: list[Event] = []
    await bus.subscribe("*", got.append)
    unstamped = Event("OrderPlaced", "o1", {"n": 1})
    given = Event("OrderPlaced", "o2", event_id="outbox-1", timestamp=1_700_000_000)
    before = int(time.time())
    await bus.publish(unstamped)
    await bus.publish(given)
    await bus.drain()
    assert is_fresh_id(got[0].event_id)
    assert before <= got[0].timestamp <= int(time.time())
    assert (got[1].event_id, got[1].timestamp) == ("outbox-1", 1_700_000_000)
    await bus.close()


async def test_service_publish_returns_the_event_its_handlers_get() -> None:
    class Payment(Service):
        name = "payment"

        @handles("InventoryReserved")
        async def charge(self, event: Event) -> None:
            charged.append(await self.publish("PaymentCharged", event.saga_id, amount=3))

    charged: list[Event] = []
    seen: list[Event] = []
    bus = InMemoryEventBus()
    await Payment().attach(bus)
    await bus.subscribe("PaymentCharged", seen.append)
    before = int(time.time())
    await bus.publish(Event("InventoryReserved", "o1"))
    await bus.drain()
    assert seen == charged
    assert is_fresh_id(charged[0].event_id)
    assert before <= charged[0].timestamp <= int(time.time())
    assert charged[0].source == "payment"
    await bus.close()


async def test_a_new_event_published_twice_is_the_same_event_twice() -> None:
    """The retry a README reader is told to write: ``sagakit.new_event`` stamps the event
    as it is made, so publishing that object again (after a BackendError, say) sends the
    same id, which consumers deduplicate on."""
    import sagakit

    bus = InMemoryEventBus()
    got: list[Event] = []
    await bus.subscribe("*", got.append)
    event = sagakit.new_event("OrderPlaced", "o1", {"n": 1})
    await bus.publish(event)
    await bus.publish(event)
    await bus.drain()
    assert [e.event_id for e in got] == [event.event_id] * 2
    await bus.close()
