"""The NATS JetStream event bus: the conformance suite on a private nats-server, and its faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import nats
import nats.js.errors
import pytest

from sagakit.adapters import open_event_bus
from sagakit.adapters._bus_checks import check_server_version
from sagakit.adapters.nats_bus import MIN_SERVER, NatsEventBus
from sagakit.core.envelope import encode_event
from sagakit.core.event import Event
from sagakit.errors import (
    BackendBusy,
    BackendError,
    BackendRefused,
    BackendUnavailable,
    ConfigurationError,
    DefinitionError,
)
from sagakit.ports.event_bus import EventBus
from tests.conformance.choreography import ChoreographyConformance
from tests.conformance.event_bus import EventBusConformance, event, ids, recorder
from tests.servers import free_port
from tests.servers.nats import NatsServer


def _prefix() -> str:
    return "t" + os.urandom(6).hex()


async def _kill(bus: NatsEventBus) -> None:
    """Die holding events: loops stop without acknowledging, the connection drops."""
    tasks = [s._task for s in bus._subscriptions if s._task is not None]
    tasks += [chain for s in bus._subscriptions for chain in s._chains]
    pending = set(tasks)
    while pending:  # again: Python 3.11's wait_for (in nats-py's requests) may swallow one
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    bus._subscriptions = []
    bus._closed = True
    if bus._nc is not None:
        await bus._nc.close()


class TestNatsEventBus(EventBusConformance):
    @pytest.fixture(autouse=True)
    def _server(self, nats_server: NatsServer) -> None:
        self.server = nats_server
        self.prefix = _prefix()

    async def make_bus(self) -> EventBus:
        return await NatsEventBus.connect(f"{self.server.url}?prefix={self.prefix}")

    async def kill(self, bus: EventBus) -> None:
        assert isinstance(bus, NatsEventBus)
        await _kill(bus)

    async def restart_server(self) -> None:
        await asyncio.to_thread(self.server.restart)


class TestNatsEventBusConcurrent(TestNatsEventBus):
    """The same contract with handlers of different sagas running at once."""

    async def make_bus(self) -> EventBus:
        url = f"{self.server.url}?prefix={self.prefix}&concurrency=8"
        return await NatsEventBus.connect(url)


class TestChoreographyOnNats(ChoreographyConformance):
    @pytest.fixture(autouse=True)
    def _server(self, nats_server: NatsServer) -> None:
        self.server = nats_server
        self.prefix = _prefix()

    async def make_bus(self) -> EventBus:
        return await NatsEventBus.connect(f"{self.server.url}?prefix={self.prefix}")


class TestChoreographyOnNatsConcurrent(TestChoreographyOnNats):
    async def make_bus(self) -> EventBus:
        url = f"{self.server.url}?prefix={self.prefix}&concurrency=16"
        return await NatsEventBus.connect(url)


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[NatsEventBus]:
    bus = await NatsEventBus.connect(f"{nats_server.url}?prefix={_prefix()}&timeout=1")
    yield bus
    async with asyncio.timeout(10):
        await bus.close()


async def _wait(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10.0
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# --- URLs ------------------------------------------------------------------------------------


def test_the_url_names_server_and_prefix() -> None:
    bus = open_event_bus("nats://127.0.0.1:4222?prefix=shop&timeout=2.5&batch=8")
    assert isinstance(bus, NatsEventBus)
    assert (bus.url, bus.prefix, bus._timeout, bus._batch) == (
        "nats://127.0.0.1:4222",
        "shop",
        2.5,
        8,
    )
    assert NatsEventBus.from_url("nats://h:1").prefix == "sagakit"


@pytest.mark.parametrize(
    "url",
    [
        "nats://h:1?prefix=a.b",  # a dot would split the subject
        "nats://h:1?prefix=",
        "nats://h:1?prefix=" + "x" * 65,
        "nats://h:1?prefx=typo",
        "nats://h:1?timeout=-1",
        "nats://h:1?timeout=soon",
        "nats://h:1?batch=0",
        "nats://h:1?batch=10001",
        "nats://h:1?concurrency=0",
        "nats://h:1?concurrency=1e9",
        "nats://h:1?dead_letters=-5",
        "nats://h:1?max_age=nan",
        "nats://?prefix=a",
    ],
)
def test_bad_urls_are_refused_by_name(url: str) -> None:
    with pytest.raises(ConfigurationError):
        NatsEventBus.from_url(url)


@pytest.mark.parametrize(
    ("option", "value"),
    [("timeout", "5"), ("timeout", float("inf")), ("max_age", True), ("batch", 0)],
)
def test_bad_keyword_options_are_refused_by_name(option: str, value: object) -> None:
    """From Python as from a URL: a timeout given as text was a TypeError before."""
    with pytest.raises(ConfigurationError, match=option):
        NatsEventBus(**{option: value})  # type: ignore[arg-type]


async def test_no_server_is_backend_unavailable() -> None:
    bus = NatsEventBus.from_url(f"nats://127.0.0.1:{free_port()}?timeout=1")
    with pytest.raises(BackendUnavailable):
        await bus.publish(event())
    await bus.close()


async def test_errors_name_the_url_without_its_password() -> None:
    # The URL named every error (and `sagakit dlq`'s stderr) with its password in clear.
    bus = NatsEventBus.from_url(f"nats://app:s3cret-pw@127.0.0.1:{free_port()}?timeout=1")
    with pytest.raises(BackendUnavailable) as excinfo:
        await bus.publish(event())
    await bus.close()
    assert "s3cret-pw" not in str(excinfo.value)
    assert "app:***@127.0.0.1" in excinfo.value.backend
    with pytest.raises(BackendError) as closed:
        await bus.publish(event())
    assert "s3cret-pw" not in str(closed.value)


# --- names and hostile input -----------------------------------------------------------------


@pytest.mark.parametrize(
    "event_type", ["order.placed", "a b", ">", "a.>", "Ünïcode", "x" * 255, "~Kg", "-.-"]
)
async def test_any_event_type_the_buses_take_travels(bus: NatsEventBus, event_type: str) -> None:
    # Not plain subject tokens: written as base64 on the subject, none taken for another.
    exact: list[Event] = []
    other: list[Event] = []
    await bus.subscribe(event_type, recorder(exact), group="g.exact-1_x")
    await bus.subscribe("OrderPlaced", recorder(other), group="g")
    sent = event(event_type)
    await bus.publish(sent)
    await bus.publish(event("OrderPlaced"))
    await bus.drain()
    assert ids(exact) == [sent.event_id]
    assert [e.type for e in other] == ["OrderPlaced"]


async def test_a_name_too_long_is_refused_and_the_connection_stays(
    bus: NatsEventBus,
) -> None:
    # A subject past the server's control line (4 KB) used to be sent: the server closed
    # the connection (every subscription with it) and the publish timed out as
    # BackendUnavailable, retryable, so a retry knocked the connection down again. The
    # buses' common limit (255 bytes) now refuses such names long before.
    got: list[Event] = []
    await bus.subscribe("Tick", recorder(got), group="g")
    longest = "é" * 127  # 254 bytes, base64 on the subject
    await bus.subscribe(longest, recorder(got), group="g")
    await bus.publish(event(longest))
    for name in ("x" * 3001, "é" * 1200):
        with pytest.raises(DefinitionError, match="event_type"):
            await bus.subscribe(name, recorder(got), group="g")
        with pytest.raises(DefinitionError, match="group"):
            await bus.subscribe("Tick", recorder(got), group=name)
        with pytest.raises(DefinitionError, match="type"):
            await bus.publish(event(name))
    sent = event("Tick")
    await bus.publish(sent)
    await bus.drain()
    assert sorted(e.type for e in got) == sorted(["Tick", longest])


async def test_two_prefixes_share_a_server_without_seeing_each_other(
    nats_server: NatsServer,
) -> None:
    a = await NatsEventBus.connect(f"{nats_server.url}?prefix={_prefix()}")
    b = await NatsEventBus.connect(f"{nats_server.url}?prefix={_prefix()}")
    got_a: list[Event] = []
    got_b: list[Event] = []
    await a.subscribe("Tick", recorder(got_a), group="inventory")
    await b.subscribe("Tick", recorder(got_b), group="inventory")
    await a.publish(event("Tick", n=1))
    await a.drain()
    await b.drain()
    await asyncio.sleep(0.2)
    assert [e["n"] for e in got_a] == [1]
    assert got_b == []
    await a.close()
    await b.close()


async def test_an_undecodable_message_is_dead_lettered_and_later_events_flow(
    bus: NatsEventBus, nats_server: NatsServer
) -> None:
    got: list[Event] = []
    await bus.subscribe("Tick", recorder(got), group="g")
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.publish(f"{bus.prefix}.events.Tick", b"\xff not an envelope")
    await js.publish(f"{bus.prefix}.events.Tick", b'{"v": 99, "id": "x"}')
    await nc.close()
    sent = event("Tick", n=1)
    await bus.publish(sent)
    await bus.drain()
    assert ids(got) == [sent.event_id]
    letters = await bus.dead_letters("g")
    assert [letter.event.type for letter in letters] == ["sagakit.Undecodable"] * 2
    assert "undecodable" in letters[0].error
    assert "newer" in letters[1].error


async def test_a_large_event_or_garbage_is_dead_lettered_whole_and_replays_exactly(
    bus: NatsEventBus, nats_server: NatsServer
) -> None:
    # A dead letter used to be a JSON record with the envelope inside as text: escaped
    # again, a 700 KB event full of quotes (or 300 KB of control bytes, each \u0001)
    # passed the server's 1 MB maximum, the dead-lettering failed and was retried for
    # ever (every 30 s, and drain() never returned).
    got: list[Event] = []
    failing = True

    def handler(e: Event) -> None:
        if failing:
            raise ValueError("no")
        got.append(e)

    await bus.subscribe("Tick", handler, group="g", max_deliveries=1)
    nc = await nats.connect(nats_server.url)
    garbage = b"\x01" * 300_000
    await nc.jetstream().publish(f"{bus.prefix}.events.Tick", garbage)
    at_limit = b"\xff" * nc.max_payload  # leaves no room for the dead letter's header
    await nc.jetstream().publish(f"{bus.prefix}.events.Tick", at_limit)
    await nc.close()
    big = event("Tick", quotes='"' * 350_000)
    await bus.publish(big)
    await asyncio.wait_for(bus.drain(), 20)
    letters = await bus.dead_letters("g")
    assert [d.event.type for d in letters] == ["sagakit.Undecodable"] * 2 + ["Tick"]
    assert letters[0].event["envelope"] == garbage[:10_000].decode()
    assert letters[2].event == big
    with pytest.raises(DefinitionError, match="cut to fit"):
        await bus.replay_dead_letter("g", letters[1].id)
    failing = False
    await bus.replay_dead_letter("g", letters[2].id)
    await asyncio.wait_for(bus.drain(), 20)
    assert got == [big]


async def test_dead_letters_stored_by_an_earlier_version_are_listed_and_replayed(
    bus: NatsEventBus, nats_server: NatsServer
) -> None:
    got: list[Event] = []
    await bus.subscribe("Tick", recorder(got), group="g")  # makes the streams
    consumer = bus._subscriptions[0].consumer
    old = event("Tick", n=1)
    record = {"v": 1, "group": "g", "consumer": consumer, "subscription": "Tick",
              "error": "ValueError: no", "deliveries": 5, "failed_at": 1.5,
              "envelope": encode_event(old).decode()}  # fmt: skip
    nc = await nats.connect(nats_server.url)
    await nc.jetstream().publish(f"{bus.prefix}.dlq.g", json.dumps(record).encode())
    await nc.close()
    [letter] = await bus.dead_letters("g")
    assert (letter.event, letter.error, letter.deliveries) == (old, "ValueError: no", 5)
    await bus.replay_dead_letter("g", letter.id)
    await bus.drain()
    assert got == [old]
    assert await bus.dead_letters("g") == []


async def test_the_same_event_published_twice_is_stored_once(bus: NatsEventBus) -> None:
    got: list[Event] = []
    await bus.subscribe("Tick", recorder(got), group="g")
    sent = event("Tick")
    await bus.publish(sent)
    await bus.publish(sent)  # a retry after a lost PubAck
    await bus.drain()
    await asyncio.sleep(0.1)
    assert ids(got) == [sent.event_id]


async def test_a_payload_that_is_not_json_is_refused_before_the_wire(bus: NatsEventBus) -> None:
    with pytest.raises(DefinitionError):
        await bus.publish(Event("Tick", "o-1", {"when": object()}))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"group": ""},
        {"max_deliveries": 0},
        {"max_deliveries": True},
        {"ack_timeout": 0},
        {"ack_timeout": float("nan")},
        {"backoff": -1},
    ],
)
async def test_bad_subscribe_arguments_are_refused(
    bus: NatsEventBus, kwargs: dict[str, object]
) -> None:
    with pytest.raises(DefinitionError):
        await bus.subscribe("Tick", recorder([]), **kwargs)  # type: ignore[arg-type]


async def test_a_bad_dead_letter_id_is_refused(bus: NatsEventBus) -> None:
    for letter_id in ("-1", "0", "99999999999999999999999", "1e3", ""):
        with pytest.raises(DefinitionError):
            await bus.replay_dead_letter("g", letter_id)


# --- a server that restarts ----------------------------------------------------------------


@pytest.fixture
async def restartable(nats_server: NatsServer) -> NatsServer:
    if not nats_server.restartable:
        pytest.skip("needs the private nats-server (SAGAKIT_TEST_NATS_URL is not restartable)")
    return nats_server


async def test_events_published_before_a_restart_reach_a_running_consumer_after_it(
    restartable: NatsServer, bus: NatsEventBus
) -> None:
    got: list[Event] = []
    gate = asyncio.Event()

    async def held(e: Event) -> None:
        await gate.wait()
        got.append(e)

    await bus.subscribe("Tick", held, group="g", ack_timeout=1.0)
    sent = [event("Tick", n=i) for i in range(5)]
    for e in sent:
        await bus.publish(e)
    await asyncio.to_thread(restartable.restart)
    gate.set()
    # The loop that held the first event acknowledges into the reconnecting
    # client or a fresh connection; whatever was lost comes again after ack_wait.
    await _wait(lambda: {e.event_id for e in got} >= set(ids(sent)), "all 5 after the restart")
    await bus.drain()


async def test_publish_during_an_outage_is_backend_unavailable_then_works_again(
    restartable: NatsServer, bus: NatsEventBus
) -> None:
    got: list[Event] = []
    await bus.subscribe("Tick", recorder(got), group="g")
    await bus.publish(event("Tick", n=0))
    await bus.drain()
    await asyncio.to_thread(restartable.stop)
    try:
        await asyncio.sleep(0.2)  # the client notices the connection is gone
        with pytest.raises(BackendUnavailable):
            async with asyncio.timeout(5):
                await bus.publish(event("Tick", n=1))
    finally:
        await asyncio.to_thread(restartable.start)
    after = event("Tick", n=2)
    async with asyncio.timeout(10):
        while True:
            try:
                await bus.publish(after)
                break
            except BackendUnavailable:
                await asyncio.sleep(0.1)
    await _wait(lambda: after.event_id in ids(got), "the event after the outage")
    assert [e["n"] for e in got] == [0, 2], "the refused event was not sent later"


async def test_close_while_the_server_is_down_returns(
    restartable: NatsServer, nats_server: NatsServer
) -> None:
    bus = await NatsEventBus.connect(f"{nats_server.url}?prefix={_prefix()}&timeout=1")
    await bus.subscribe("Tick", recorder([]), group="g")
    await bus.subscribe("Tick", recorder([]))
    await asyncio.to_thread(restartable.stop)
    try:
        async with asyncio.timeout(10):
            await bus.close()
        with pytest.raises(BackendError):
            await bus.publish(event())
    finally:
        await asyncio.to_thread(restartable.start)


# --- slow and stuck handlers -----------------------------------------------------------------


def test_the_delivery_count_is_read_from_both_ack_subject_forms() -> None:
    from sagakit.adapters.nats_consumer import _deliveries

    assert _deliveries("$JS.ACK.s-events.g~T.3.10.9.1700000000000000000.0") == 3
    assert _deliveries("$JS.ACK.dom.acchash.s-events.g~T.7.10.9.1700000000000000000.0.tok") == 7
    for reply in ("", "_INBOX.abc", "$JS.ACK.a.b.x.1.1.1.0", "$JS.API.a.b.1.1.1.1.0"):
        assert _deliveries(reply) == 0


def test_the_stream_sequence_is_read_from_both_ack_subject_forms() -> None:
    from sagakit.adapters._nats_attempts import stream_sequence

    assert stream_sequence("$JS.ACK.s-events.g~T.3.10.9.1700000000000000000.0") == 10
    reply = "$JS.ACK.dom.acchash.s-events.g~T.7.12.9.1700000000000000000.0.tok"
    assert stream_sequence(reply) == 12
    for reply in ("", "_INBOX.abc", "$JS.ACK.a.b.1.x.1.1.0", "$JS.API.a.b.1.1.1.1.0"):
        assert stream_sequence(reply) == 0


async def _attempt_records(bus: NatsEventBus) -> list[int]:
    """The attempt counts in the bus's attempts stream, oldest first."""
    assert bus._js is not None
    js, stream = bus._js, f"{bus.prefix}-attempts"
    found, seq = [], 1
    while True:
        try:
            raw = await js.get_msg(stream, seq, subject=f"{bus.prefix}.attempts.>", next=True)
        except nats.js.errors.NotFoundError:
            return found
        found.append(json.loads(raw.data or b"")["n"])
        seq = (raw.seq or seq) + 1


