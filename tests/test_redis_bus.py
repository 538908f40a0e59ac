"""The Redis Streams event bus on a real redis-server (tests/servers/redis.py)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from sagakit.adapters._bus_checks import check_server_version
from sagakit.adapters.redis_bus import RedisEventBus
from sagakit.core.event import Event
from sagakit.errors import (
    BackendBusy,
    BackendRefused,
    BackendUnavailable,
    ConfigurationError,
    DefinitionError,
)
from sagakit.ports.event_bus import ALL_EVENTS, EventBus
from tests.conformance.choreography import ChoreographyConformance
from tests.conformance.event_bus import EventBusConformance, event
from tests.servers.redis import RedisServer

TIMEOUT = 10.0


async def drain(bus: RedisEventBus) -> None:
    async with asyncio.timeout(TIMEOUT):
        await bus.drain()


class Buses:
    """Buses on one fresh prefix of the session's server, all closed at the end."""

    def __init__(self, url: str) -> None:
        self.prefix = f"t{uuid.uuid4().hex[:12]}"
        self.url = url
        self.open: list[RedisEventBus] = []

    def __call__(self, **options: object) -> RedisEventBus:
        bus = RedisEventBus(self.url, prefix=self.prefix, **options)  # type: ignore[arg-type]
        self.open.append(bus)
        return bus


@pytest.fixture
async def buses(redis_server: RedisServer) -> AsyncIterator[Buses]:
    made = Buses(redis_server.url)
    yield made
    for bus in made.open:
        async with asyncio.timeout(TIMEOUT):
            await bus.close()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def test_is_an_event_bus_and_delivers_id_and_body(buses: Buses) -> None:
    bus = buses()
    assert isinstance(bus, EventBus)
    got: list[Event] = []
    await bus.subscribe("OrderPlaced", got.append)  # a plain function is a handler too
    sent = Event("OrderPlaced", "o-9", {"items": ["a", "b"], "amount": 3, "ü": "é"}, "", "e-9", 12)
    await bus.publish(sent)
    await bus.publish(event("Other"))
    await drain(bus)
    assert [(e.event_id, e.body()) for e in got] == [(sent.event_id, sent.body())]


async def test_star_sees_every_type_in_publish_order(buses: Buses) -> None:
    bus = buses()
    everything: list[Event] = []
    await bus.subscribe(ALL_EVENTS, everything.append, group="audit")
    sent = [event(t, n=i) for i, t in enumerate(["A", "B", "A", "C", "B"] * 4)]
    for e in sent:
        await bus.publish(e)
    await drain(bus)
    assert [e.body() for e in everything] == [e.body() for e in sent]


async def test_groups_each_get_every_event_and_members_compete(buses: Buses) -> None:
    one, two = buses(), buses()
    a1: list[int] = []
    a2: list[int] = []
    b: list[int] = []
    await one.subscribe("Tick", lambda e: a1.append(e["n"]), group="a")
    await two.subscribe("Tick", lambda e: a2.append(e["n"]), group="a")
    await one.subscribe("Tick", lambda e: b.append(e["n"]), group="b")
    for i in range(200):
        await one.publish(event("Tick", saga_id=f"s{i}", n=i))
    await drain(one)
    await drain(two)
    assert sorted(a1 + a2) == list(range(200))  # each event once in group a
    assert b == list(range(200))  # one consumer: publish order


async def test_failing_handler_is_retried_then_dead_lettered_then_replayed_to_its_group(
    buses: Buses, raw: aioredis.Redis
) -> None:
    bus = buses()
    tries: list[int] = []
    other: list[Event] = []
    healthy = False

    async def flaky(e: Event) -> None:
        tries.append(e["n"])
        if not healthy:
            raise RuntimeError(f"down for {e['n']}")

    await bus.subscribe("Pay", flaky, group="payment", max_deliveries=3, backoff=0.01)
    await bus.subscribe("Pay", other.append, group="audit")
    await bus.publish(event("Pay", n=7))
    await drain(bus)
    assert tries == [7, 7, 7]
    [letter] = await bus.dead_letters("payment")
    assert letter.group == "payment"
    assert letter.deliveries == 3
    assert letter.error == "RuntimeError: down for 7"
    assert letter.event.body() == event("Pay", n=7).body()
    assert await bus.dead_letters("audit") == []
    assert len(other) == 1
    # Acknowledged in the stream once dead-lettered: nothing pending.
    assert (await raw.xpending(f"{buses.prefix}:events:Pay", "payment"))["pending"] == 0

    healthy = True
    await bus.replay_dead_letter("payment", letter.id)
    await drain(bus)
    assert tries == [7, 7, 7, 7]
    assert len(other) == 1  # the replay went to its group only
    assert await bus.dead_letters("payment") == []
    with pytest.raises(DefinitionError):
        await bus.replay_dead_letter("payment", letter.id)  # replayed once only
    with pytest.raises(DefinitionError):
        await bus.replay_dead_letter("payment", "not-an-id")


