"""Backends are picked from a URL, imported lazily, and a missing extra names its pip command."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

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


@pytest.mark.parametrize(
    ("scheme", "backend"),
    [(s, b) for registry in (SAGA_LOGS, EVENT_BUSES) for s, b in registry.items() if b.extra],
)
def test_the_distribution_named_is_the_one_the_extra_installs(
    scheme: str, backend: Backend
) -> None:
    # The error names the distribution and the extra: pyproject.toml must agree.
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    requirements = pyproject["project"]["optional-dependencies"][backend.extra]
    names = [re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements]
    assert backend.distribution in names, (scheme, requirements)
    # And the oldest version it accepts, which the error names for an older driver.
    assert f"{backend.distribution}>={backend.minimum}" in requirements, (scheme, requirements)


def test_the_scheme_is_case_insensitive_and_may_carry_a_driver_suffix() -> None:
    assert isinstance(open_saga_log("MEMORY://"), InMemorySagaLog)
    assert isinstance(open_saga_log("memory+fast://"), InMemorySagaLog)
    assert "memory" in EVENT_BUSES


# A user's URL often holds a password: whatever goes wrong with it, an error
# message (which ends up in logs) must not show it.
SECRET = "s3cret-pw"


@pytest.mark.parametrize(
    ("opener", "url", "what"),
    [
        # Malformed for urllib: an unclosed IPv6 bracket, a port that is not a number.
        (open_saga_log, f"postgresql://u:{SECRET}@[::1:5432/db", "Invalid IPv6"),
        (open_saga_log, f"postgresql://u:{SECRET}@host:notaport/db", "Port could not be cast"),
        (open_saga_log, f"postgresql://u:{SECRET}@host:99999/db", "Port out of range"),
        (open_event_bus, f"nats://u:{SECRET}@[::1:4222", "Invalid IPv6"),
        (open_event_bus, f"nats://u:{SECRET}@host:port", "Port could not be cast"),
        (open_event_bus, f"redis://:{SECRET}@host:port", "Port could not be cast"),
        (open_event_bus, f"amqp://u:{SECRET}@[::1/", "Invalid IPv6"),
        # Several PostgreSQL hosts: each port is checked (the driver raised a bare
        # ValueError on first use).
        (open_saga_log, f"postgresql://u:{SECRET}@h1:5432,h2:port/db", "Port could not be cast"),
        (open_saga_log, f"postgresql://u:{SECRET}@h1:5432,h2:70000/db", "Port out of range"),
        # A Redis path that is not a database number (redis-py read it as db 0).
        (open_event_bus, f"redis://:{SECRET}@127.0.0.1:6379/prod", "database by number"),
        # Each backend's own checks.
        (open_saga_log, f"sqlite://u:{SECRET}@host/x.db", "three slashes"),
        (open_saga_log, f"sqlite:///x.db?password={SECRET}", "unknown option"),
        (open_saga_log, f"memory://u:{SECRET}@x", "memory:// takes only"),
        (open_event_bus, f"memory://u:{SECRET}@x?capacity=q", "capacity"),
        (open_event_bus, f"nats://u:{SECRET}@host:4222?batch=q", "invalid literal"),
        (open_event_bus, f"redis://:{SECRET}@host:6379/0?maxlen=q", "invalid literal"),
        # An option neither the bus nor redis-py knows (redis-py kept it, and the
        # first publish raised a bare TypeError).
        (open_event_bus, f"redis://:{SECRET}@host:6379/0?max_len=5", "unknown option.* max_len"),
    ],
)
def test_a_bad_url_is_a_configuration_error_that_hides_its_password(
    opener: object, url: str, what: str
) -> None:
    with pytest.raises(ConfigurationError, match=what) as excinfo:
        opener(url)  # type: ignore[operator]
    assert SECRET not in str(excinfo.value)


def test_redis_options_redis_py_knows_still_go_to_it() -> None:
    # Connection options, and TLS ones on rediss://, are redis-py's to read.
    for url in (
        "redis://127.0.0.1:6379/0?health_check_interval=3&client_name=a&prefix=p",
        "rediss://127.0.0.1:6379/0?ssl_cert_reqs=none",
    ):
        assert type(open_event_bus(url)).__name__ == "RedisEventBus"


def test_redact_url_hides_the_password_and_nothing_else() -> None:
    from sagakit.adapters import redact_url

    assert redact_url("amqp://guest:s3cret@host:5672/vh") == "amqp://guest:***@host:5672/vh"
    assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
    assert redact_url("redis://:s3cret@h/0") == "redis://:***@h/0"
    assert (
        redact_url("postgresql://u@h/db?sslmode=disable") == "postgresql://u@h/db?sslmode=disable"
    )
    # A password holding an @; one in libpq's password= option; a URL urllib refuses.
    assert redact_url("postgresql://u:p@ss@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert (
        redact_url("postgresql://u@h/db?a=1&password=s3cret&b=2")
        == "postgresql://u@h/db?a=1&password=***&b=2"
    )
    assert redact_url("postgresql://u:s3cret@[::1:5432/db") == "postgresql://u:***@[::1:5432/db"
    # An @ in a path is not a user part.
    assert redact_url("sqlite:///a:b@c.db") == "sqlite:///a:b@c.db"