async def test_attempts_are_recorded_for_redeliveries_and_purged_once_settled(
    bus: NatsEventBus,
) -> None:
    """A first delivery costs no record; a failure is recorded, a redelivery's start
    too (before its handler runs); the record goes once the event is settled."""
    seen: list[tuple[int, list[int]]] = []

    def records() -> Awaitable[list[int]]:
        return _attempt_records(bus)

    async def handler(e: Event) -> None:
        seen.append((e["n"], await records()))
        if e["n"] == 1 or len(seen) == 1:
            raise ValueError("fails")

    await bus.subscribe("Job", handler, group="w", max_deliveries=2, backoff=0.01)
    await bus.publish(event("Job", n=0))
    await bus.drain()
    await bus.publish(event("Job", n=1))
    await bus.drain()
    assert seen == [(0, []), (0, [2]), (1, []), (1, [2])], "1 failure + this start"
    assert len(await bus.dead_letters("w")) == 1
    assert await records() == []


async def test_a_first_delivery_running_long_is_recorded_while_it_runs(
    bus: NatsEventBus,
) -> None:
    """Past 60% of ack_timeout a first delivery's attempt is written (a handler that
    hangs then counts); one that still returns has it purged, one that fails counts 1."""

    def records() -> Awaitable[list[int]]:
        return _attempt_records(bus)

    seen: list[list[int]] = []

    async def slow(e: Event) -> None:
        await asyncio.sleep(0.5)  # of an ack_timeout of 0.6 s
        seen.append(await records())
        if e["n"] == 1 and len(seen) == 2:
            raise ValueError("fails")

    await bus.subscribe("Job", slow, group="w", ack_timeout=0.6, backoff=0.01)
    await bus.publish(event("Job", n=0))
    await bus.drain()
    assert seen == [[1]]
    assert await records() == [], "purged with the ack"
    await bus.publish(event("Job", n=1))
    await bus.drain()
    assert seen[1:] == [[1], [2]], "its failure counted once, then its redelivery's start"
    assert await records() == []