async def test_redelivery_succeeds_before_the_limit(buses: Buses) -> None:
    bus = buses()
    tries = 0

    def twice_down(e: Event) -> None:
        nonlocal tries
        tries += 1
        if tries < 3:
            raise ConnectionError("peer restarting")

    await bus.subscribe("Pay", twice_down, group="payment", backoff=0.01)
    await bus.publish(event("Pay"))
    await drain(bus)
    assert tries == 3
    assert await bus.dead_letters("payment") == []


async def test_a_handler_raising_cancelled_error_is_a_failed_delivery(buses: Buses) -> None:
    bus = buses()
    calls = 0

    async def handler(e: Event) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncio.CancelledError

    await bus.subscribe("X", handler, group="g", backoff=0.01)
    await bus.publish(event("X"))
    await drain(bus)  # does not raise CancelledError here
    assert calls == 2


async def test_a_dead_consumer_loses_its_events_to_its_group(buses: Buses) -> None:
    doomed, survivor = buses(), buses()
    held = asyncio.Event()
    got: list[int] = []
    taken = asyncio.Event()

    async def hang(e: Event) -> None:
        held.set()
        await asyncio.sleep(3600)

    await doomed.subscribe("Job", hang, group="workers", ack_timeout=0.3)
    await doomed.publish(event("Job", n=1))
    async with asyncio.timeout(TIMEOUT):
        await held.wait()
    await doomed._abort()  # dies holding the event: no ack

    def take(e: Event) -> None:
        got.append(e["n"])
        taken.set()

    await survivor.subscribe("Job", take, group="workers", ack_timeout=0.3)
    async with asyncio.timeout(TIMEOUT):
        await taken.wait()
    await drain(survivor)
    assert got == [1]


async def test_close_lets_handlers_in_flight_finish_and_acks_them(
    buses: Buses, raw: aioredis.Redis
) -> None:
    bus = buses()
    started = asyncio.Event()
    finished: list[int] = []

    async def slow(e: Event) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.append(e["n"])

    await bus.subscribe("Job", slow, group="workers")
    await bus.publish(event("Job", n=1))
    async with asyncio.timeout(TIMEOUT):
        await started.wait()
        await bus.close()
    assert finished == [1]
    assert (await raw.xpending(f"{buses.prefix}:events:Job", "workers"))["pending"] == 0
    # A consumer that holds nothing is removed with its process.
    assert await raw.xinfo_consumers(f"{buses.prefix}:events:Job", "workers") == []


async def test_undecodable_entries_go_to_the_dead_letters(
    buses: Buses, raw: aioredis.Redis
) -> None:
    bus = buses()
    got: list[Event] = []
    await bus.subscribe("X", got.append, group="g")
    await raw.xadd(f"{buses.prefix}:events:X", {"e": b"\xff not json"})
    await raw.xadd(f"{buses.prefix}:events:X", {"other": b"field"})
    await bus.publish(event("X"))
    await drain(bus)
    assert len(got) == 1
    letters = await bus.dead_letters("g")
    assert all("undecodable" in d.error for d in letters)
    # An entry without an envelope was acknowledged and only logged, as "lost entry
    # (trimmed at maxlen?)": now it is kept, fields and all, like any undecodable one.
    assert [d.event.type for d in letters] == ["sagakit.Undecodable"] * 2
    assert "no envelope" in letters[1].error
    assert letters[1].event["raw"] == "other field"


async def test_trim_keeps_only_what_a_group_still_needs(buses: Buses, raw: aioredis.Redis) -> None:
    bus = buses()
    await bus.subscribe("Tick", lambda e: None, group="g")
    for i in range(600):
        await bus.publish(event("Tick", saga_id=f"s{i}"))
    await drain(bus)
    stream = f"{buses.prefix}:events:Tick"
    assert await raw.xlen(stream) == 600
    await bus.trim()
    assert await raw.xlen(stream) < 200  # whole nodes only (XTRIM ~)


