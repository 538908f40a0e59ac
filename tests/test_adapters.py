"""Backends are picked from a URL, imported lazily, and a missing extra names its pip command."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sagakit import (
    ConfigurationError,
    EventBus,
    InMemoryEventBus,
    InMemorySagaLog,
    SagaLog,
    open_event_bus,
    open_saga_log,
)
from sagakit.adapters import EVENT_BUSES, SAGA_LOGS, Backend


def test_memory_urls_open_the_in_memory_backends() -> None:
    log = open_saga_log("memory://")
    bus = open_event_bus("memory://")
    assert isinstance(log, InMemorySagaLog)
    assert isinstance(log, SagaLog)
    assert isinstance(bus, InMemoryEventBus)
    assert isinstance(bus, EventBus)


def test_each_url_opens_a_backend_of_its_own() -> None:
    assert open_saga_log("memory://") is not open_saga_log("memory://")


@pytest.mark.parametrize("url", ["", "memory", "sqlite:sagas.db", None, 42])
def test_a_malformed_url_says_what_a_url_looks_like(url: object) -> None:
    with pytest.raises(ConfigurationError, match=r"scheme://"):
        open_saga_log(url)  # type: ignore[arg-type]


def test_an_unknown_scheme_lists_the_available_ones() -> None:
    with pytest.raises(ConfigurationError, match=r"no event bus backend for kafka://.*memory://"):
        open_event_bus("kafka://localhost:9092")


@pytest.fixture
def backend_with_a_missing_driver() -> Iterator[str]:
    # A registry entry whose driver package is not installed, as a backend
    # whose extra was left out would be. The registries are plain dicts.
    SAGA_LOGS["pretend"] = Backend(
        "sagakit.adapters.memory_log:InMemorySagaLog.from_url",
        extra="postgres",
        driver="sagakit_no_such_driver_package",
    )
    try:
        yield "pretend://db"
    finally:
        del SAGA_LOGS["pretend"]


def test_a_missing_extra_fails_with_the_pip_command(backend_with_a_missing_driver: str) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        open_saga_log(backend_with_a_missing_driver)
    assert "pip install 'sagakit[postgres]'" in str(excinfo.value)
    assert isinstance(excinfo.value.__cause__, ImportError)


def test_the_scheme_is_case_insensitive_and_may_carry_a_driver_suffix() -> None:
    assert isinstance(open_saga_log("MEMORY://"), InMemorySagaLog)
    assert isinstance(open_saga_log("memory+fast://"), InMemorySagaLog)
    assert "memory" in EVENT_BUSES