@pytest.mark.parametrize("attempt", range(3))  # it was a race: lost about one time in three
async def test_events_queued_behind_a_handler_at_close_go_back_at_once(
    nats_server: NatsServer, attempt: int
) -> None:
    # close() let the loop give its queued events back (nak) while its inbox and pull
    # request were still open: the server sent them straight back to it, and those in
    # flight when the inbox went were lost until ack_wait (30 s here), not "at once".
    url = f"{nats_server.url}?prefix={_prefix()}"
    first = await NatsEventBus.connect(url)
    gate = asyncio.Event()
    got: list[int] = []
    later: list[int] = []

    async def held(e: Event) -> None:
        got.append(e["n"])
        await gate.wait()

    subscription = await first.subscribe("Tick", held, group="g", ack_timeout=30)
    for i in range(3):
        await first.publish(event("Tick", n=i))
    await _wait(lambda: len(subscription._pending) == 2, "two events queued")
    asyncio.get_running_loop().call_later(0.01, gate.set)
    await first.close()
    second = await NatsEventBus.connect(url)
    await second.subscribe("Tick", lambda e: later.append(e["n"]), group="g")
    await _wait(lambda: sorted(later) == [1, 2], "the queued events, at once")
    await second.close()
    assert got == [0]


@pytest.mark.parametrize("deleted", ["attempts", "dlq"])
async def test_a_poisoned_event_is_dead_lettered_after_the_bus_streams_were_deleted(
    bus: NatsEventBus, deleted: str
) -> None:
    # Writing an attempt or a dead letter to a stream deleted by hand meets
    # NoStreamResponseError (js.publish's, not the NoRespondersError the bus looked for):
    # the stream was never made again, attempts were never counted, and the event was
    # retried for ever instead of dead-lettered.
    assert bus._js is not None
    tries: list[int] = []

    def poisoned(e: Event) -> None:
        tries.append(e["n"])
        raise ValueError("poisoned")

    await bus.subscribe("Job", poisoned, group="w", max_deliveries=2, backoff=0.01)
    await bus._js.delete_stream(f"{bus.prefix}-{deleted}")
    await bus.publish(event("Job", n=0))
    async with asyncio.timeout(20):
        while not await bus.dead_letters("w"):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await bus.drain()
    assert tries == [0, 0]


