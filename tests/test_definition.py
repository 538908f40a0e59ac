"""Validation of saga definitions, steps and events: every error names its field."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sagakit.core.event import Event
from sagakit.core.saga import SagaDefinition, Step, StepContext
from sagakit.errors import DefinitionError, SagakitError
from sagakit.orchestration import Orchestrator


def act(ctx: StepContext) -> None:
    return None


async def undo(ctx: StepContext) -> None:
    return None


def field_of(excinfo: pytest.ExceptionInfo[DefinitionError]) -> str:
    return excinfo.value.field


# --- steps --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "   ", "\t\n", 5, None, b"abc"])
def test_step_name_must_be_a_non_empty_string(name: Any) -> None:
    with pytest.raises(DefinitionError) as excinfo:
        Step(name, act)
    assert field_of(excinfo) == "name"
    assert str(excinfo.value).startswith("name: ")


@pytest.mark.parametrize("action", [None, "act", 42, {"a": 1}])
def test_step_action_must_be_callable(action: Any) -> None:
    with pytest.raises(DefinitionError) as excinfo:
        Step("reserve", action)
    assert field_of(excinfo) == "action"
    assert "'reserve'" in excinfo.value.problem


def test_step_compensation_must_be_callable_or_none() -> None:
    with pytest.raises(DefinitionError) as excinfo:
        Step("reserve", act, "undo")  # type: ignore[arg-type]
    assert field_of(excinfo) == "compensation"
    assert Step("reserve", act, None).compensation is None
    assert Step("reserve", act, undo).compensation is undo


def test_step_is_frozen() -> None:
    step = Step("reserve", act)
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.name = "other"  # type: ignore[misc]


def test_definition_error_is_a_value_error_and_a_sagakit_error() -> None:
    error = DefinitionError("steps[0]", "bad")
    assert isinstance(error, ValueError)
    assert isinstance(error, SagakitError)
    assert (error.field, error.problem, str(error)) == ("steps[0]", "bad", "steps[0]: bad")


# --- saga definitions ---------------------------------------------------------------


def test_definition_derives_names_compensability_and_fingerprint() -> None:
    saga = SagaDefinition("order", [Step("reserve", act, undo), Step("notify", act)])
    assert saga.name == "order"
    assert saga.step_names == ("reserve", "notify")
    assert saga.compensable == (True, False)
    assert saga.fingerprint == '["order",["reserve","notify"]]'
    assert isinstance(saga.steps, tuple)


def test_definition_accepts_any_iterable_of_steps() -> None:
    saga = SagaDefinition("order", (Step(n, act) for n in "abc"))
    assert saga.step_names == ("a", "b", "c")


def test_definitions_with_the_same_steps_are_equal() -> None:
    steps = [Step("a", act), Step("b", act, undo)]
    assert SagaDefinition("s", steps) == SagaDefinition("s", list(steps))
    assert SagaDefinition("s", steps) != SagaDefinition("t", steps)


@pytest.mark.parametrize("name", ["", "  ", 3, None])
def test_definition_name_must_be_a_non_empty_string(name: Any) -> None:
    with pytest.raises(DefinitionError) as excinfo:
        SagaDefinition(name, [Step("a", act)])
    assert field_of(excinfo) == "name"


@pytest.mark.parametrize("steps", [[], (), iter([])])
def test_a_definition_may_have_no_steps(steps: Any) -> None:
    """A saga of no steps completes as soon as it starts (the node's execute allows it)."""
    saga = SagaDefinition("order", steps)
    assert saga.step_names == ()
    assert saga.fingerprint == '["order",[]]'


def test_fingerprints_are_unambiguous() -> None:
    """Steps ["a, b"] and ["a", "b"] once had one fingerprint, and joined each other's runs."""
    one = SagaDefinition("s", [Step("a, b", act)])
    two = SagaDefinition("s", [Step("a", act), Step("b", act)])
    assert one.fingerprint != two.fingerprint
    assert (
        SagaDefinition("s(a", [Step("b)", act)]).fingerprint
        != SagaDefinition("s", [Step("a", act), Step("b", act)]).fingerprint
    )


@pytest.mark.parametrize("steps", ["ab", b"ab", {"a": Step("a", act)}])
def test_definition_steps_must_not_be_a_string_or_mapping(steps: Any) -> None:
    with pytest.raises(DefinitionError) as excinfo:
        SagaDefinition("order", steps)
    assert field_of(excinfo) == "steps"


@pytest.mark.parametrize("steps", [5, None, Step("a", act)])
def test_definition_steps_that_are_not_iterable_name_the_field(steps: Any) -> None:
    """Not a bare TypeError from ``tuple(steps)``."""
    with pytest.raises(DefinitionError) as excinfo:
        SagaDefinition("order", steps)
    assert field_of(excinfo) == "steps"


def test_definition_names_the_index_of_a_non_step() -> None:
    with pytest.raises(DefinitionError) as excinfo:
        SagaDefinition("order", [Step("a", act), act])  # type: ignore[list-item]
    assert field_of(excinfo) == "steps[1]"
    assert "function" in excinfo.value.problem


@pytest.mark.parametrize(("names", "field"), [("aa", "steps[1].name"), ("abcb", "steps[3].name")])
def test_duplicate_step_names_name_the_later_step(names: str, field: str) -> None:
    with pytest.raises(DefinitionError) as excinfo:
        SagaDefinition("order", [Step(n, act) for n in names])
    assert field_of(excinfo) == field
    assert "duplicate" in excinfo.value.problem


def test_definition_is_frozen() -> None:
    saga = SagaDefinition("order", [Step("a", act)])
    with pytest.raises(dataclasses.FrozenInstanceError):
        saga.name = "other"  # type: ignore[misc]


def test_step_context_result_is_its_own_steps_result() -> None:
    ctx = StepContext("id-1", "b", {"x": 1}, {"a": 1, "b": 2})
    assert ctx.result == 2
    assert ctx.attempt == 1
    assert ctx.compensating is False
    assert StepContext("id-1", "c", {}, {"a": 1}).result is None


# --- events -------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"type": "", "saga_id": "s1"}, "type"),
    ({"type": None, "saga_id": "s1"}, "type"),
    ({"type": 7, "saga_id": "s1"}, "type"),
    ({"type": "OrderPlaced", "saga_id": ""}, "saga_id"),
    ({"type": "OrderPlaced", "saga_id": 12}, "saga_id"),
])  # fmt: skip
def test_event_type_and_saga_id_must_be_non_empty_strings(
    kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(DefinitionError) as excinfo:
        Event(**kwargs)
    assert field_of(excinfo) == field


@pytest.mark.parametrize("key", ["type", "saga_id", "timestamp"])
def test_event_payload_cannot_use_reserved_keys(key: str) -> None:
    with pytest.raises(DefinitionError) as excinfo:
        Event("OrderPlaced", "s1", {"amount": 3, key: "x"})
    assert field_of(excinfo) == "payload"
    assert repr(key) in excinfo.value.problem


@pytest.mark.parametrize("payload", [None, [("type", "x")], "abc"])
def test_event_payload_that_is_not_a_mapping_names_the_field(payload: Any) -> None:
    """Not a bare TypeError (``None``), nor accepted only to break later in ``body()``."""
    with pytest.raises(DefinitionError) as excinfo:
        Event("OrderPlaced", "s1", payload)
    assert field_of(excinfo) == "payload"


def test_event_defaults_are_unstamped() -> None:
    """The core draws no id and reads no clock: publishing stamps (tests/test_stamping.py)."""
    event = Event("OrderPlaced", "s1")
    assert event.payload == {}
    assert event.source == ""
    assert event.event_id == ""
    assert event.timestamp == 0


def test_event_payload_access() -> None:
    event = Event("OrderPlaced", "s1", {"amount": 3})
    assert event["amount"] == 3
    assert event.get("amount") == 3
    assert event.get("missing", "dflt") == "dflt"
    with pytest.raises(KeyError):
        event["missing"]


def test_event_body_key_order_is_type_saga_id_payload_timestamp() -> None:
    event = Event("OrderPlaced", "s1", {"zeta": 1, "alpha": 2}, timestamp=1700000000)
    body = event.body()
    assert list(body) == ["type", "saga_id", "zeta", "alpha", "timestamp"]
    assert body == {
        "type": "OrderPlaced",
        "saga_id": "s1",
        "zeta": 1,
        "alpha": 2,
        "timestamp": 1700000000,
    }


def test_event_from_body_round_trip() -> None:
    event = Event("OrderPlaced", "s1", {"amount": 3, "items": ["a"]}, source="shop", timestamp=5)
    again = Event.from_body(event.body(), source="shop", event_id=event.event_id)
    assert again == event
    assert list(again.body()) == list(event.body())


def test_event_from_body_without_an_id_or_a_timestamp_is_unstamped() -> None:
    body = {"type": "OrderPlaced", "saga_id": "s1", "timestamp": 5}
    assert Event.from_body(body).event_id == ""
    assert Event.from_body(body).timestamp == 5
    event = Event.from_body({"type": "OrderPlaced", "saga_id": "s1", "n": 1})
    assert event.timestamp == 0
    assert event.payload == {"n": 1}


@pytest.mark.parametrize("timestamp", ["1700000000", 1.5, True, None, [1]])
def test_event_from_body_bad_timestamp_names_the_field(timestamp: Any) -> None:
    with pytest.raises(DefinitionError) as excinfo:
        Event.from_body({"type": "OrderPlaced", "saga_id": "s1", "timestamp": timestamp})
    assert field_of(excinfo) == "timestamp"


@pytest.mark.parametrize(("body", "field"), [
    ({"saga_id": "s1", "timestamp": 1}, "type"),
    ({"type": "OrderPlaced", "timestamp": 1}, "saga_id"),
    ({"type": 3, "saga_id": "s1", "timestamp": 1}, "type"),
])  # fmt: skip
def test_event_from_body_names_a_missing_or_ill_typed_field(
    body: dict[str, Any], field: str
) -> None:
    with pytest.raises(DefinitionError) as excinfo:
        Event.from_body(body)
    assert field_of(excinfo) == field


payload_keys = st.text(min_size=1, max_size=8).filter(
    lambda k: k not in {"type", "saga_id", "timestamp"}
)
json_values = st.none() | st.booleans() | st.integers() | st.text(max_size=8)


@given(
    st.text(min_size=1, max_size=20).filter(lambda t: t != "*"),  # "*" means every type
    st.text(min_size=1, max_size=20),
    st.dictionaries(payload_keys, json_values, max_size=6),
    st.integers(0, 2**40),
)
def test_event_body_round_trip_property(
    type_: str, saga_id: str, payload: dict[str, Any], timestamp: int
) -> None:
    event = Event(type_, saga_id, payload, timestamp=timestamp)
    body = event.body()
    assert list(body) == ["type", "saga_id", *payload, "timestamp"]
    again = Event.from_body(body, event_id=event.event_id)
    assert again == event


@pytest.mark.parametrize("timestamp", ["1700000000", 1.5, None, True])
def test_event_timestamp_must_be_whole_seconds(timestamp: Any) -> None:
    with pytest.raises(DefinitionError) as excinfo:
        Event("OrderPlaced", "s1", {}, timestamp=timestamp)
    assert field_of(excinfo) == "timestamp"


@pytest.mark.parametrize("name", ["a\x00b", "x" * 1025, "\ud800"])
def test_a_saga_name_no_saga_log_can_keep_is_refused(name: str) -> None:
    """Saga logs keep the definition's name beside every saga id, as a key: the
    identifier rule of every backend applies (no NUL, valid Unicode, 1,024 bytes)."""
    with pytest.raises(DefinitionError) as excinfo:
        SagaDefinition(name, [Step("a", act)])
    assert excinfo.value.field == "name"


@pytest.mark.parametrize("name", ["\ud800", "caf\udce9"])
def test_a_step_name_that_is_not_valid_unicode_is_refused(name: str) -> None:
    """Every saga log records the step names: one with a lone surrogate ran on
    memory:// and failed on SQLite and PostgreSQL with "its input is not a JSON value"."""
    with pytest.raises(DefinitionError) as excinfo:
        Step(name, act)
    assert excinfo.value.field == "name"
    assert Step("café ☕ 日本", act).name == "café ☕ 日本"


@pytest.mark.parametrize("owner", ["a\x00b", "x" * 1025, "\ud800", ""])
def test_an_orchestrator_owner_no_saga_log_can_keep_is_refused(owner: str) -> None:
    with pytest.raises(DefinitionError) as excinfo:
        Orchestrator(owner=owner)
    assert excinfo.value.field == "owner"


@pytest.mark.parametrize("lease_ttl", [0, -1, float("nan"), float("inf"), "30", True])
def test_a_lease_ttl_no_saga_log_takes_is_refused(lease_ttl: object) -> None:
    with pytest.raises(DefinitionError) as excinfo:
        Orchestrator(lease_ttl=lease_ttl)  # type: ignore[arg-type]
    assert excinfo.value.field == "lease_ttl"


@pytest.mark.parametrize("lease_ttl", [1e-9, 0.001, 0.099])
def test_a_lease_too_short_to_be_renewed_is_refused(lease_ttl: float) -> None:
    """1e-9 was taken: a lease renewed every third of a nanosecond, lost at once."""
    with pytest.raises(DefinitionError, match=r"at least 0\.1") as excinfo:
        Orchestrator(lease_ttl=lease_ttl)
    assert excinfo.value.field == "lease_ttl"
    assert Orchestrator(lease_ttl=0.1).lease_ttl == 0.1