async def test_trim_while_events_flow_loses_nothing(buses: Buses) -> None:
    bus = buses()
    got: list[int] = []

    async def slow(e: Event) -> None:
        await asyncio.sleep(0.001)
        got.append(e["n"])

    await bus.subscribe("Tick", slow, group="g")
    await bus.subscribe("Tick", slow, group="h")

    flowing = True

    async def trim_often() -> None:
        while flowing:
            await bus.trim()
            await asyncio.sleep(0.005)

    trimmer = asyncio.get_running_loop().create_task(trim_often())
    try:
        for i in range(400):
            await bus.publish(event("Tick", saga_id=f"s{i % 7}", n=i))
        await drain(bus)
    finally:
        flowing = False  # not cancelled: redis-py may swallow a cancellation
    async with asyncio.timeout(TIMEOUT):
        await trimmer  # re-raises whatever made trim() fail
    assert sorted(got) == sorted([*range(400), *range(400)])


async def test_streams_are_capped_at_maxlen(buses: Buses, raw: aioredis.Redis) -> None:
    bus = buses(maxlen=100)
    for _ in range(1000):
        await bus.publish(event("Nobody"))
    assert await raw.xlen(f"{buses.prefix}:events:Nobody") < 300


async def test_subscription_cancel_stops_deliveries(buses: Buses) -> None:
    bus = buses()
    got: list[Event] = []
    subscription = await bus.subscribe("X", got.append)
    await bus.publish(event("X"))
    await drain(bus)
    await subscription.cancel()
    await subscription.cancel()
    await bus.publish(event("X"))
    await drain(bus)
    assert len(got) == 1


async def test_bad_arguments_are_refused(buses: Buses) -> None:
    bus = buses()
    with pytest.raises(DefinitionError):
        await bus.subscribe("", print)
    with pytest.raises(DefinitionError):
        await bus.subscribe("X", print, max_deliveries=0)
    with pytest.raises(DefinitionError):
        await bus.subscribe("X", print, ack_timeout=float("nan"))
    with pytest.raises(DefinitionError):
        await bus.subscribe("X", "not callable")  # type: ignore[arg-type]
    with pytest.raises(DefinitionError):
        await bus.dead_letters("g", limit=0)


def test_url_options() -> None:
    bus = RedisEventBus.from_url("redis://127.0.0.1:1/3?prefix=shop&maxlen=50&socket_timeout=5")
    assert (bus.prefix, bus.maxlen) == ("shop", 50)
    assert "prefix" not in bus.url
    assert "socket_timeout=5" in bus.url
    with pytest.raises(ConfigurationError):
        RedisEventBus.from_url("redis://127.0.0.1:1/0?prefix=a%20b")
    with pytest.raises(ConfigurationError):
        RedisEventBus.from_url("redis://127.0.0.1:1/0?maxlen=lots")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("maxlen", "5"),
        ("maxlen", 0),
        ("maxlen", 2.5),
        ("trim_interval", float("nan")),
        ("prefix", 7),
    ],
)
def test_bad_keyword_options_are_refused_by_name(option: str, value: object) -> None:
    """A ConfigurationError naming the option: maxlen="5" was a TypeError before, and
    every other mistake read the same "maxlen >= 1 and 0 < trim_interval required"."""
    with pytest.raises(ConfigurationError, match=option):
        RedisEventBus(**{option: value})  # type: ignore[arg-type]


async def test_events_accepted_before_a_restart_are_delivered_after_it(
    redis_server: RedisServer, buses: Buses
) -> None:
    bus = buses()
    got: list[int] = []
    await bus.subscribe("Tick", lambda e: got.append(e["n"]), group="g", ack_timeout=0.5)
    await bus.subscribe("Nobody", lambda e: None, group="g")
    publisher = buses()
    # The consumer stops reading: what is published now waits in the stream.
    await publisher.publish(event("Nobody"))
    await bus.close()
    for i in range(20):
        await publisher.publish(event("Tick", saga_id=f"s{i}", n=i))
    redis_server.restart(crash=True)  # SIGKILL: only the fsynced log survives
    again = buses()
    await again.subscribe("Tick", lambda e: got.append(e["n"]), group="g", ack_timeout=0.5)
    await drain(again)
    assert sorted(got) == list(range(20))