async def test_a_subscription_outlives_a_failure_to_remake_the_attempts_stream(
    bus: NatsEventBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Recording a failed attempt with the attempts stream deleted now makes the streams
    # again (the test above); an error doing so (JetStream full, the server going away)
    # must not escape the handler's error path, which would end the subscription's loop.
    assert bus._js is not None
    tries: list[int] = []

    def handler(e: Event) -> None:
        tries.append(e["n"])
        if e["n"] == 0 and tries.count(0) == 1:
            raise ValueError("fails once")

    await bus.subscribe("Job", handler, group="w", backoff=0.01)
    await bus._js.delete_stream(f"{bus.prefix}-attempts")

    async def full(js: object) -> None:
        raise BackendBusy(bus.url, "JetStream storage full")

    monkeypatch.setattr(bus, "_ensure_streams", full)
    await bus.publish(event("Job", n=0))
    await bus.publish(event("Job", n=1))
    async with asyncio.timeout(10):
        await bus.drain()
    assert sorted(tries) == [0, 0, 1]


async def test_an_event_whose_handler_kills_every_consumer_is_dead_lettered(
    nats_server: NatsServer,
) -> None:
    """Counted from its second delivery (a first one is counted only if its handler
    fails): with max_deliveries=2, dead-lettered after three starts, none after."""
    url = f"{nats_server.url}?prefix={_prefix()}"
    starts = 0
    held = asyncio.Event()

    async def hang(e: Event) -> None:
        nonlocal starts
        starts += 1
        held.set()
        await asyncio.sleep(3600)

    publisher = await NatsEventBus.connect(url)
    try:
        # ack_timeout leaves time to kill the bus before 60% of it, when a running
        # first delivery's attempt is written (a hang, not a death, would count).
        await publisher.subscribe("Job", hang, group="w", max_deliveries=2, ack_timeout=1.0)
        await publisher.publish(event("Job"))
        dying = publisher
        for _ in range(3):
            async with asyncio.timeout(10):
                await held.wait()
            held.clear()
            await _kill(dying)
            dying = await NatsEventBus.connect(url)
            await dying.subscribe("Job", hang, group="w", max_deliveries=2, ack_timeout=1.0)
        for _ in range(200):
            if await dying.dead_letters("w"):
                break
            await asyncio.sleep(0.05)
        [letter] = await dying.dead_letters("w")
        assert (starts, letter.deliveries) == (3, 2)
        assert "not acknowledged" in letter.error
        await dying.close()
    finally:
        if not publisher._closed:
            await publisher.close()


async def test_events_queued_behind_a_slow_handler_are_not_redelivered(
    bus: NatsEventBus,
) -> None:
    handled: list[int] = []

    async def slow(e: Event) -> None:
        await asyncio.sleep(0.3)
        handled.append(e["n"])

    # Six events of 0.3 s each behind one another: the last waits 1.5 s, beyond
    # the ack timeout, yet none may come twice or be dead-lettered.
    await bus.subscribe("Tick", slow, group="g", ack_timeout=1.0, max_deliveries=1)
    for i in range(6):
        await bus.publish(event("Tick", n=i))
    await _wait(lambda: len(handled) >= 6, "six slow deliveries")
    await bus.drain()
    assert handled == list(range(6))
    assert await bus.dead_letters("g") == []


async def test_a_stuck_handler_lets_its_queued_events_go_to_the_group(
    nats_server: NatsServer,
) -> None:
    url = f"{nats_server.url}?prefix={_prefix()}"
    stuck_bus, other_bus = await NatsEventBus.connect(url), await NatsEventBus.connect(url)
    release = asyncio.Event()
    held: list[int] = []

    async def stuck(e: Event) -> None:
        held.append(e["n"])
        await release.wait()

    got: list[int] = []
    # Cancelled at its ack timeout, each of its events fails there and comes back to
    # the group after its backoff, until the other consumer has it (no dead letter first).
    await stuck_bus.subscribe(
        "Tick", stuck, group="g", ack_timeout=0.6, backoff=0.05, max_deliveries=50
    )
    for i in range(3):
        await stuck_bus.publish(event("Tick", n=i))
    await _wait(lambda: held == [0], "the first event to be held")
    await other_bus.subscribe(
        "Tick", recorder_n(got), group="g", ack_timeout=0.6, max_deliveries=50
    )
    await _wait(lambda: sorted(set(got)) == [0, 1, 2], "the group to get all three")
    release.set()
    await stuck_bus.close()
    await other_bus.close()


def recorder_n(into: list[int]) -> Callable[[Event], None]:
    def handler(e: Event) -> None:
        into.append(e["n"])

    return handler


# --- more faults -------------------------------------------------------------------------------


async def test_events_survive_the_server_being_killed(
    restartable: NatsServer, nats_server: NatsServer
) -> None:
    url = f"{nats_server.url}?prefix={_prefix()}"
    publisher = await NatsEventBus.connect(url)
    subscription = await publisher.subscribe("Tick", recorder([]), group="g")
    await subscription.cancel()
    sent = [event("Tick", n=i) for i in range(5)]
    for e in sent:
        await publisher.publish(e)
    await _kill(publisher)
    await asyncio.to_thread(restartable.kill)  # SIGKILL: no clean shutdown
    await asyncio.to_thread(restartable.start)
    consumer = await NatsEventBus.connect(url)
    got: list[Event] = []
    await consumer.subscribe("Tick", recorder(got), group="g")
    await _wait(lambda: len(got) >= 5, "the 5 acknowledged events")
    assert ids(got) == ids(sent)
    await consumer.close()


async def test_an_event_over_the_servers_max_payload_is_refused(bus: NatsEventBus) -> None:
    # The client's own words were "nats: maximum payload exceeded": not how big the
    # event was, nor what the limit is or where it is set.
    with pytest.raises(BackendRefused) as refused:
        await bus.publish(event("Big", blob="x" * 2_000_000))
    message = str(refused.value)
    assert "max_payload" in message, message
    assert "1,048,576" in message, message  # the server's default
    assert "2,000,1" in message, message  # the envelope's size, in bytes
    await bus.publish(event("Small"))  # the connection is still good


async def test_drain_inside_a_handler_is_refused_not_a_deadlock(bus: NatsEventBus) -> None:
    errors: list[BaseException] = []

    async def handler(e: Event) -> None:
        try:
            await bus.drain()
        except RuntimeError as exc:
            errors.append(exc)

    await bus.subscribe("Tick", handler, group="g")
    await bus.publish(event("Tick"))
    async with asyncio.timeout(10):
        await bus.drain()
    assert len(errors) == 1


async def test_a_consumer_deleted_from_outside_is_made_again(
    bus: NatsEventBus, nats_server: NatsServer
) -> None:
    got: list[Event] = []
    await bus.subscribe("Tick", recorder(got), group="g")
    nc = await nats.connect(nats_server.url)
    await nc.jetstream().delete_consumer(f"{bus.prefix}-events", "g~Tick")
    await nc.close()
    sent = event("Tick")

    async def published_and_seen() -> None:
        # Events published while the group has no consumer are not kept for it.
        while not got:
            with contextlib.suppress(BackendError):
                await bus.publish(event("Tick"))
            await asyncio.sleep(0.2)

    async with asyncio.timeout(10):
        await published_and_seen()
    await bus.publish(sent)
    await _wait(lambda: sent.event_id in ids(got), "events after the consumer came back")


async def test_a_stream_deleted_from_outside_is_made_again(
    bus: NatsEventBus, nats_server: NatsServer
) -> None:
    got: list[Event] = []
    await bus.subscribe("Tick", recorder(got), group="g")
    nc = await nats.connect(nats_server.url)
    await nc.jetstream().delete_stream(f"{bus.prefix}-events")
    await nc.close()

    async def until_seen() -> None:
        while not got:
            with contextlib.suppress(BackendError):
                await bus.publish(event("Tick"))
            await asyncio.sleep(0.2)

    async with asyncio.timeout(10):
        await until_seen()


async def test_concurrency_runs_sagas_at_once_and_keeps_each_sagas_order(
    nats_server: NatsServer,
) -> None:
    url = f"{nats_server.url}?prefix={_prefix()}&concurrency=4"
    bus = await NatsEventBus.connect(url)
    seen: list[tuple[str, int]] = []
    running = 0
    most = 0

    async def slow(e: Event) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.05)
        seen.append((e.saga_id, e["n"]))
        running -= 1

    await bus.subscribe("Step", slow, group="g")
    sent = [event("Step", f"o-{i % 4}", n=i) for i in range(24)]
    for e in sent:
        await bus.publish(e)
    await _wait(lambda: len(seen) >= 24, "24 deliveries")
    await bus.drain()
    assert most == 4, f"at most {most} handlers ran at once"
    for saga in ("o-0", "o-1", "o-2", "o-3"):
        assert [n for s, n in seen if s == saga] == [e["n"] for e in sent if e.saga_id == saga]
    await bus.close()


