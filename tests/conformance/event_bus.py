"""Conformance suite for event bus backends: every point of the EventBus port, on real servers.

A backend's tests subclass :class:`EventBusConformance` (not collected by pytest
itself: its name does not start with ``Test``) and implement the harness:

``async def make_bus(self) -> EventBus`` (required)
    A new, ready bus with no subscribers, connected to the same backend
    namespace as every other bus this test makes: the buses of one test share
    the broker (two buses subscribing one group compete for its events), and
    the namespace (stream/queue/key prefix) is unique to the test, so tests
    never see each other's groups. pytest makes a new instance of the class for
    each test, so a prefix created lazily on ``self`` is per test.

``async def kill(self, bus: EventBus) -> None`` (required)
    The bus's process dies holding events: its connections drop without
    acknowledging what its handlers hold (for the in-process bus: its
    subscriptions are abandoned unacknowledged). The suite does not close a
    killed bus.

``async def restart_server(self) -> None`` (optional)
    Stop the broker and start it again on the same storage, returning once it
    accepts connections. The default skips the tests that need it.

Tests pass small timings (:attr:`ack_timeout`, :attr:`backoff`) to
``subscribe`` so they run fast; a backend may raise :attr:`timeout` if its
server is slow. Buses made by :meth:`EventBusConformance.bus` are closed after
the test. Delivery is asynchronous on every backend: single-bus tests wait with
``drain()``, tests spanning buses poll with :meth:`EventBusConformance.eventually`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

import pytest

from sagakit.core.event import Event
from sagakit.errors import BackendError, DefinitionError
from sagakit.ports.event_bus import ALL_EVENTS, EventBus, Handler, Subscription, new_event_id

__all__ = ["EventBusConformance", "bodies", "event", "recorder"]


def recorder(into: list[Event], label: str | None = None, log: list[str] | None = None) -> Handler:
    """A handler appending each event to ``into`` (and ``label:type`` to ``log``)."""

    async def handler(event: Event) -> None:
        into.append(event)
        if log is not None:
            log.append(f"{label}:{event.type}")

    return handler


def event(type_: str = "OrderPlaced", saga_id: str = "o-1", **payload: object) -> Event:
    """A stamped event (an id and a time of its own), so a test can follow it by its id."""
    return Event(type_, saga_id, payload, event_id=new_event_id(), timestamp=1_700_000_000)


def bodies(events: list[Event]) -> list[dict[str, object]]:
    return [e.body() for e in events]


def ids(events: list[Event]) -> list[str]:
    return [e.event_id for e in events]


class EventBusConformance(ABC):
    """What every :class:`~sagakit.ports.event_bus.EventBus` backend must do."""

    timeout: float = 10.0  # the longest any single wait of a test may take
    ack_timeout: float = 1.0  # passed to subscribe where a test needs a takeover
    backoff: float = 0.1  # passed to subscribe where a test needs a redelivery
    settle: float = 0.3  # how long a test watches that nothing more arrives

    # --- the harness a backend implements ------------------------------------------------

    @abstractmethod
    async def make_bus(self) -> EventBus:
        """A new bus with no subscribers, on this test's shared backend namespace."""

    @abstractmethod
    async def kill(self, bus: EventBus) -> None:
        """Drop the bus as a crashed process would: nothing it holds is acknowledged."""

    async def restart_server(self) -> None:
        """Restart the broker on the same storage (default: this backend cannot)."""
        pytest.skip(f"{type(self).__name__} cannot restart its server")

    # --- helpers ------------------------------------------------------------------------

    @pytest.fixture(autouse=True)
    async def _close_buses(self) -> AsyncIterator[None]:
        self._buses: list[EventBus] = []
        self._killed: list[EventBus] = []
        yield
        for bus in reversed(self._buses):
            if any(bus is k for k in self._killed):
                continue
            with suppress(BackendError):
                async with asyncio.timeout(self.timeout):
                    await bus.close()

    async def bus(self) -> EventBus:
        """A new bus of this test, closed when the test ends."""
        bus = await self.make_bus()
        self._buses.append(bus)
        return bus

    async def crash(self, bus: EventBus) -> None:
        self._killed.append(bus)
        await self.kill(bus)

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[EventBus]:
        bus = await self.make_bus()
        try:
            yield bus
        finally:
            async with asyncio.timeout(self.timeout):
                await bus.close()

    async def drain(self, bus: EventBus) -> None:
        async with asyncio.timeout(self.timeout):
            await bus.drain()

    async def eventually(self, check: Callable[[], bool], what: str) -> None:
        """Wait until ``check()`` holds, failing after :attr:`timeout` with ``what``."""
        deadline = time.monotonic() + self.timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {self.timeout}s waiting for {what}")
            await asyncio.sleep(0.01)

    async def dead_letters_of(self, bus: EventBus, group: str, count: int) -> None:
        """Wait until ``group`` has ``count`` dead letters, failing after :attr:`timeout`."""
        deadline = time.monotonic() + self.timeout
        while len(await bus.dead_letters(group)) < count:
            if time.monotonic() > deadline:
                found = len(await bus.dead_letters(group))
                raise AssertionError(f"{group!r} has {found} dead letters, not {count}")
            await asyncio.sleep(0.02)

    async def quiet(self) -> None:
        """Let a moment pass in which nothing more should arrive."""
        await asyncio.sleep(self.settle)

    # --- publishing and plain subscriptions -----------------------------------------------

    async def test_is_an_event_bus(self) -> None:
        async with self.opened() as bus:
            assert isinstance(bus, EventBus)

    async def test_drain_with_nothing_published_returns(self) -> None:
        async with self.opened() as bus:
            await self.drain(bus)
            await bus.publish(event("Nobody"))  # no subscriber: dropped, no error
            await self.drain(bus)

    async def test_a_subscriber_gets_its_type_and_no_other(self) -> None:
        async with self.opened() as bus:
            placed: list[Event] = []
            await bus.subscribe("OrderPlaced", recorder(placed))
            sent = [event("OrderPlaced", n=1), event("PaymentTaken"), event("OrderPlaced", n=2)]
            for e in sent:
                await bus.publish(e)
            await self.drain(bus)
            assert bodies(placed) == bodies([sent[0], sent[2]])

    async def test_delivered_events_keep_their_id_and_body(self) -> None:
        async with self.opened() as bus:
            got: list[Event] = []
            await bus.subscribe("OrderPlaced", recorder(got))
            sent = Event(
                "OrderPlaced", "o-9", {"items": ["a", "b"], "amount": 3}, "", "e-9", timestamp=12
            )
            await bus.publish(sent)
            await self.drain(bus)
            assert len(got) == 1
            assert got[0].event_id == "e-9"
            assert got[0].timestamp == 12
            assert got[0].body() == sent.body()
            assert list(got[0].body()) == list(sent.body())

    async def test_an_unstamped_event_gets_a_fresh_id_and_the_time_at_publish(self) -> None:
        # The core makes no ids and reads no clock: the bus stamps what lacks them.
        async with self.opened() as bus:
            got: list[Event] = []
            await bus.subscribe("OrderPlaced", recorder(got))
            unstamped = Event("OrderPlaced", "o-1", {"n": 1})
            before = int(time.time())
            await bus.publish(unstamped)
            await bus.publish(unstamped)  # published again: a new event, with a new id
            after = int(time.time())
            await self.drain(bus)
            assert len(got) == 2
            for received in got:
                assert len(received.event_id) == 32
                int(received.event_id, 16)
                assert before <= received.timestamp <= after
                assert received.body() | {"timestamp": 0} == unstamped.body()
            assert got[0].event_id != got[1].event_id
            assert (unstamped.event_id, unstamped.timestamp) == ("", 0), "events are values"

    async def test_an_event_with_only_an_id_keeps_it_and_gets_the_time(self) -> None:
        async with self.opened() as bus:
            got: list[Event] = []
            await bus.subscribe("OrderPlaced", recorder(got))
            before = int(time.time())
            await bus.publish(Event("OrderPlaced", "o-1", event_id="outbox-17"))
            await bus.publish(Event("OrderPlaced", "o-2", timestamp=5))
            await self.drain(bus)
            assert got[0].event_id == "outbox-17"
            assert before <= got[0].timestamp <= int(time.time())
            assert got[1].timestamp == 5
            assert got[1].event_id not in ("", "outbox-17")

    async def test_ids_that_differ_only_in_spacing_are_different_events(self) -> None:
        # NATS carried the id as the Nats-Msg-Id header, whose client writes a line
        # break as a space and whose server trims a value: "k\nz" and "k z" were one id
        # there, the second event acknowledged by publish and never stored. An id the
        # header cannot hold (over 64 KB) was refused on NATS alone.
        pairs = [("k\nz", "k z"), (" lead", "lead"), ("trail ", "trail"), ("c\r\nd", "c  d")]
        flat = [i_d for pair in pairs for i_d in pair]
        sent = [Event("OrderPlaced", f"o-{i}", event_id=i_d) for i, i_d in enumerate(flat)]
        sent.append(Event("OrderPlaced", "o-long", event_id="x" * 70_000))
        async with self.opened() as bus:
            got: list[Event] = []
            await bus.subscribe("OrderPlaced", recorder(got), group="g")
            for e in sent:
                await bus.publish(e)
            await self.eventually(lambda: len(got) >= len(sent), f"{len(sent)} events")
            assert sorted(ids(got)) == sorted(ids(sent))

    async def test_a_value_that_would_arrive_as_another_type_is_refused(self) -> None:
        # orjson wrote a datetime as its ISO text and a dataclass as an object: the
        # handlers of a broker got a str or a dict where those of memory:// got the
        # object itself (code using event["at"].year passed its tests in memory and
        # failed on a broker), and without orjson the same publish was refused.
        @dataclasses.dataclass
        class Money:
            amount: int

        bus = await self.bus()
        for value in (datetime.datetime(2024, 1, 2), datetime.date(2024, 1, 2), Money(3)):
            with pytest.raises(DefinitionError, match="not JSON") as refused:
                await bus.publish(event("Tick", value=value))
            assert refused.value.field == "payload"

    async def test_the_envelope_round_trips_every_field(self) -> None:
        publisher, consumer = await self.bus(), await self.bus()
        got: list[Event] = []
        await consumer.subscribe("PaymentCharged", recorder(got), group="shipping")
        sent = Event(
            "PaymentCharged",
            "order-ü-7",
            {
                "payment_id": "p1",
                "amount": 99.99,
                "items": [{"sku": "abc", "qty": 2}, None, True],
                "note": "naïve café ✓",
                "big": 2**53,
            },
            source="payment",
            event_id="9f2c41d0",
            timestamp=1_700_000_123,
            headers={
                "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "tracestate": "vendor=x",
            },
        )
        await publisher.publish(sent)
        await self.eventually(lambda: len(got) == 1, "the event")
        (received,) = got
        assert received.event_id == sent.event_id
        assert received.type == sent.type
        assert received.saga_id == sent.saga_id
        assert dict(received.payload) == dict(sent.payload)
        assert received.timestamp == sent.timestamp
        assert received.source == sent.source
        assert dict(received.headers) == dict(sent.headers)
        assert received.body() == sent.body()

    async def test_every_handler_of_a_type_receives(self) -> None:
        async with self.opened() as bus:
            lists: list[list[Event]] = [[], [], []]
            for got in lists:
                await bus.subscribe("OrderPlaced", recorder(got))
            sent = [event(n=i) for i in range(3)]
            for e in sent:
                await bus.publish(e)
            await self.drain(bus)
            for got in lists:
                assert bodies(got) == bodies(sent)

    async def test_star_receives_every_event(self) -> None:
        async with self.opened() as bus:
            everything: list[Event] = []
            await bus.subscribe(ALL_EVENTS, recorder(everything))
            await bus.subscribe("OrderPlaced", recorder([]))
            sent = [event("OrderPlaced"), event("Unsubscribed"), event("PaymentTaken", "o-2")]
            for e in sent:
                await bus.publish(e)
            await self.drain(bus)
            assert bodies(everything) == bodies(sent)

    async def test_order_of_one_publisher_is_kept(self) -> None:
        async with self.opened() as bus:
            got: list[Event] = []
            await bus.subscribe("Tick", recorder(got))
            sent = [event("Tick", n=i) for i in range(50)]
            for e in sent:
                await bus.publish(e)
            await self.drain(bus)
            assert [e["n"] for e in got] == list(range(50))

    async def test_drain_waits_for_slow_async_handlers(self) -> None:
        async with self.opened() as bus:
            finished: list[int] = []

            async def slow(e: Event) -> None:
                for _ in range(3):
                    await asyncio.sleep(0.005)
                finished.append(e["n"])

            await bus.subscribe("Tick", slow)
            for i in range(5):
                await bus.publish(event("Tick", n=i))
            await self.drain(bus)
            assert finished == [0, 1, 2, 3, 4]

    async def test_drain_waits_for_chains_of_events(self) -> None:
        async with self.opened() as bus:
            seen: list[str] = []

            async def placed(e: Event) -> None:
                seen.append(e.type)
                await bus.publish(event("StockReserved", e.saga_id))

            async def reserved(e: Event) -> None:
                seen.append(e.type)
                await asyncio.sleep(0.005)
                await bus.publish(event("PaymentTaken", e.saga_id))

            async def paid(e: Event) -> None:
                seen.append(f"{e.type}:{e.saga_id}")

            await bus.subscribe("OrderPlaced", placed)
            await bus.subscribe("StockReserved", reserved)
            await bus.subscribe("PaymentTaken", paid)
            await bus.publish(event("OrderPlaced", "o-5"))
            await self.drain(bus)
            assert seen == ["OrderPlaced", "StockReserved", "PaymentTaken:o-5"]

    async def test_sync_handlers_are_delivered_to(self) -> None:
        async with self.opened() as bus:
            plain: list[Event] = []
            grouped: list[Event] = []
            await bus.subscribe("Tick", plain.append)
            await bus.subscribe("Tick", grouped.append, group="sync")
            sent = [event("Tick", n=i) for i in range(3)]
            for e in sent:
                await bus.publish(e)
            await self.drain(bus)
            assert bodies(plain) == bodies(sent)
            assert bodies(grouped) == bodies(sent)

    async def test_events_of_many_sagas_all_arrive(self) -> None:
        async with self.opened() as bus:
            got: list[Event] = []
            await bus.subscribe("OrderPlaced", recorder(got))
            sent = [event("OrderPlaced", f"o-{i}") for i in range(20)]
            await asyncio.gather(*(bus.publish(e) for e in sent))
            await self.drain(bus)
            assert sorted(e.saga_id for e in got) == sorted(e.saga_id for e in sent)

    async def test_publish_after_close_raises_backend_error(self) -> None:
        bus = await self.make_bus()
        await bus.close()
        with pytest.raises(BackendError) as excinfo:
            await bus.publish(event("Tick"))
        assert "Tick" in str(excinfo.value) or "closed" in str(excinfo.value)

    # --- cancelling subscriptions ---------------------------------------------------------

    async def test_after_close_every_method_refuses_as_closed(self) -> None:
        # The Redis bus's dead_letters() and replay_dead_letter() quietly connected again
        # after close() (and left the connection open); the memory bus answered too.
        bus = await self.bus()
        await bus.subscribe("Tick", recorder([]), group="g")
        await bus.close()
        calls = {
            "publish": lambda: bus.publish(event("Tick")),
            "subscribe": lambda: bus.subscribe("Tick", recorder([]), group="g"),
            "dead_letters": lambda: bus.dead_letters("g"),
            "replay_dead_letter": lambda: bus.replay_dead_letter("g", "1"),
        }
        for call in calls.values():  # the one that did not raise: in the traceback
            with pytest.raises(BackendError, match="closed"):
                await call()
        await bus.close()  # again: nothing to do
        await self.drain(bus)  # nothing left to wait for

    async def test_names_are_taken_and_refused_alike_on_every_bus(self) -> None:
        # The rules differed: RabbitMQ refused groups with a space or over 64 characters
        # and types with '*', '#' or over 255 bytes; NATS took types up to 3,000
        # characters; memory and Redis took anything non-blank. One rule now, RabbitMQ's
        # (a name one bus takes, every bus takes), refused naming the field.
        bus = await self.bus()
        taken = ["order.placed", "Commande passée ✓", "a b", ">", "~Kg", "T" * 255, "é" * 127]
        got: list[Event] = []
        for i, event_type in enumerate(taken):
            await bus.subscribe(event_type, recorder(got), group=f"g-{i}.x_y")
        sent = [event(t) for t in taken]
        for e in sent:
            await bus.publish(e)
        await self.drain(bus)
        assert sorted(ids(got)) == sorted(ids(sent))
        for bad_type in ("T" * 256, "é" * 128, "a*", "orders.#", "a\nb", "\x00"):
            with pytest.raises(DefinitionError) as refused:
                await bus.subscribe(bad_type, recorder(got), group="g")
            assert refused.value.field == "event_type", bad_type
            with pytest.raises(DefinitionError) as refused:
                await bus.publish(event(bad_type))
            assert refused.value.field == "type", bad_type
        for bad_group in ("", " ", "a b", "x" * 65, "ü", "a/b", "a:b"):
            with pytest.raises(DefinitionError) as refused:
                await bus.subscribe("Tick", recorder(got), group=bad_group)
            assert refused.value.field == "group", bad_group
        await bus.subscribe("Tick", recorder(got), group="x" * 64)

    async def test_a_handler_that_cannot_take_the_event_is_refused_at_subscribe(self) -> None:
        # Taken, it failed every delivery with a TypeError until its events were dead
        # letters: a mistake of the code's, found only once events flowed.
        bus = await self.bus()

        async def no_argument() -> None: ...

        def two(event: Event, extra: str) -> None: ...

        def keyword_only(*, event: Event) -> None: ...

        for wrong in (no_argument, two, keyword_only):
            with pytest.raises(DefinitionError, match="one argument, the event") as refused:
                await bus.subscribe("Tick", wrong, group="g")  # type: ignore[arg-type]
            assert refused.value.field == "handler"

        def anything(*args: object, **kwargs: object) -> None: ...

        def defaulted(event: Event, extra: str = "") -> None: ...

        for right in (anything, defaulted, print):  # print: a builtin
            await bus.subscribe("Tick", right, group="g")

    async def test_cancel_stops_delivery_to_that_subscription_only(self) -> None:
        async with self.opened() as bus:
            cancelled: list[Event] = []
            kept: list[Event] = []
            subscription = await bus.subscribe("Tick", recorder(cancelled))
            await bus.subscribe("Tick", recorder(kept))
            await bus.publish(event("Tick", n=0))
            await self.drain(bus)
            await subscription.cancel()
            await bus.publish(event("Tick", n=1))
            await self.drain(bus)
            assert [e["n"] for e in cancelled] == [0]
            assert [e["n"] for e in kept] == [0, 1]

    async def test_cancel_of_a_star_subscription(self) -> None:
        async with self.opened() as bus:
            got: list[Event] = []
            subscription = await bus.subscribe(ALL_EVENTS, recorder(got))
            await subscription.cancel()
            await bus.publish(event("Tick"))
            await self.drain(bus)
            assert got == []

    async def test_cancel_twice_is_harmless(self) -> None:
        async with self.opened() as bus:
            got: list[Event] = []
            handler = recorder(got)
            first = await bus.subscribe("Tick", handler)
            await first.cancel()
            await first.cancel()
            await bus.subscribe("Tick", handler)
            await bus.publish(event("Tick"))
            await self.drain(bus)
            assert len(got) == 1

    async def test_a_handler_may_cancel_its_own_subscription(self) -> None:
        # "Handle one, then stop": cancel() waited for the loop running the handler that
        # awaited it (NATS, Redis): a deadlock, with the event never acknowledged and
        # drain() and close() hanging behind it.
        bus = await self.bus()
        got: list[int] = []
        subscriptions: list[Subscription] = []

        returned: list[int] = []

        async def once(e: Event) -> None:
            got.append(e["n"])
            await subscriptions[0].cancel()
            returned.append(e["n"])

        subscriptions.append(
            await bus.subscribe("Tick", once, group="g", ack_timeout=self.ack_timeout)
        )
        for i in range(3):
            await bus.publish(event("Tick", f"o-{i}", n=i))
        await self.eventually(lambda: bool(returned), "cancel() to return in the handler")
        await self.drain(bus)
        rest: list[int] = []
        await bus.subscribe(
            "Tick", lambda e: rest.append(e["n"]), group="g", ack_timeout=self.ack_timeout
        )
        await self.eventually(lambda: {*got, *rest} == {0, 1, 2}, "each event handled")
        await self.drain(bus)
        # The handler that cancelled returned: its event was acknowledged, not given
        # back (RabbitMQ closed the channel under the handler, which never acked).
        assert not set(returned) & set(rest), f"handled again: {returned} then {rest}"

    async def test_close_waits_for_the_handlers_a_cancelling_handler_left_running(
        self,
    ) -> None:
        # One saga's handler cancels the subscription while another saga's handler still
        # runs. On RabbitMQ the stop ran in the cancelling handler's task, and a close()
        # meanwhile found the consumer stopping and returned at once, disconnecting
        # under the other handler (its event unacknowledged, handled again).
        bus = await self.bus()
        started: list[str] = []
        finished: list[str] = []
        subscriptions: list[Subscription] = []

        async def handler(e: Event) -> None:
            started.append(e.saga_id)
            if e.saga_id == "stop":
                await subscriptions[0].cancel()
            else:
                await asyncio.sleep(self.settle)
            finished.append(e.saga_id)

        subscriptions.append(
            await bus.subscribe("Tick", handler, group="g", ack_timeout=self.ack_timeout * 5)
        )
        await bus.publish(event("Tick", "slow"))
        await self.eventually(lambda: bool(started), "the slow handler to start")
        await bus.publish(event("Tick", "stop"))
        await self.eventually(lambda: "stop" in started, "the cancelling handler to start")
        async with asyncio.timeout(self.timeout):
            await bus.close()
        assert sorted(started) == sorted(finished), "close() returned under a running handler"

    async def test_drain_inside_a_handler_is_refused_not_a_hang(self) -> None:
        # It waits for the handlers to finish, the caller's own included: refused with a
        # RuntimeError everywhere (the Redis bus waited for ever).
        bus = await self.bus()
        errors: list[str] = []

        async def impatient(e: Event) -> None:
            try:
                async with asyncio.timeout(self.timeout / 2):
                    await bus.drain()
            except RuntimeError as exc:
                errors.append(str(exc))

        await bus.subscribe("Tick", impatient, group="g")
        await bus.publish(event("Tick"))
        await self.eventually(lambda: bool(errors), "drain() in the handler to be refused")
        assert "wait for itself" in errors[0]
        await self.drain(bus)

    async def test_drain_in_a_task_a_handler_awaits_is_refused_not_a_hang(self) -> None:
        # asyncio.wait_for (a task of its own on Python 3.11), or any task the handler
        # awaits, waits for the handler as much as the handler itself: the memory, NATS
        # and RabbitMQ buses looked at the running task only and hung.
        bus = await self.bus()
        outcomes: list[str] = []

        async def impatient(e: Event) -> None:
            for wrapped in (
                lambda: asyncio.wait_for(bus.drain(), self.timeout / 4),
                lambda: asyncio.ensure_future(bus.drain()),
            ):
                try:
                    await wrapped()
                    outcomes.append("returned")
                except RuntimeError as exc:
                    outcomes.append(str(exc))
                except TimeoutError:
                    outcomes.append("hung")

        await bus.subscribe("Tick", impatient, group="g")
        await bus.publish(event("Tick"))
        await self.eventually(lambda: len(outcomes) == 2, "drain() in the handler to end")
        assert all("wait for itself" in o for o in outcomes), outcomes
        await self.drain(bus)

    async def test_a_handler_may_close_its_bus(self) -> None:
        # A "Stop" event's handler closing the bus deadlocked on NATS and Redis: close()
        # waited for the handler that awaited it.
        bus = await self.make_bus()
        returned: list[int] = []

        handler_done = asyncio.Event()

        async def stop(e: Event) -> None:
            await bus.close()
            returned.append(e["n"])
            await asyncio.sleep(0.1)  # the close it began waits for this handler
            handler_done.set()

        await bus.subscribe("Stop", stop, group="g")
        await bus.publish(event("Stop", n=1))
        await self.eventually(lambda: returned == [1], "close() to return in the handler")
        async with asyncio.timeout(self.timeout):
            await handler_done.wait()
        # close() from outside waits for the close the handler began, which goes on
        # after the handler: once it returns, nothing of the bus is left running
        # (its connection would leak otherwise).
        await bus.close()
        for _ in range(3):  # turns for what ends by itself (memory's dispatcher seeing the
            await asyncio.sleep(0)  # handler return); a close under way waits on the network
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not left, f"still running after close(): {left}"
        deadline = time.monotonic() + self.timeout
        while True:  # closed for good once the handler returned
            try:
                await bus.publish(event("Tick"))
            except BackendError:
                break
            assert time.monotonic() < deadline, "the bus never closed"
            await asyncio.sleep(0.02)

    async def test_close_from_outside_waits_for_the_close_a_handler_began(self) -> None:
        # RabbitMQ's second close() returned at once and disconnected under the handler
        # still running (its close went on in the handler's task, which never acked).
        bus = await self.make_bus()
        began, release = asyncio.Event(), asyncio.Event()
        finished: list[int] = []

        async def stop(e: Event) -> None:
            await bus.close()
            began.set()
            await release.wait()
            finished.append(e["n"])

        await bus.subscribe("Stop", stop, group="g", ack_timeout=self.ack_timeout)
        await bus.publish(event("Stop", n=1))
        async with asyncio.timeout(self.timeout):
            await began.wait()
        closing = asyncio.create_task(bus.close())
        await self.quiet()
        assert not closing.done(), "close() returned while the handler's close was under way"
        release.set()
        async with asyncio.timeout(self.timeout):
            await closing
        assert finished == [1]
        with pytest.raises(BackendError):
            await bus.publish(event("Tick"))
        # The handler returned before the bus closed: its event was acknowledged.
        again: list[Event] = []
        other = await self.bus()
        await other.subscribe("Stop", recorder(again), group="g", ack_timeout=self.ack_timeout)
        await asyncio.sleep(self.ack_timeout + self.settle)
        assert again == [], "the closing handler's event was delivered again"

    async def test_cancelling_a_subscription_again_leaves_a_newer_one_alone(self) -> None:
        async with self.opened() as bus:
            got: list[Event] = []
            handler = recorder(got)
            old = await bus.subscribe("Tick", handler)
            await old.cancel()
            await bus.subscribe("Tick", handler)
            await old.cancel()  # cancels ``old``, already cancelled, not the new subscription
            await bus.publish(event("Tick"))
            await self.drain(bus)
            assert len(got) == 1

    async def test_one_handler_subscribed_twice_is_cancelled_once(self) -> None:
        async with self.opened() as bus:
            got: list[Event] = []
            handler = recorder(got)
            first = await bus.subscribe("Tick", handler)
            await bus.subscribe("Tick", handler)
            await first.cancel()
            await bus.publish(event("Tick"))
            await self.drain(bus)
            assert len(got) == 1

    # --- consumer groups ------------------------------------------------------------------

    async def test_every_group_receives_each_event_once(self) -> None:
        a, b = await self.bus(), await self.bus()
        inventory: list[Event] = []
        payment: list[Event] = []
        await a.subscribe("OrderPlaced", recorder(inventory), group="inventory")
        await b.subscribe("OrderPlaced", recorder(payment), group="payment")
        sent = [event("OrderPlaced", f"o-{i}", n=i) for i in range(10)]
        for e in sent:
            await a.publish(e)
        await self.eventually(
            lambda: len(inventory) >= 10 and len(payment) >= 10, "both groups to get 10 events"
        )
        await self.quiet()
        assert sorted(ids(inventory)) == sorted(ids(sent))
        assert sorted(ids(payment)) == sorted(ids(sent))

    async def test_consumers_of_one_group_compete(self) -> None:
        a, b = await self.bus(), await self.bus()
        got_a: list[Event] = []
        got_b: list[Event] = []

        def slow(into: list[Event]) -> Handler:
            async def handler(e: Event) -> None:
                into.append(e)
                await asyncio.sleep(0.02)  # long enough that the other consumer gets work

            return handler

        await a.subscribe("OrderPlaced", slow(got_a), group="inventory")
        await b.subscribe("OrderPlaced", slow(got_b), group="inventory")
        sent = [event("OrderPlaced", f"o-{i}") for i in range(30)]
        for e in sent:
            await a.publish(e)
        await self.eventually(lambda: len(got_a) + len(got_b) >= 30, "30 deliveries")
        await self.quiet()
        delivered = ids(got_a) + ids(got_b)
        assert sorted(delivered) == sorted(ids(sent)), "each event goes to exactly one consumer"
        assert got_a, f"one consumer took all: {len(got_a)} and {len(got_b)}"
        assert got_b, f"one consumer took all: {len(got_a)} and {len(got_b)}"

    async def test_two_subscriptions_of_one_group_on_one_bus_compete(self) -> None:
        bus = await self.bus()
        first: list[Event] = []
        second: list[Event] = []
        await bus.subscribe("Tick", recorder(first), group="workers")
        await bus.subscribe("Tick", recorder(second), group="workers")
        sent = [event("Tick", n=i) for i in range(20)]
        for e in sent:
            await bus.publish(e)
        await self.eventually(lambda: len(first) + len(second) >= 20, "20 deliveries")
        await self.quiet()
        assert sorted(ids(first) + ids(second)) == sorted(ids(sent))

    async def test_grouped_and_ungrouped_subscriptions_both_receive(self) -> None:
        bus = await self.bus()
        grouped: list[Event] = []
        plain: list[Event] = []
        await bus.subscribe("Tick", recorder(grouped), group="g")
        await bus.subscribe("Tick", recorder(plain))
        sent = [event("Tick", n=i) for i in range(5)]
        for e in sent:
            await bus.publish(e)
        await self.drain(bus)
        await self.eventually(lambda: len(grouped) >= 5 and len(plain) >= 5, "5 events each")
        assert ids(grouped) == ids(sent)
        assert ids(plain) == ids(sent)

    async def test_a_group_keeps_events_while_none_of_its_consumers_runs(self) -> None:
        a = await self.bus()
        subscription = await a.subscribe("Tick", recorder([]), group="inventory")
        await subscription.cancel()
        sent = [event("Tick", n=i) for i in range(3)]
        for e in sent:
            await a.publish(e)
        b = await self.bus()
        got: list[Event] = []
        await b.subscribe("Tick", recorder(got), group="inventory")
        await self.eventually(lambda: len(got) >= 3, "the events kept for the group")
        await self.quiet()
        assert ids(got) == ids(sent)

    async def test_one_saga_keeps_its_order_in_a_group_with_one_consumer(self) -> None:
        publisher, consumer = await self.bus(), await self.bus()
        got: list[Event] = []
        await consumer.subscribe("Step", recorder(got), group="inventory")
        sent = [event("Step", f"o-{i % 3}", n=i) for i in range(30)]
        for e in sent:
            await publisher.publish(e)
        await self.eventually(lambda: len(got) >= 30, "30 events")
        for saga_id in ("o-0", "o-1", "o-2"):
            assert [e["n"] for e in got if e.saga_id == saga_id] == [
                e["n"] for e in sent if e.saga_id == saga_id
            ]

    # --- acknowledgement, redelivery, dead letters ----------------------------------------

    async def test_a_raising_handler_stops_neither_others_nor_later_events(self) -> None:
        async with self.opened() as bus:
            before: list[Event] = []
            after: list[Event] = []

            async def broken(e: Event) -> None:
                raise ValueError(f"cannot handle {e['n']}")

            await bus.subscribe("Tick", recorder(before))
            await bus.subscribe("Tick", broken, max_deliveries=2, backoff=self.backoff)
            await bus.subscribe("Tick", recorder(after))
            for i in range(3):
                await bus.publish(event("Tick", n=i))
            await self.drain(bus)
            assert [e["n"] for e in before] == [0, 1, 2]
            assert [e["n"] for e in after] == [0, 1, 2]

    async def test_a_failed_delivery_comes_again_after_the_backoff(self) -> None:
        bus = await self.bus()
        tries: list[float] = []
        done: list[Event] = []

        async def flaky(e: Event) -> None:
            tries.append(time.monotonic())
            if len(tries) < 3:
                raise ConnectionError(f"try {len(tries)} failed")
            done.append(e)

        await bus.subscribe(
            "Tick",
            flaky,
            group="flaky",
            max_deliveries=5,
            backoff=self.backoff,
            ack_timeout=self.ack_timeout,
        )
        sent = event("Tick")
        await bus.publish(sent)
        await self.eventually(lambda: len(done) == 1, "the third try to succeed")
        assert ids(done) == [sent.event_id]
        gaps = [later - earlier for earlier, later in itertools.pairwise(tries)]
        assert all(gap >= self.backoff * 0.8 for gap in gaps), gaps
        # Acknowledged: not delivered again, even after an ack timeout, and no dead letter.
        await asyncio.sleep(self.ack_timeout + self.settle)
        assert len(tries) == 3
        assert list(await bus.dead_letters("flaky")) == []

    async def test_drain_waits_for_redeliveries(self) -> None:
        async with self.opened() as bus:
            done: list[int] = []
            failed: set[int] = set()

            async def once_broken(e: Event) -> None:
                if e["n"] not in failed:
                    failed.add(e["n"])
                    raise RuntimeError("first try fails")
                done.append(e["n"])

            await bus.subscribe("Tick", once_broken, group="g", backoff=self.backoff)
            for i in range(3):
                await bus.publish(event("Tick", n=i))
            await self.drain(bus)
            assert sorted(done) == [0, 1, 2]

    async def test_a_sync_handler_that_raises_is_retried_as_the_same_event(self) -> None:
        # Published unstamped: stamped once, before it is stored, so the id an inbox
        # deduplicates on (and the time) stay put across redeliveries.
        bus = await self.bus()
        tries: list[Event] = []

        def flaky(e: Event) -> None:
            tries.append(e)
            if len(tries) == 1:
                raise ValueError("first try fails")

        await bus.subscribe("Tick", flaky, group="sync", backoff=self.backoff)
        await bus.publish(Event("Tick", "o-1"))
        await self.eventually(lambda: len(tries) >= 2, "a redelivery")
        await self.quiet()
        assert len(tries) == 2
        assert tries[0].event_id != ""
        assert (tries[1].event_id, tries[1].timestamp) == (tries[0].event_id, tries[0].timestamp)

    async def test_a_handler_raising_cancelled_error_is_a_failed_delivery(self) -> None:
        # Nobody cancelled the bus or the caller: a handler's own CancelledError
        # must neither stop the consumer nor strand the events after it.
        bus = await self.bus()
        tries: list[int] = []
        done: list[int] = []

        async def odd(e: Event) -> None:
            tries.append(e["n"])
            if e["n"] == 0 and tries.count(0) == 1:
                raise asyncio.CancelledError("a handler's own cancellation")
            done.append(e["n"])

        await bus.subscribe("Tick", odd, group="g", backoff=self.backoff)
        for i in range(3):
            await bus.publish(event("Tick", n=i))
        await self.eventually(lambda: sorted(done) == [0, 1, 2], "all three handled")
        await self.drain(bus)
        assert tries.count(0) == 2

    async def test_a_handler_raising_a_base_exception_is_a_failed_delivery(self) -> None:
        # pytest.fail() raises one (BaseException, not Exception): it used to end the
        # consumer's task, with the event unsettled, later events undelivered and
        # drain() waiting for ever (the in-process bus lost the event).
        bus = await self.bus()
        tries: list[int] = []
        done: list[int] = []

        class Abort(BaseException):
            pass

        def sync(e: Event) -> None:
            tries.append(e["n"])
            if e["n"] == 0:
                raise Abort("sync")
            done.append(e["n"])

        async def suspending(e: Event) -> None:
            await asyncio.sleep(0)
            tries.append(e["n"])
            if e["n"] == 1:
                raise Abort("async")
            done.append(e["n"])

        for handler, kind in ((sync, "Tick"), (suspending, "Tock")):
            await bus.subscribe(kind, handler, group="g", max_deliveries=2, backoff=self.backoff)
        for i, kind in enumerate(["Tick", "Tock", "Tick", "Tock"]):
            await bus.publish(event(kind, f"o-{i}", n=i))
        await self.dead_letters_of(bus, "g", 2)
        await self.eventually(lambda: sorted(done) == [2, 3], "the later events handled")
        await self.drain(bus)
        letters = await bus.dead_letters("g")
        assert sorted(d.error for d in letters) == ["Abort: async", "Abort: sync"]
        assert sorted(tries) == [0, 0, 1, 1, 2, 3]

    async def test_max_deliveries_then_a_dead_letter_with_the_last_error(self) -> None:
        bus = await self.bus()
        tries: list[Event] = []
        fine: list[Event] = []

        async def poisoned(e: Event) -> None:
            tries.append(e)
            raise ValueError(f"attempt {len(tries)}")

        await bus.subscribe(
            "OrderPlaced",
            poisoned,
            group="payment",
            max_deliveries=3,
            backoff=self.backoff,
            ack_timeout=self.ack_timeout,
        )
        await bus.subscribe("OrderPlaced", recorder(fine), group="inventory")
        sent = event("OrderPlaced", "o-13", sku="abc")
        started = time.time()
        await bus.publish(sent)

        await self.dead_letters_of(bus, "payment", 1)
        (letter,) = await bus.dead_letters("payment")
        assert letter.group == "payment"
        assert letter.deliveries == 3
        assert letter.error == "ValueError: attempt 3"
        assert letter.event.event_id == sent.event_id
        assert letter.event.body() == sent.body()
        assert started - 1 <= letter.failed_at <= time.time() + 1
        assert isinstance(letter.id, str)
        assert letter.id
        await self.quiet()
        assert len(tries) == 3, "no delivery after the dead letter"
        assert ids(fine) == [sent.event_id]
        assert list(await bus.dead_letters("inventory")) == []

    async def test_a_handler_that_hangs_counts_from_the_first_delivery(self) -> None:
        # A delivery whose handler did not finish within ack_timeout counts towards
        # max_deliveries, as a failed one does, whichever consumer of the group gets
        # the event next. NATS and Redis counted it only from the event's second
        # delivery: max_deliveries + 1 handlers started before the dead letter.
        release = asyncio.Event()
        starts: list[str] = []
        buses = [await self.bus() for _ in range(3)]

        async def hang(e: Event) -> None:
            starts.append(e.event_id)
            await release.wait()

        try:
            for bus in buses:
                await bus.subscribe(
                    "Job",
                    hang,
                    group="g",
                    max_deliveries=2,
                    ack_timeout=self.ack_timeout,
                    backoff=self.backoff,
                )
            await buses[0].publish(event("Job"))
            await self.dead_letters_of(buses[0], "g", 1)
            (letter,) = await buses[0].dead_letters("g")
            assert (len(starts), letter.deliveries) == (2, 2), (starts, letter)
        finally:
            release.set()

    def _late(self) -> str:
        return f"TimeoutError: still running after the ack timeout ({self.ack_timeout:g}s)"

    async def test_a_hung_handler_alone_in_its_group_is_cancelled_then_dead_lettered(
        self,
    ) -> None:
        # The common case, one service process: no other consumer takes the event over.
        # NATS and Redis never cancelled the handler: the event never reached the dead
        # letters, and nothing after it was delivered.
        bus = await self.bus()
        starts: list[str] = []
        cancelled: list[str] = []

        async def hang(e: Event) -> None:
            starts.append(e.event_id)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(e.event_id)
                raise

        await bus.subscribe(
            "Job",
            hang,
            group="g",
            max_deliveries=2,
            ack_timeout=self.ack_timeout,
            backoff=self.backoff,
        )
        sent = event("Job")
        await bus.publish(sent)
        await self.dead_letters_of(bus, "g", 1)
        (letter,) = await bus.dead_letters("g")
        assert (letter.event.event_id, letter.deliveries) == (sent.event_id, 2)
        assert letter.error == self._late()
        await self.quiet()
        assert starts == cancelled == [sent.event_id] * 2

    async def test_a_handler_that_hangs_once_is_handled_on_its_redelivery(self) -> None:
        bus = await self.bus()
        starts: list[str] = []
        done: list[str] = []

        async def once(e: Event) -> None:
            starts.append(e.event_id)
            if len(starts) == 1:
                await asyncio.Event().wait()
            done.append(e.event_id)

        await bus.subscribe(
            "Job",
            once,
            group="g",
            max_deliveries=2,
            ack_timeout=self.ack_timeout,
            backoff=self.backoff,
        )
        sent = event("Job")
        await bus.publish(sent)
        await self.eventually(lambda: done == [sent.event_id], "the redelivery to be handled")
        await self.drain(bus)
        # Acknowledged: not delivered again, even after another ack timeout.
        await asyncio.sleep(self.ack_timeout + self.settle)
        assert starts == [sent.event_id] * 2
        assert list(await bus.dead_letters("g")) == []

    async def test_close_with_a_hung_handler_returns_after_its_ack_timeout(self) -> None:
        # close() lets the handlers in flight finish: on NATS and Redis it waited for
        # ever on one that never returns, so a service could not be shut down.
        # max_deliveries=1: the in-process bus's close also handles what it accepted
        # (redeliveries included), which is each delivery's ack timeout again.
        bus = await self.make_bus()
        started = asyncio.Event()

        async def hang(e: Event) -> None:
            started.set()
            await asyncio.Event().wait()

        await bus.subscribe(
            "Job",
            hang,
            group="g",
            max_deliveries=1,
            ack_timeout=self.ack_timeout,
            backoff=self.backoff,
        )
        await bus.publish(event("Job"))
        async with asyncio.timeout(self.timeout):
            await started.wait()
        began = time.monotonic()
        async with asyncio.timeout(self.timeout):
            await bus.close()
        took = time.monotonic() - began
        assert took < self.ack_timeout + 1.5, f"close() took {took:.1f}s"
        for _ in range(3):  # turns for what ends by itself (see test_a_handler_may_close_its_bus)
            await asyncio.sleep(0)
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not left, f"still running after close(): {left}"

    async def test_a_handler_that_ignores_its_cancellation_is_left_running(self) -> None:
        # A handler may catch the cancellation and go on: the bus waits a moment more,
        # then goes on without it (its delivery failed), rather than hang its consumer.
        bus = await self.make_bus()
        release = asyncio.Event()
        got: list[int] = []

        async def stubborn(e: Event) -> None:
            got.append(e["n"])
            if e["n"] == 0:
                while not release.is_set():
                    with suppress(asyncio.CancelledError):
                        await release.wait()

        await bus.subscribe(
            "Job",
            stubborn,
            group="g",
            max_deliveries=1,
            ack_timeout=self.ack_timeout,
            backoff=self.backoff,
        )
        try:
            for n in (0, 1):
                await bus.publish(event("Job", n=n))
            await self.eventually(lambda: got == [0, 1], "the event after the stubborn one")
            began = time.monotonic()
            async with asyncio.timeout(self.timeout):
                await bus.close()
            assert time.monotonic() - began < 1.0, "close() waited for the stubborn handler"
        finally:
            release.set()
            await asyncio.sleep(0.01)  # it ends now

    async def test_dead_letters_are_listed_oldest_first_up_to_the_limit(self) -> None:
        bus = await self.bus()

        async def poisoned(e: Event) -> None:
            raise KeyError(e["n"])

        await bus.subscribe("Tick", poisoned, group="g", max_deliveries=1, backoff=self.backoff)
        sent = [event("Tick", n=i) for i in range(3)]
        for e in sent:
            await bus.publish(e)

        await self.dead_letters_of(bus, "g", 3)
        letters = await bus.dead_letters("g")
        assert [d.event.event_id for d in letters] == ids(sent)
        assert all(d.deliveries == 1 and d.error.startswith("KeyError") for d in letters)
        assert [d.event.event_id for d in await bus.dead_letters("g", limit=2)] == ids(sent[:2])
        assert len({d.id for d in letters}) == 3

    async def test_replay_delivers_to_that_group_only_and_removes_the_dead_letter(self) -> None:
        bus, other = await self.bus(), await self.bus()
        healed = False
        handled: list[Event] = []
        inventory: list[Event] = []

        async def payment(e: Event) -> None:
            if not healed:
                raise RuntimeError("card processor down")
            handled.append(e)

        await bus.subscribe(
            "OrderPlaced", payment, group="payment", max_deliveries=2, backoff=self.backoff
        )
        await other.subscribe("OrderPlaced", recorder(inventory), group="inventory")
        sent = event("OrderPlaced", "o-21")
        await bus.publish(sent)

        await self.dead_letters_of(bus, "payment", 1)
        (letter,) = await bus.dead_letters("payment")
        healed = True
        await bus.replay_dead_letter("payment", letter.id)
        await self.eventually(lambda: len(handled) == 1, "the replayed event")
        assert handled[0].event_id == sent.event_id
        assert handled[0].body() == sent.body()
        await self.quiet()
        assert ids(inventory) == [sent.event_id], "the other group did not get it again"
        assert list(await bus.dead_letters("payment")) == []
        with pytest.raises(DefinitionError) as excinfo:
            await bus.replay_dead_letter("payment", letter.id)
        assert excinfo.value.field == "dead_letter_id"

    async def test_replay_of_an_unknown_dead_letter_is_refused(self) -> None:
        bus = await self.bus()
        with pytest.raises(DefinitionError) as excinfo:
            await bus.replay_dead_letter("payment", "no-such-letter")
        assert excinfo.value.field == "dead_letter_id"

    # --- consumers that die, buses that close ---------------------------------------------

    async def test_a_killed_consumer_loses_its_event_to_another_after_the_ack_timeout(
        self,
    ) -> None:
        dying = await self.bus()
        held: list[Event] = []
        release = asyncio.Event()

        async def hold(e: Event) -> None:
            held.append(e)
            await release.wait()

        await dying.subscribe("Tick", hold, group="g", ack_timeout=self.ack_timeout)
        sent = event("Tick", n=0)
        await dying.publish(sent)
        try:
            await self.eventually(lambda: len(held) == 1, "the first consumer to hold it")
            await self.crash(dying)
            survivor = await self.bus()
            got: list[Event] = []
            await survivor.subscribe("Tick", recorder(got), group="g", ack_timeout=self.ack_timeout)
            await self.eventually(lambda: len(got) >= 1, "the survivor to take the event over")
            assert got[0].event_id == sent.event_id
            later = event("Tick", n=1)
            await survivor.publish(later)
            await self.eventually(lambda: len(got) >= 2, "the next event")
            assert ids(got) == [sent.event_id, later.event_id]
        finally:
            release.set()

    async def test_close_lets_a_handler_in_flight_finish_and_acknowledges_it(self) -> None:
        first = await self.make_bus()
        started = asyncio.Event()
        finished: list[Event] = []

        async def slow(e: Event) -> None:
            started.set()
            await asyncio.sleep(0.3)
            finished.append(e)

        await first.subscribe("Tick", slow, group="g", ack_timeout=self.ack_timeout)
        sent = event("Tick")
        await first.publish(sent)
        async with asyncio.timeout(self.timeout):
            await started.wait()
            await first.close()
        assert ids(finished) == [sent.event_id], "close returned before its handler finished"
        second = await self.bus()
        again: list[Event] = []
        await second.subscribe("Tick", recorder(again), group="g", ack_timeout=self.ack_timeout)
        await asyncio.sleep(self.ack_timeout + self.settle)
        assert again == [], "the event finished before close was delivered again"

    # --- events given back unhandled are not failed deliveries -----------------------------

    async def _backlog(self, publisher: EventBus, count: int) -> list[Event]:
        """``count`` events of one saga waiting for group ``g`` (none of its consumers runs).

        One saga: each consumer runs one handler at a time on them and holds the
        rest, pulled ahead or in its prefetch window, without starting them.
        """
        subscription = await publisher.subscribe("Tick", recorder([]), group="g")
        await subscription.cancel()
        sent = [event("Tick", "o-1", n=i) for i in range(count)]
        for e in sent:
            await publisher.publish(e)
        return sent

    async def _starts(self, started: asyncio.Event) -> bool:
        """Whether a handler starts within an ack timeout and a few seconds (events held by
        a dead consumer come back after the ack timeout)."""
        try:
            async with asyncio.timeout(self.ack_timeout + 3.0):
                await started.wait()
        except TimeoutError:
            return False
        return True

    async def _after_the_rounds(
        self, bus: EventBus, sent: list[Event], handled: set[str], starts: dict[str, int]
    ) -> set[str]:
        """A healthy consumer takes the rest over: every event is handled or a dead letter,
        and a dead letter's handler was started ``max_deliveries`` times. The dead letters' ids."""

        async def healthy(e: Event) -> None:
            starts[e.event_id] = starts.get(e.event_id, 0) + 1
            handled.add(e.event_id)

        await bus.subscribe(
            "Tick",
            healthy,
            group="g",
            max_deliveries=2,
            ack_timeout=self.ack_timeout,
            backoff=self.backoff,
        )
        dead: set[str] = set()

        async def settled() -> bool:
            dead.clear()
            dead.update(d.event.event_id for d in await bus.dead_letters("g"))
            return all(e.event_id in handled or e.event_id in dead for e in sent)

        deadline = time.monotonic() + self.timeout + self.ack_timeout
        while not await settled():
            if time.monotonic() > deadline:
                missing = [e["n"] for e in sent if e.event_id not in handled | dead]
                raise AssertionError(f"events {missing} neither handled nor dead-lettered")
            await asyncio.sleep(0.02)
        for letter in await bus.dead_letters("g"):
            tries = starts.get(letter.event.event_id, 0)
            assert tries >= 2, (
                f"event {letter.event['n']} dead-lettered after {tries} handler starts"
                f" (max_deliveries=2): {letter.error} ({letter.deliveries} deliveries counted)"
            )
        return dead

    async def test_events_a_closing_consumer_gives_back_unstarted_are_not_failures(
        self,
    ) -> None:
        # A service restarted with a backlog, more often than max_deliveries: each
        # run handles one event and closes holding the others, never started.
        publisher = await self.bus()
        sent = await self._backlog(publisher, 8)
        handled: set[str] = set()
        starts: dict[str, int] = {}
        for _ in range(4):
            bus = await self.make_bus()
            started = asyncio.Event()
            release = asyncio.Event()

            async def hold(
                e: Event, started: asyncio.Event = started, release: asyncio.Event = release
            ) -> None:
                starts[e.event_id] = starts.get(e.event_id, 0) + 1
                started.set()
                await release.wait()
                handled.add(e.event_id)

            await bus.subscribe(
                "Tick",
                hold,
                group="g",
                max_deliveries=2,
                ack_timeout=self.timeout,
                backoff=self.backoff,
            )
            if not await self._starts(started):
                await bus.close()
                break  # nothing left to start: all handled, or (wrongly) dead letters
            await asyncio.sleep(0.05)  # the rest arrives and waits behind it
            closing = asyncio.create_task(bus.close())
            await asyncio.sleep(0.05)
            release.set()
            async with asyncio.timeout(self.timeout):
                await closing
        dead = await self._after_the_rounds(await self.bus(), sent, handled, starts)
        assert dead == set(), "no handler failed, so nothing is a dead letter"
        assert handled == {e.event_id for e in sent}

    async def test_events_a_dying_consumer_held_unstarted_are_not_failures(self) -> None:
        # A service crash-looping with a backlog: each run dies while its handler
        # runs one event, holding others it never started. Only the events whose
        # handler was running may count (a handler that kills its process).
        publisher = await self.bus()
        sent = await self._backlog(publisher, 8)
        handled: set[str] = set()
        starts: dict[str, int] = {}
        release = asyncio.Event()
        try:
            for _ in range(4):
                bus = await self.make_bus()
                started = asyncio.Event()

                async def hang(e: Event, started: asyncio.Event = started) -> None:
                    starts[e.event_id] = starts.get(e.event_id, 0) + 1
                    started.set()
                    await release.wait()

                await bus.subscribe(
                    "Tick",
                    hang,
                    group="g",
                    max_deliveries=2,
                    ack_timeout=self.ack_timeout,
                    backoff=self.backoff,
                )
                self._buses.append(bus)
                if not await self._starts(started):
                    break  # nothing left to start: all handled, or (wrongly) dead letters
                await asyncio.sleep(0.05)  # the rest arrives and waits behind it
                async with asyncio.timeout(self.timeout):
                    await self.crash(bus)
            never_started = {e.event_id for e in sent if e.event_id not in starts}
            assert never_started, "the test meant some events never to start in the rounds"
            dead = await self._after_the_rounds(await self.bus(), sent, handled, starts)
        finally:
            release.set()
        assert not dead & never_started

    # --- a broker restart ----------------------------------------------------------------

    async def test_published_events_survive_a_server_restart(self) -> None:
        publisher = await self.bus()
        subscription = await publisher.subscribe("Tick", recorder([]), group="durable")
        await subscription.cancel()
        sent = [event("Tick", n=i) for i in range(5)]
        for e in sent:
            await publisher.publish(e)
        await self.restart_server()
        consumer = await self.bus()
        got: list[Event] = []
        await consumer.subscribe("Tick", recorder(got), group="durable")
        await self.eventually(lambda: len(got) >= 5, "the events published before the restart")
        assert ids(got) == ids(sent)

        # The old bus publishes again once the server is back (it may refuse while not).
        after = event("Tick", n=5)

        async def publish_until_accepted() -> None:
            while True:
                try:
                    await publisher.publish(after)
                    return
                except BackendError:
                    await asyncio.sleep(0.1)

        async with asyncio.timeout(self.timeout):
            await publish_until_accepted()
        await self.eventually(lambda: after.event_id in ids(got), "the event after the restart")