async def test_publish_during_an_outage_raises_backend_unavailable_then_recovers(
    redis_server: RedisServer, buses: Buses
) -> None:
    if not redis_server.restartable:
        pytest.skip("an external server is not ours to stop")
    bus = buses()
    got: list[int] = []
    await bus.subscribe("Tick", lambda e: got.append(e["n"]), group="g")
    await bus.publish(event("Tick", n=0))
    await drain(bus)
    redis_server.stop()
    try:
        with pytest.raises(BackendUnavailable):
            await bus.publish(event("Tick", n=1))
    finally:
        redis_server.start()
    await bus.publish(event("Tick", n=2))
    await drain(bus)
    assert got == [0, 2]


async def test_dead_letters_of_subscriptions_without_a_group_are_under_the_empty_group(
    buses: Buses,
) -> None:
    bus = buses()
    tries: list[str] = []
    healthy = False

    def handler(e: Event) -> None:
        tries.append(e.saga_id)
        if not healthy:
            raise ValueError("no")

    await bus.subscribe("X", handler, max_deliveries=2, backoff=0.01)
    await bus.publish(event("X", "s-1"))
    await drain(bus)
    [letter] = await bus.dead_letters("")
    assert (letter.group, letter.deliveries, letter.error) == ("", 2, "ValueError: no")
    healthy = True
    await bus.replay_dead_letter("", letter.id)
    await drain(bus)
    assert tries == ["s-1"] * 3
    assert await bus.dead_letters("") == []


async def test_concurrent_subscribes_of_a_new_group_leave_no_consumer_running(
    buses: Buses,
) -> None:
    bus = buses()
    got: list[str] = []
    await asyncio.gather(
        *(bus.subscribe(t, lambda e: got.append(e.type), group="g") for t in "ABCDE")
    )
    for t in "ABCDE":
        await bus.publish(event(t))
    await drain(bus)
    assert sorted(got) == list("ABCDE")
    await bus.close()
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("redis:")] == []


async def test_a_consumer_keeps_reading_across_a_server_crash(
    redis_server: RedisServer, buses: Buses
) -> None:
    if not redis_server.restartable:
        pytest.skip("an external server is not ours to restart")
    bus = buses()
    got: list[int] = []
    await bus.subscribe("Tick", lambda e: got.append(e["n"]), group="g")
    await bus.publish(event("Tick", n=1))
    await drain(bus)
    redis_server.restart(crash=True)
    # The first publish meets a connection the server closed: retried once, it succeeds.
    await bus.publish(event("Tick", n=2))
    await drain(bus)
    assert got == [1, 2]


async def test_a_deleted_stream_is_recreated_by_its_consumer(
    buses: Buses, raw: aioredis.Redis
) -> None:
    bus = buses()
    got: list[int] = []
    await bus.subscribe("Tick", lambda e: got.append(e["n"]), group="g")
    await raw.delete(f"{buses.prefix}:events:Tick")
    # The consumer meets NOGROUP on its next read and makes the group again.
    for _ in range(200):
        if await raw.exists(f"{buses.prefix}:events:Tick"):
            break
        await asyncio.sleep(0.05)
    await bus.publish(event("Tick", n=1))
    await drain(bus)
    assert got == [1]


