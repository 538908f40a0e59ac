"""The RabbitMQ event bus: the conformance suite on a real RabbitMQ, and its faults.

The server is the one of tests/servers/amqp.py (SAGAKIT_TEST_AMQP_URL, else
this machine's); connection loss is injected from the server's side with
``rabbitmqctl close_connection``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import aio_pika
import pytest

from sagakit.adapters import open_event_bus
from sagakit.adapters.amqp_bus import AmqpEventBus
from sagakit.core.event import Event
from sagakit.errors import (
    BackendBusy,
    BackendError,
    BackendRefused,
    BackendUnavailable,
    ConfigurationError,
    DefinitionError,
    SchemaMismatch,
)
from sagakit.ports.event_bus import EventBus
from tests.conformance.choreography import ChoreographyConformance
from tests.conformance.event_bus import EventBusConformance, event, ids, recorder
from tests.servers.amqp import AmqpServer

TIMEOUT = 10.0


class TestAmqpEventBus(EventBusConformance):
    @pytest.fixture(autouse=True)
    async def _namespace(self, amqp_server: AmqpServer) -> AsyncIterator[None]:
        self.server = amqp_server
        self.prefix = amqp_server.new_prefix()
        self._mine: list[AmqpEventBus] = []
        yield
        # The suite closes its buses after this teardown may run: close them first
        # (closing twice does nothing), then delete what the test declared.
        for bus in self._mine:
            with contextlib.suppress(BackendError, TimeoutError):
                async with asyncio.timeout(TIMEOUT):
                    await bus.close()
        await amqp_server.delete_namespace(self.prefix)

    async def make_bus(self) -> EventBus:
        bus = await AmqpEventBus.connect(self.server.bus_url(self.prefix))
        self._mine.append(bus)
        return bus

    async def kill(self, bus: EventBus) -> None:
        assert isinstance(bus, AmqpEventBus)
        # The process is gone: its handlers stop unacknowledged and nothing reconnects;
        # then the broker, not the client, closes the connection.
        bus._abandon()
        closed = await self.server.close_connections(bus.connection_name)
        assert closed == 1, f"{closed} connections named {bus.connection_name!r}"

    async def restart_server(self) -> None:
        await self.server.restart()

    async def test_an_event_whose_consumers_die_in_its_handler_comes_back_uncounted(
        self,
    ) -> None:
        # Only failures are counted here (the sagakit-failures header of the event put
        # back): the broker's x-delivery-count cannot tell the event a handler was
        # running from those held unstarted, so a death counts for neither.
        release = asyncio.Event()
        starts: list[str] = []

        async def hang(e: Event) -> None:
            starts.append(e.event_id)
            await release.wait()

        sent = event("Job")
        try:
            for i in range(3):
                bus = await self.bus()
                await bus.subscribe("Job", hang, group="w", max_deliveries=2)
                if i == 0:
                    await bus.publish(sent)
                await self.eventually(lambda n=i: len(starts) > n, "the handler to start")
                await self.crash(bus)
        finally:
            release.set()
        got: list[Event] = []
        healthy = await self.bus()
        await healthy.subscribe("Job", recorder(got), group="w", max_deliveries=2)
        await self.eventually(lambda: len(got) == 1, "the event handled at last")
        assert ids(got) == [sent.event_id]
        assert await healthy.dead_letters("w") == []


class TestChoreographyOnAmqp(ChoreographyConformance):
    """The e-commerce scenarios, each service on a bus of its own (as processes would be)."""

    @pytest.fixture(autouse=True)
    async def _namespace(self, amqp_server: AmqpServer) -> AsyncIterator[None]:
        self.server = amqp_server
        self.prefix = amqp_server.new_prefix()
        self._mine: list[AmqpEventBus] = []
        yield
        for bus in self._mine:
            with contextlib.suppress(BackendError, TimeoutError):
                async with asyncio.timeout(TIMEOUT):
                    await bus.close()
        await amqp_server.delete_namespace(self.prefix)

    async def make_bus(self) -> EventBus:
        bus = await AmqpEventBus.connect(self.server.bus_url(self.prefix))
        self._mine.append(bus)
        return bus


# --- the bus's own behaviour on RabbitMQ --------------------------------------------------


class Buses:
    """Buses on one fresh prefix of the server, closed at the end."""

    def __init__(self, server: AmqpServer, prefix: str) -> None:
        self.server, self.prefix = server, prefix
        self.open: list[AmqpEventBus] = []

    async def __call__(self, **options: object) -> AmqpEventBus:
        bus = await AmqpEventBus.connect(self.server.bus_url(self.prefix, **options))
        self.open.append(bus)
        return bus


@pytest.fixture
async def buses(amqp_server: AmqpServer, amqp_namespace: str) -> AsyncIterator[Buses]:
    made = Buses(amqp_server, amqp_namespace)
    yield made
    for bus in made.open:
        with contextlib.suppress(BackendError):
            async with asyncio.timeout(TIMEOUT):
                await bus.close()


async def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {TIMEOUT}s waiting for {what}")
        await asyncio.sleep(0.01)


def test_the_url_names_server_prefix_and_options() -> None:
    bus = open_event_bus("amqp://u:secret@127.0.0.1:5673/shop?prefix=app&prefetch=8&timeout=2.5")
    assert isinstance(bus, AmqpEventBus)
    assert (bus.prefix, bus._prefetch, bus._timeout) == ("app", 8, 2.5)
    assert bus.exchange_name == "app.events"
    assert "secret" not in bus.where
    assert bus.dead_letter_queue("payment") == "app.payment.dlq"
    assert bus.dead_letter_queue("") == "app.dlq"
    assert isinstance(open_event_bus("amqps://h/"), AmqpEventBus)


@pytest.mark.parametrize(
    "url",
    [
        "amqp://h/?prefix=",
        "amqp://h/?prefix=a.b",
        "amqp://h/?prefix=a:b",
        "amqp://h/?prefetch=0",
        "amqp://h/?prefetch=many",
        "amqp://h/?timeout=-1",
        "amqp://h/?timeout=nan",
        "amqp://h:notaport/",
    ],
)
def test_bad_urls_are_refused_naming_the_option(url: str) -> None:
    with pytest.raises(ConfigurationError):
        open_event_bus(url)


async def test_no_server_is_backend_unavailable(amqp_namespace: str) -> None:
    from tests.servers import free_port

    bus = AmqpEventBus(f"amqp://guest:guest@127.0.0.1:{free_port()}/?timeout=1")
    with pytest.raises(BackendUnavailable):
        await bus.publish(event())
    await bus.close()


async def test_wrong_credentials_are_refused(amqp_server: AmqpServer) -> None:
    url = amqp_server.url.replace("guest:guest@", "guest:wrong@")
    if url == amqp_server.url:
        pytest.skip("the server's URL has no guest credentials to spoil")
    with pytest.raises(BackendRefused):
        await AmqpEventBus.connect(f"{url}?timeout=5")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"event_type": ""}, "event_type"),
        ({"event_type": "Order.*"}, "event_type"),
        ({"event_type": "Order#"}, "event_type"),
        ({"group": "a:b"}, "group"),
        ({"group": ""}, "group"),
        ({"group": "x" * 65}, "group"),
        ({"max_deliveries": 0}, "max_deliveries"),
        ({"ack_timeout": 0}, "ack_timeout"),
        ({"backoff": float("inf")}, "backoff"),
        ({"event_type": "T" * 300}, "event_type"),
    ],
)
async def test_bad_subscriptions_are_refused(
    buses: Buses, kwargs: dict[str, object], field: str
) -> None:
    bus = await buses()
    arguments: dict[str, object] = {"event_type": "Tick", **kwargs}
    event_type = arguments.pop("event_type")
    with pytest.raises(DefinitionError) as excinfo:
        await bus.subscribe(event_type, recorder([]), **arguments)  # type: ignore[arg-type]
    assert excinfo.value.field == field


async def test_an_event_type_too_long_for_a_routing_key_is_refused(buses: Buses) -> None:
    bus = await buses()
    with pytest.raises(DefinitionError) as refused:  # before anything is sent
        await bus.publish(event("T" * 256))
    assert refused.value.field == "type"
    await bus.publish(event("T" * 255))  # the longest that fits


async def test_a_saga_id_too_long_for_a_correlation_id_still_keeps_its_lane(
    buses: Buses,
) -> None:
    bus = await buses()
    got: list[Event] = []
    await bus.subscribe("Tick", recorder(got), group="g")
    saga_id = "s" * 10_000
    sent = [event("Tick", saga_id, n=i) for i in range(5)]
    for e in sent:
        await bus.publish(e)
    async with asyncio.timeout(TIMEOUT):
        await bus.drain()
    assert ids(got) == ids(sent)
    assert got[0].saga_id == saga_id


async def test_a_message_that_is_not_an_envelope_is_dead_lettered_not_fatal(
    buses: Buses,
) -> None:
    bus = await buses()
    got: list[Event] = []
    await bus.subscribe("Tick", recorder(got), group="g")
    # Another producer's message on our exchange, with our routing key.
    connection = await aio_pika.connect(bus._driver_url)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(bus.exchange_name)
        for body, kind in ((b"\xff not json", "Tick"), (b"[1, 2]", "*"), (b'{"v": 99}', None)):
            await exchange.publish(aio_pika.Message(body, type=kind), routing_key="Tick")
    finally:
        await connection.close()
    good = event("Tick")
    await bus.publish(good)
    async with asyncio.timeout(TIMEOUT):
        await bus.drain()
    assert ids(got) == [good.event_id]
    letters = await bus.dead_letters("g")
    assert len(letters) == 3
    assert all("undecodable" in d.error for d in letters)
    assert "newer than this sagakit" in letters[2].error
    assert letters[0].event.payload["raw"].endswith("not json")
    assert [d.event.type for d in letters] == ["Tick", "undecodable", "undecodable"]


async def test_a_queue_declared_with_other_settings_is_a_schema_mismatch(
    buses: Buses,
) -> None:
    bus = await buses()
    # A classic queue where sagakit would declare a quorum one.
    connection = await aio_pika.connect(bus._driver_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(f"{bus.prefix}.g:Tick", durable=True)
    finally:
        await connection.close()
    with pytest.raises(SchemaMismatch):
        await bus.subscribe("Tick", recorder([]), group="g")
    # The bus goes on working for other subscriptions.
    got: list[Event] = []
    await bus.subscribe("Tock", recorder(got), group="g")
    await bus.publish(event("Tock"))
    async with asyncio.timeout(TIMEOUT):
        await bus.drain()
    assert len(got) == 1


async def test_drain_inside_a_handler_is_refused(buses: Buses) -> None:
    bus = await buses()
    errors: list[BaseException] = []

    async def handler(e: Event) -> None:
        try:
            await bus.drain()
        except RuntimeError as exc:
            errors.append(exc)

    await bus.subscribe("Tick", handler, group="g")
    await bus.publish(event("Tick"))
    async with asyncio.timeout(TIMEOUT):
        await bus.drain()
    assert len(errors) == 1


async def test_a_handler_past_its_ack_timeout_is_cancelled_and_retried(buses: Buses) -> None:
    bus = await buses()
    tries: list[float] = []
    cancelled: list[bool] = []
    done: list[Event] = []

    async def stuck_once(e: Event) -> None:
        tries.append(asyncio.get_running_loop().time())
        if len(tries) == 1:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise
        done.append(e)

    await bus.subscribe("Tick", stuck_once, group="g", ack_timeout=0.3, backoff=0.05)
    await bus.publish(event("Tick"))
    await wait_for(lambda: len(done) == 1, "the second try")
    assert cancelled == [True]
    assert tries[1] - tries[0] >= 0.3


async def test_dead_letters_of_subscriptions_without_a_group_are_under_the_empty_group(
    buses: Buses,
) -> None:
    bus = await buses()

    def broken(e: Event) -> None:
        raise ValueError("no")

    await bus.subscribe("Tick", broken, max_deliveries=2, backoff=0.01)
    sent = event("Tick")
    await bus.publish(sent)
    async with asyncio.timeout(TIMEOUT):
        await bus.drain()
    (letter,) = await bus.dead_letters("")
    assert (letter.group, letter.deliveries, letter.error) == ("", 2, "ValueError: no")
    assert letter.event.event_id == sent.event_id


async def test_listing_dead_letters_leaves_them_in_place(buses: Buses) -> None:
    bus = await buses()

    async def poisoned(e: Event) -> None:
        raise KeyError(e["n"])

    poisoned_subscription = await bus.subscribe("Tick", poisoned, group="g", max_deliveries=1)
    sent = [event("Tick", n=i) for i in range(5)]
    for e in sent:
        await bus.publish(e)
    async with asyncio.timeout(TIMEOUT):
        await bus.drain()
    other = await buses()  # another process looks at the same dead letters
    for _ in range(3):
        assert [d.event.event_id for d in await other.dead_letters("g")] == ids(sent)
    assert await bus.dead_letters("g", limit=0) == []
    assert await bus.dead_letters("nobody") == []
    with pytest.raises(DefinitionError):
        await bus.dead_letters("g", limit=-1)
    with pytest.raises(DefinitionError):
        await bus.dead_letters("a:b")
    # Replaying one removes that one only, and an unknown id leaves the rest alone.
    letters = await bus.dead_letters("g")
    with pytest.raises(DefinitionError):
        await bus.replay_dead_letter("g", "nope")
    replayed: list[Event] = []
    await poisoned_subscription.cancel()
    await other.subscribe("Tick", recorder(replayed), group="g")
    await bus.replay_dead_letter("g", letters[2].id)
    await wait_for(lambda: len(replayed) == 1, "the replayed event")
    assert ids(replayed) == [sent[2].event_id]
    remaining = [d.event.event_id for d in await bus.dead_letters("g")]
    assert remaining == ids(sent[:2] + sent[3:])


async def test_replay_to_a_queue_deleted_since_is_refused_and_kept(
    buses: Buses, amqp_server: AmqpServer
) -> None:
    bus = await buses()

    def broken(e: Event) -> None:
        raise ValueError("no")

    subscription = await bus.subscribe("Tick", broken, group="g", max_deliveries=1)
    await bus.publish(event("Tick"))
    async with asyncio.timeout(TIMEOUT):
        await bus.drain()
    await subscription.cancel()
    connection = await aio_pika.connect(bus._driver_url)
    try:
        channel = await connection.channel()
        await channel.queue_delete(f"{bus.prefix}.g:Tick")
    finally:
        await connection.close()
    (letter,) = await bus.dead_letters("g")
    with pytest.raises(BackendRefused):
        await bus.replay_dead_letter("g", letter.id)
    assert [d.id for d in await bus.dead_letters("g")] == [letter.id]


# --- connection loss from the server's side ---------------------------------------------


async def test_a_publisher_whose_connection_the_server_closed_reconnects(
    buses: Buses, amqp_server: AmqpServer
) -> None:
    publisher = await buses()
    consumer = await buses()
    got: list[Event] = []
    await consumer.subscribe("Tick", recorder(got), group="g")
    sent = [event("Tick", n=i) for i in range(10)]
    for e in sent[:5]:
        await publisher.publish(e)
    assert await amqp_server.close_connections(publisher.connection_name) == 1
    accepted: list[Event] = []
    for e in sent[5:]:
        # Accepted (after the reconnection) or refused with BackendUnavailable: never lost.
        for _ in range(50):
            try:
                await publisher.publish(e)
            except BackendUnavailable:
                await asyncio.sleep(0.1)
            else:
                accepted.append(e)
                break
    assert ids(accepted) == ids(sent[5:])
    await wait_for(lambda: len(set(ids(got))) >= 10, "every accepted event")
    assert set(ids(got)) == set(ids(sent))


async def test_a_consumer_whose_connection_the_server_closed_resubscribes(
    buses: Buses, amqp_server: AmqpServer
) -> None:
    bus = await buses()
    publisher = await buses()
    got: list[Event] = []
    held = asyncio.Event()
    release = asyncio.Event()

    async def handler(e: Event) -> None:
        if e["n"] == 0 and not held.is_set():
            held.set()
            await release.wait()  # holds it while the connection goes
        got.append(e)

    await bus.subscribe("Tick", handler, group="g")
    await publisher.publish(event("Tick", n=0))
    await wait_for(held.is_set, "the event to be held")
    assert await amqp_server.close_connections(bus.connection_name) == 1
    release.set()
    # The broker gave event 0 back; the bus reconnects and gets it again.
    await publisher.publish(event("Tick", n=1))
    await wait_for(
        lambda: [e["n"] for e in got].count(0) >= 1 and 1 in [e["n"] for e in got],
        "both events after the reconnection",
    )
    async with asyncio.timeout(TIMEOUT):
        await bus.drain()
    # Event 0 ran twice (at least once), its first, unacknowledged run was not lost.
    assert sorted({e["n"] for e in got}) == [0, 1]


async def test_publish_waits_for_the_reconnection_then_gives_up(
    buses: Buses, amqp_server: AmqpServer
) -> None:
    bus = await buses(timeout=1)
    await bus.publish(event())
    bus._driver_url = bus._driver_url.replace(f":{amqp_server.port}/", ":1/")  # nowhere
    assert await amqp_server.close_connections(bus.connection_name) == 1
    with pytest.raises(BackendUnavailable):
        await bus.publish(event())


async def test_a_group_queue_deleted_under_a_subscription_is_declared_again(
    buses: Buses,
) -> None:
    bus = await buses()
    got: list[Event] = []
    await bus.subscribe("Tick", recorder(got), group="g")
    connection = await aio_pika.connect(bus._driver_url)
    try:
        channel = await connection.channel()
        await channel.queue_delete(f"{bus.prefix}.g:Tick")  # the broker cancels our consumer
    finally:
        await connection.close()
    sent = event("Tick")

    async def delivered() -> None:
        # Events published before the queue is back are not kept (no queue took them).
        while not got:
            await bus.publish(sent)
            await asyncio.sleep(0.1)

    async with asyncio.timeout(TIMEOUT):
        await delivered()
    assert got[0].event_id == sent.event_id


async def test_a_consumer_channel_the_broker_closed_consumes_again(buses: Buses) -> None:
    bus = await buses()
    got: list[Event] = []
    subscription = await bus.subscribe("Tick", recorder(got), group="g")
    consumer = subscription._consumer
    channel = consumer.channel
    assert channel is not None
    # An acknowledgement of a delivery that does not exist: the broker closes the channel.
    underlay = await channel.get_underlay_channel()
    await underlay.basic_ack(delivery_tag=999_999)
    await wait_for(lambda: consumer.channel is not channel, "a new channel")
    sent = [event("Tick", n=i) for i in range(3)]
    for e in sent:
        await bus.publish(e)
    async with asyncio.timeout(TIMEOUT):
        await bus.drain()
    assert ids(got) == ids(sent)


async def test_event_types_that_amqp_names_refuse_are_hashed_into_queue_names(
    buses: Buses,
) -> None:
    bus = await buses()
    got: list[Event] = []
    other: list[Event] = []
    await bus.subscribe("Commande passée ✓", recorder(got), group="g")
    await bus.subscribe("Commande passée ✗", recorder(other), group="g")
    sent = event("Commande passée ✓")
    await bus.publish(sent)
    await bus.publish(event("Commande passée ✗"))
    async with asyncio.timeout(TIMEOUT):
        await bus.drain()
    assert ids(got) == [sent.event_id]
    assert len(other) == 1


async def test_a_dead_letter_queue_deleted_since_is_declared_again(buses: Buses) -> None:
    bus = await buses()

    def broken(e: Event) -> None:
        raise ValueError("no")

    await bus.subscribe("Tick", broken, group="g", max_deliveries=1)
    connection = await aio_pika.connect(bus._driver_url)
    try:
        channel = await connection.channel()
        await channel.queue_delete(bus.dead_letter_queue("g"))
    finally:
        await connection.close()
    sent = event("Tick")
    await bus.publish(sent)
    async with asyncio.timeout(TIMEOUT):
        await bus.drain()
    assert [d.event.event_id for d in await bus.dead_letters("g")] == [sent.event_id]


async def test_subscriptions_and_dead_letters_survive_a_server_restart(
    buses: Buses, amqp_server: AmqpServer
) -> None:
    bus = await buses()
    got: list[Event] = []

    def picky(e: Event) -> None:
        if e.get("poison"):
            raise ValueError("poisoned")
        got.append(e)

    await bus.subscribe("Tick", picky, group="g", max_deliveries=1)
    poisoned = event("Tick", poison=True)
    await bus.publish(poisoned)
    async with asyncio.timeout(TIMEOUT):
        await bus.drain()
    await amqp_server.restart()
    sent = event("Tick")

    async def publish_until_accepted() -> None:
        while True:
            try:
                await bus.publish(sent)
                return
            except BackendError:
                await asyncio.sleep(0.1)

    async with asyncio.timeout(30):
        await publish_until_accepted()
    await wait_for(lambda: len(got) == 1, "the event after the restart")
    assert ids(got) == [sent.event_id]
    assert [d.event.event_id for d in await bus.dead_letters("g")] == [poisoned.event_id]


async def test_close_gives_back_the_events_it_had_not_started(buses: Buses) -> None:
    first, second = await buses(), await buses()
    started = asyncio.Event()
    finished: list[Event] = []

    async def slow(e: Event) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.append(e)

    await first.subscribe("Tick", slow, group="g")
    sent = [event("Tick", n=i) for i in range(5)]  # one saga: handled one at a time
    for e in sent:
        await first.publish(e)
    async with asyncio.timeout(TIMEOUT):
        await started.wait()
        await first.close()
    assert ids(finished) == ids(sent[:1])
    rest: list[Event] = []
    await second.subscribe("Tick", recorder(rest), group="g")
    async with asyncio.timeout(TIMEOUT):
        await second.drain()
    assert ids(rest) == ids(sent[1:])


async def test_a_handler_may_close_its_own_bus(buses: Buses) -> None:
    bus = await buses()
    closed: list[bool] = []

    async def closing(e: Event) -> None:
        await bus.close()
        closed.append(True)

    await bus.subscribe("Tick", closing, group="g")
    await bus.publish(event("Tick"))
    await wait_for(lambda: closed == [True], "the handler's close to return")
    with pytest.raises(BackendError):
        await bus.publish(event("Tick"))


async def test_a_publish_the_broker_nacks_raises_backend_busy(buses: Buses) -> None:
    bus = await buses()
    # A full queue that refuses new messages, bound to the type: the broker nacks.
    connection = await aio_pika.connect(bus._driver_url)
    try:
        channel = await connection.channel()
        full = await channel.declare_queue(
            f"{bus.prefix}.full",
            arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
        )
        await full.bind(bus.exchange_name, routing_key="Tick")
        with pytest.raises(BackendBusy) as excinfo:
            await bus.publish(event("Tick"))
        assert excinfo.value.retryable
        await full.unbind(bus.exchange_name, routing_key="Tick")
    finally:
        await connection.close()
    got: list[Event] = []
    await bus.subscribe("Tick", recorder(got), group="g")
    await bus.publish(event("Tick"))  # the bus's channel goes on
    async with asyncio.timeout(TIMEOUT):
        await bus.drain()
    assert len(got) == 1


async def test_a_publish_to_a_broker_blocking_publishers_fails_after_timeout(
    amqp_server: AmqpServer, buses: Buses
) -> None:
    # Under a memory or disk alarm RabbitMQ blocks its publishers for as long as the
    # alarm lasts: publish used to wait that long, however long it was.
    bus = await buses(timeout=1)
    got: list[Event] = []
    await bus.subscribe("Tick", recorder(got), group="g")
    sent = event("Tick")
    async with amqp_server.memory_alarm():
        began = time.monotonic()
        # (The outer bound fails the test, rather than hanging it, if publish waits on.)
        with pytest.raises(BackendBusy, match="no confirm within 1s") as info:
            async with asyncio.timeout(15):
                await bus.publish(sent)
        assert time.monotonic() - began < 10
        assert info.value.retryable
    # The alarm over, the same event published again arrives (once or, if the blocked
    # one went through as well, twice with one id: consumers know it by its id).
    async with asyncio.timeout(30):
        while True:
            try:
                await bus.publish(sent)
                break
            except BackendBusy:
                await asyncio.sleep(0.2)
    await wait_for(lambda: len(got) >= 1, "the event after the alarm")
    assert {e.event_id for e in got} == {sent.event_id}
