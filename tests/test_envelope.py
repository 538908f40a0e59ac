"""The event envelope: one versioned JSON text per event, the same on every broker."""

from __future__ import annotations

import json

import pytest

from sagakit.core.envelope import ENVELOPE_VERSION, decode_event, encode_event
from sagakit.core.event import NO_HEADERS, Event
from sagakit.errors import DefinitionError

SENT = Event(
    "PaymentCharged",
    "order-7",
    {"payment_id": "p1", "amount": 99.99, "items": [{"sku": "abc", "n": 2}], "note": "café ✓"},
    source="payment",
    event_id="9f2c",
    timestamp=1_700_000_000,
    headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
)


def envelope(**changes: object) -> bytes:
    fields = json.loads(encode_event(SENT))
    for key, value in changes.items():
        if value is ...:
            del fields[key]
        else:
            fields[key] = value
    return json.dumps(fields).encode()


def test_the_documented_layout() -> None:
    assert json.loads(encode_event(SENT)) == {
        "v": 1,
        "id": "9f2c",
        "type": "PaymentCharged",
        "saga_id": "order-7",
        "payload": dict(SENT.payload),
        "time": 1_700_000_000,
        "source": "payment",
        "headers": dict(SENT.headers),
    }
    assert list(json.loads(encode_event(SENT))) == [
        "v", "id", "type", "saga_id", "payload", "time", "source", "headers",
    ]  # fmt: skip
    assert ENVELOPE_VERSION == 1


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview, lambda b: b.decode()])
def test_round_trip(kind: object) -> None:
    got = decode_event(kind(encode_event(SENT)))  # type: ignore[operator]
    assert got == SENT
    assert got.body() == SENT.body()
    assert dict(got.headers) == dict(SENT.headers)


def test_no_headers_decode_to_the_shared_empty_mapping() -> None:
    plain = Event("Tick", "s1", event_id="e1", timestamp=1)
    assert plain.headers is NO_HEADERS
    assert decode_event(encode_event(plain)).headers is NO_HEADERS
    assert decode_event(envelope(headers=...)).headers is NO_HEADERS


def test_unknown_keys_of_version_one_are_ignored() -> None:
    assert decode_event(envelope(priority="high")) == SENT


def test_a_newer_version_is_refused() -> None:
    with pytest.raises(DefinitionError) as excinfo:
        decode_event(envelope(v=2))
    assert excinfo.value.field == "v"
    assert "newer" in str(excinfo.value)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"v": ...}, "v"),
        ({"v": "1"}, "v"),
        ({"v": True}, "v"),
        ({"v": 0}, "v"),
        ({"id": ...}, "id"),
        ({"id": ""}, "id"),
        ({"id": 7}, "id"),
        ({"type": ...}, "type"),
        ({"type": ""}, "type"),
        ({"saga_id": None}, "saga_id"),
        ({"payload": ...}, "payload"),
        ({"payload": [1]}, "payload"),
        ({"payload": {"type": "clash"}}, "payload"),
        ({"time": ...}, "time"),
        ({"time": 1.5}, "time"),
        ({"time": "now"}, "time"),
        ({"source": 3}, "source"),
        ({"headers": ["a"]}, "headers"),
        ({"headers": {"a": 1}}, "headers"),
    ],
)
def test_a_bad_field_is_named(changes: dict[str, object], field: str) -> None:
    with pytest.raises(DefinitionError) as excinfo:
        decode_event(envelope(**changes))
    assert excinfo.value.field == field


@pytest.mark.parametrize("data", [b"", b"{", b"\xff\xfe", b"[1, 2]", b"null", b'"text"'])
def test_what_is_not_an_envelope_is_refused(data: bytes) -> None:
    with pytest.raises(DefinitionError) as excinfo:
        decode_event(data)
    assert excinfo.value.field == "envelope"


@pytest.mark.parametrize(
    "value", [object(), {1, 2}, float("nan"), float("inf"), [float("-inf")], 2**70, {1: "a"}]
)
def test_a_payload_that_is_not_json_is_refused(value: object) -> None:
    with pytest.raises(DefinitionError) as excinfo:
        encode_event(Event("Tick", "s1", {"value": value, "n": None}))
    assert excinfo.value.field == "payload"
    assert "Tick" in str(excinfo.value)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"saga_id": "s\ud800"}, "saga_id"),
        ({"type": "Tick\udfff"}, "type"),
        ({"source": "\ud800"}, "source"),
        ({"event_id": "\ud800", "timestamp": 1}, "event_id"),
        ({"headers": {"traceparent": "\ud800"}}, "headers"),
        ({"payload": {"k\ud800": 1}}, "payload"),
    ],
)
def test_a_lone_surrogate_is_refused_naming_its_field(
    changes: dict[str, object], field: str
) -> None:
    # Not UTF-8, so not JSON: it used to be blamed on the payload whatever held it, in a
    # message that itself could not be written as UTF-8 (a strict stdout raised on it).
    fields: dict[str, object] = {"type": "Tick", "saga_id": "s1", **changes}
    with pytest.raises(DefinitionError) as excinfo:
        encode_event(Event(**fields))  # type: ignore[arg-type]
    assert excinfo.value.field == field
    str(excinfo.value).encode("utf-8")  # printable


@pytest.mark.parametrize("headers", [{"a": 1}, {1: "a"}, ["traceparent"], {"traceparent": None}])
def test_event_headers_are_strings_to_strings(headers: object) -> None:
    with pytest.raises(DefinitionError) as excinfo:
        Event("Tick", "s1", headers=headers)  # type: ignore[arg-type]
    assert excinfo.value.field == "headers"


def test_body_is_unchanged_by_headers() -> None:
    assert SENT.body() == {
        "type": "PaymentCharged",
        "saga_id": "order-7",
        **SENT.payload,
        "timestamp": 1_700_000_000,
    }


def test_an_event_cannot_be_of_type_star() -> None:
    # "*" subscribes to every type; an event of that type would reach its subscribers twice.
    with pytest.raises(DefinitionError) as excinfo:
        Event("*", "s1")
    assert excinfo.value.field == "type"