async def test_a_consumer_outlives_a_failure_to_recreate_its_deleted_stream(
    buses: Buses, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The group was made again inside the handler of NOGROUP: an error there (the
    # server loading after a restart, out of memory, the connection lost) escaped
    # the consumer's loop and ended its task, and the subscription delivered no more.
    bus = buses()
    got: list[int] = []
    await bus.subscribe("Tick", lambda e: got.append(e["n"]), group="g")
    create = bus._create_group
    failures: list[str] = []

    async def failing_once(stream: str, group: str, start: str) -> None:
        if not failures:
            failures.append(stream)
            raise BackendUnavailable("redis://test", "LOADING Redis is loading the dataset")
        await create(stream, group, start)

    monkeypatch.setattr(bus, "_create_group", failing_once)
    await raw.delete(f"{buses.prefix}:events:Tick")
    for _ in range(200):
        if await raw.exists(f"{buses.prefix}:events:Tick"):
            break
        await asyncio.sleep(0.05)
    assert failures
    await bus.publish(event("Tick", n=1))
    await drain(bus)
    assert got == [1]


async def test_a_refusal_that_lasts_is_retried_with_a_growing_pause(
    buses: Buses, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # A stream replaced by a key of another kind (WRONGTYPE) was read again every 50 ms
    # for ever: twenty warnings a second in the log.
    bus = buses()
    await bus.subscribe("Tick", lambda e: None, group="g")
    stream = f"{buses.prefix}:events:Tick"
    caplog.set_level(logging.WARNING, logger="sagakit.bus.redis")
    await raw.set(f"{stream}~", "not a stream")
    await raw.rename(f"{stream}~", stream)  # replaced at once: never missing (NOGROUP)

    def refused() -> int:
        return sum("WRONGTYPE" in r.getMessage() for r in caplog.records)

    for _ in range(100):  # the read blocked when the stream was replaced ends first
        if refused():
            break
        await asyncio.sleep(0.05)
    first = refused()
    await asyncio.sleep(2.0)
    assert first >= 1
    assert refused() - first <= 8
    await raw.delete(stream)


async def test_publish_refuses_a_payload_that_is_not_json_before_sending(buses: Buses) -> None:
    bus = buses()
    with pytest.raises(DefinitionError):
        await bus.publish(Event("X", "s", {"when": object()}))
    with pytest.raises(DefinitionError):
        await bus.publish(Event("\ud800", "s"))
    await bus.publish(event("X"))  # the bus still works


async def test_an_event_that_kills_every_consumer_ends_in_the_dead_letters(buses: Buses) -> None:
    """A poisoned event whose handler never returns: a dead letter after max_deliveries
    deliveries that reached its handler, counted from its second (a first delivery is
    counted only when its handler fails, so a new event costs no write)."""
    calls = 0
    held = asyncio.Event()

    async def hang(e: Event) -> None:
        nonlocal calls
        calls += 1
        held.set()
        await asyncio.sleep(3600)

    first = buses()
    # ack_timeout leaves time to kill the bus before 60% of it, when a running new
    # entry's attempt is counted (a hang, not a death, would count).
    await first.subscribe("Job", hang, group="w", max_deliveries=2, ack_timeout=1.0)
    await first.publish(event("Job"))
    for _ in range(3):
        async with asyncio.timeout(TIMEOUT):
            await held.wait()
        held.clear()
        dying = buses.open[-1]
        await dying._abort()
        buses.open.remove(dying)
        successor = buses()
        await successor.subscribe("Job", hang, group="w", max_deliveries=2, ack_timeout=1.0)
    for _ in range(200):
        if await successor.dead_letters("w"):
            break
        await asyncio.sleep(0.05)
    [letter] = await successor.dead_letters("w")
    assert calls == 3
    assert letter.deliveries == 2
    assert "not acknowledged" in letter.error


async def test_attempts_are_counted_in_a_hash_and_dropped_once_settled(
    buses: Buses, raw: aioredis.Redis
) -> None:
    """A new entry costs no write; its failure is counted, a redelivery's start too (before
    its handler runs), and the count goes once the entry is acknowledged or dead-lettered."""
    bus = buses()
    ledger = f"{buses.prefix}:attempts:w"
    seen: dict[int, list[object]] = {1: [], 2: []}

    async def handler(e: Event) -> None:
        counts = await raw.hgetall(ledger)
        seen[e["n"]].append(sorted(int(v) for v in counts.values()))
        if e["n"] == 1 or len(seen[2]) == 1:
            raise ValueError("fails")

    await bus.subscribe("Job", handler, group="w", max_deliveries=2, backoff=0.01)
    await bus.publish(event("Job", n=1))
    await drain(bus)
    await bus.publish(event("Job", n=2))
    await drain(bus)
    assert seen[1] == [[], [2]], "nothing on the first delivery; 1 failure + this start"
    assert seen[2] == [[], [2]]
    assert len(await bus.dead_letters("w")) == 1
    assert await raw.exists(ledger) == 0


async def test_a_new_entry_running_long_is_counted_while_it_runs(
    buses: Buses, raw: aioredis.Redis
) -> None:
    """Past 60% of ack_timeout a new entry's attempt is counted (a handler that hangs then
    counts); one that still returns has it dropped, one that fails counts once."""
    bus = buses()
    ledger = f"{buses.prefix}:attempts:w"
    seen: list[list[int]] = []

    async def slow(e: Event) -> None:
        await asyncio.sleep(0.5)  # of an ack_timeout of 0.6 s
        seen.append(sorted(int(v) for v in (await raw.hgetall(ledger)).values()))
        if e["n"] == 1 and len(seen) == 2:
            raise ValueError("fails")

    await bus.subscribe("Job", slow, group="w", ack_timeout=0.6, backoff=0.01)
    await bus.publish(event("Job", n=0))
    await drain(bus)
    assert seen == [[1]]
    assert await raw.exists(ledger) == 0, "dropped with the ack"
    await bus.publish(event("Job", n=1))
    await drain(bus)
    assert seen[1:] == [[1], [2]], "its failure counted once, then its redelivery's start"
    assert await raw.exists(ledger) == 0


class TestChoreographyOnRedis(ChoreographyConformance):
    """The e-commerce scenarios, each service on a bus of its own (as processes would be)."""

    @pytest.fixture(autouse=True)
    def _namespace(self, redis_server: RedisServer) -> None:
        self._url, self._prefix = redis_server.url, f"c{uuid.uuid4().hex[:12]}"

    async def make_bus(self) -> EventBus:
        return RedisEventBus(self._url, prefix=self._prefix)


class TestRedisEventBusConformance(EventBusConformance):
    """The port's conformance suite on the session's redis-server, a key prefix per test."""

    @pytest.fixture(autouse=True)
    def _namespace(self, redis_server: RedisServer) -> None:
        self._server, self._prefix = redis_server, f"k{uuid.uuid4().hex[:12]}"

    async def make_bus(self) -> EventBus:
        return RedisEventBus(self._server.url, prefix=self._prefix)

    async def kill(self, bus: EventBus) -> None:
        assert isinstance(bus, RedisEventBus)
        await bus._abort()

    async def restart_server(self) -> None:
        if not self._server.restartable:
            pytest.skip("an external server (SAGAKIT_TEST_REDIS_URL) is not ours to restart")
        await asyncio.to_thread(self._server.restart)


# --- servers too old for the bus --------------------------------------------------------


@pytest.mark.parametrize("version", ["6.0.16", "5.0.14"])
def test_a_server_before_6_2_is_refused(version: str) -> None:
    # Its consumers' sweeps (XPENDING IDLE) and the janitor's trims (XTRIM MINID) would
    # fail for ever: a dead consumer's events stuck, the streams unbounded.
    with pytest.raises(BackendRefused, match=rf"Redis server is version {version}; ") as info:
        check_server_version("redis://h:6379", "Redis", version, (6, 2), "XPENDING IDLE")
    assert not info.value.retryable


async def test_the_servers_version_is_read_once_before_the_first_subscription(
    redis_server: RedisServer,
) -> None:
    bus = RedisEventBus.from_url(f"{redis_server.url}?prefix={uuid.uuid4().hex}")
    try:
        assert not bus._server_checked
        await bus.subscribe("OrderPlaced", lambda e: None, group="g")
        assert bus._server_checked  # the private server (6.2 or newer) was taken
    finally:
        await bus.close()


async def test_an_evicting_memory_policy_is_warned_about_once(
    redis_server: RedisServer, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    before = (await raw.config_get("maxmemory-policy"))["maxmemory-policy"]
    await raw.config_set("maxmemory-policy", "allkeys-lru")
    bus = RedisEventBus.from_url(f"{redis_server.url}?prefix={uuid.uuid4().hex}")
    try:
        with caplog.at_level("WARNING", logger="sagakit.bus.redis"):
            await bus.subscribe("OrderPlaced", lambda e: None, group="g")
            await bus.subscribe("OrderPaid", lambda e: None, group="g")
        warned = [r for r in caplog.records if "maxmemory-policy is allkeys-lru" in r.message]
        assert len(warned) == 1
        assert "lose events; use noeviction" in warned[0].message
    finally:
        await bus.close()
        await raw.config_set("maxmemory-policy", before)


async def test_a_server_out_of_memory_is_busy_not_refused(
    redis_server: RedisServer, raw: aioredis.Redis
) -> None:
    # Inside the publish script Redis words it without its "OOM" prefix; a retry may
    # succeed once consumers acknowledge and the streams are trimmed.
    bus = RedisEventBus.from_url(f"{redis_server.url}?prefix={uuid.uuid4().hex}")
    before = (await raw.config_get("maxmemory"))["maxmemory"]
    await raw.config_set("maxmemory", 1)
    try:
        with pytest.raises(BackendBusy, match="maxmemory") as info:
            await bus.publish(event("OrderPlaced", "s1", blob="x" * 1000))
        assert info.value.retryable
    finally:
        await raw.config_set("maxmemory", before)
        await bus.close()
    bus = RedisEventBus.from_url(f"{redis_server.url}?prefix={uuid.uuid4().hex}")
    try:
        await bus.publish(event("OrderPlaced", "s1"))  # memory back: it goes through
    finally:
        await bus.close()