async def test_a_published_status_header_is_an_event_not_a_pull_status(
    bus: NatsEventBus, nats_server: NatsServer
) -> None:
    got: list[Event] = []
    await bus.subscribe("Tick", recorder(got), group="g", max_deliveries=2, backoff=0.05)
    nc = await nats.connect(nats_server.url)
    disguised = event("Tick", n=1)
    await nc.jetstream().publish(
        f"{bus.prefix}.events.Tick",
        encode_event(disguised),
        headers={"Status": "408", "Description": "Request Timeout"},
    )
    await nc.close()
    await _wait(lambda: ids(got) == [disguised.event_id], "the disguised event, handled")
    await bus.drain()


_HOLDER = """
import asyncio, sys
from sagakit.adapters.nats_bus import NatsEventBus

async def main() -> None:
    bus = await NatsEventBus.connect(sys.argv[1])

    async def hold(event) -> None:
        print("held", event["n"], flush=True)
        await asyncio.sleep(3600)

    await bus.subscribe("Tick", hold, group="g", ack_timeout=1.0)
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_consumer_process_killed_with_sigkill_loses_its_event_to_another(
    nats_server: NatsServer,
) -> None:
    url = f"{nats_server.url}?prefix={_prefix()}"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, url, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        async with asyncio.timeout(20):
            assert (await child.stdout.readline()).strip() == b"ready"
            bus = await NatsEventBus.connect(url)
            sent = event("Tick", n=7)
            await bus.publish(sent)
            assert (await child.stdout.readline()).strip() == b"held 7"
        child.kill()  # SIGKILL: no ack, no nak, the socket just closes
        await child.wait()
        got: list[Event] = []
        await bus.subscribe("Tick", recorder(got), group="g", ack_timeout=1.0)
        await _wait(lambda: ids(got) == [sent.event_id], "the survivor to take the event over")
        await bus.close()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


# --- servers too old for the bus --------------------------------------------------------


@pytest.mark.parametrize("version", ["2.9.10", "2.2.0", "1.4.1"])
def test_a_server_before_2_10_is_refused(version: str) -> None:
    refusal = rf"version {re.escape(version)}; .* needs 2\.10 or newer"
    with pytest.raises(BackendRefused, match=refusal) as info:
        check_server_version("nats://h:4222", "NATS", version, MIN_SERVER, "filters")
    assert not info.value.retryable


@pytest.mark.parametrize("version", ["2.10.0", "2.10.26", "2.15.1", "3.0.0", ""])
def test_a_server_from_2_10_is_taken(version: str) -> None:
    check_server_version("nats://h:4222", "NATS", version, MIN_SERVER, "filters")


def _old_server() -> str | None:
    """A nats-server binary older than 2.10 on this machine (Debian 12 packages 2.9)."""
    for candidate in ("/usr/sbin/nats-server", "/usr/bin/nats-server"):
        if not os.access(candidate, os.X_OK):
            continue
        shown = subprocess.run([candidate, "--version"], capture_output=True, text=True).stdout
        found = re.search(r"v(\d+)\.(\d+)", shown)
        if found and (int(found[1]), int(found[2])) < (2, 10):
            return candidate
    return None


async def test_a_real_server_before_2_10_is_refused_before_anything_is_created(
    tmp_path: Path,
) -> None:
    # Such a server takes a consumer with several filter subjects and ignores them:
    # every handler would get events of every type (a shipment for a declined order).
    binary = _old_server()
    if binary is None:
        pytest.skip("no nats-server older than 2.10 here (the pure check above still runs)")
    server = NatsServer(f"nats://127.0.0.1:{free_port()}", binary=binary, store=tmp_path / "store")
    server.start()
    try:
        bus = NatsEventBus.from_url(f"{server.url}?prefix={_prefix()}")
        with pytest.raises(BackendRefused, match=r"needs 2\.10 or newer"):
            await bus.subscribe("OrderPlaced", lambda e: None, group="g")
        with pytest.raises(BackendRefused, match=r"needs 2\.10 or newer"):
            await bus.publish(event("OrderPlaced", "s1"))
        await bus.close()
        connection = await nats.connect(server.url)
        try:
            assert await connection.jetstream().streams_info() == []
        finally:
            await connection.close()
    finally:
        server.stop()


class _WithoutJetStream(NatsServer):
    def command(self, binary: str) -> list[str]:
        return [binary, "--addr", "127.0.0.1", "--port", str(self.port)]


@contextlib.contextmanager
def _another(kind: type[NatsServer], session: NatsServer, tmp_path: Path) -> Iterator[NatsServer]:
    """A private server of ``kind``, from the session's server's binary, for one test."""
    if session._binary is None:
        pytest.skip("the session's NATS server is external: no binary to start another")
    server = kind(
        f"nats://127.0.0.1:{free_port()}", binary=session._binary, store=tmp_path / "store"
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_a_server_without_jetstream_is_refused_not_retried(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # The same binary as the session's server, started without --jetstream: a
    # configuration no retry changes, unlike JetStream that is still starting.
    with _another(_WithoutJetStream, nats_server, tmp_path) as server:
        bus = NatsEventBus.from_url(f"{server.url}?prefix={_prefix()}&timeout=2")
        with pytest.raises(BackendRefused, match="runs without JetStream") as info:
            await bus.publish(event("OrderPlaced", "s1"))
        assert not info.value.retryable
        await bus.close()


class _SmallStore(NatsServer):
    """A server whose JetStream may keep 1 MB on disk."""

    def command(self, binary: str) -> list[str]:
        assert self._store is not None
        self._store.mkdir(parents=True, exist_ok=True)
        config = self._store.parent / "small.conf"
        config.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f'jetstream {{ store_dir: "{self._store}", max_file_store: 1MB }}\n'
        )
        return [binary, "-c", str(config)]


async def test_a_full_jetstream_is_busy_not_unavailable(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # Full is a state a retry may outlive (consumers acknowledge, events expire);
    # it used to be reported as the server being down.
    with _another(_SmallStore, nats_server, tmp_path) as server:
        bus = NatsEventBus.from_url(f"{server.url}?prefix={_prefix()}")
        # A group that exists and reads nothing: the stream keeps every event for it.
        subscription = await bus.subscribe("Blob", recorder([]), group="idle")
        await subscription.cancel()
        refused: BackendError | None = None
        for n in range(2000):
            try:
                await bus.publish(event("Blob", f"s{n}", blob="x" * 2000))
            except BackendError as exc:
                refused = exc
                break
        assert isinstance(refused, BackendBusy), refused
        assert "storage is full" in str(refused)
        assert refused.retryable
        await bus.close()
