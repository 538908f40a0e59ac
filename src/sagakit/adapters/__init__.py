"""Adapters: one module per backend, picked from a URL and imported lazily.

``open_saga_log("memory://")`` and ``open_event_bus("memory://")`` return ready
backends. A URL whose backend needs an extra that is not installed fails with
the pip command that installs it, before anything else happens.
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING, Any, NamedTuple, cast
from urllib.parse import urlsplit

from sagakit.errors import ConfigurationError

if TYPE_CHECKING:
    # Annotations only: importing a backend (memory_bus, say) runs this package
    # first, and a bus has no use for the saga log's port (and core.records).
    from sagakit.ports.event_bus import EventBus
    from sagakit.ports.saga_log import SagaLog

__all__ = ["EVENT_BUSES", "SAGA_LOGS", "Backend", "open_event_bus", "open_saga_log", "redact_url"]


class Backend(NamedTuple):
    target: str  # "module:factory"; the factory takes the URL
    extra: str | None = None  # the pip extra that brings its driver
    driver: str | None = None  # the module that extra installs
    # The distribution pip installs for it, named in the error when the module
    # is missing: the module's name is often not it (nats is nats-py).
    distribution: str | None = None
    # The oldest version the extra accepts (pyproject.toml): an older driver
    # imports fine and fails later, from inside the backend.
    minimum: str | None = None


# Registries of schemes. Later backends add a line here and a module beside this one.
SAGA_LOGS: dict[str, Backend] = {
    "memory": Backend("sagakit.adapters.memory_log:InMemorySagaLog.from_url"),
    "sqlite": Backend("sagakit.adapters.sqlite_log:SQLiteSagaLog.from_url"),
    "postgresql": Backend(
        "sagakit.adapters.postgres_log:from_url", "postgres", "asyncpg", "asyncpg", "0.30"
    ),
    "postgres": Backend(
        "sagakit.adapters.postgres_log:from_url", "postgres", "asyncpg", "asyncpg", "0.30"
    ),
}
EVENT_BUSES: dict[str, Backend] = {
    "memory": Backend("sagakit.adapters.memory_bus:InMemoryEventBus.from_url"),
    "nats": Backend(
        "sagakit.adapters.nats_bus:NatsEventBus.from_url", "nats", "nats", "nats-py", "2.7"
    ),
    "redis": Backend(
        "sagakit.adapters.redis_bus:RedisEventBus.from_url", "redis", "redis", "redis", "5.0"
    ),
    "rediss": Backend(
        "sagakit.adapters.redis_bus:RedisEventBus.from_url", "redis", "redis", "redis", "5.0"
    ),
    "amqp": Backend(
        "sagakit.adapters.amqp_bus:AmqpEventBus.from_url", "rabbitmq", "aio_pika", "aio-pika", "9.4"
    ),
    "amqps": Backend(
        "sagakit.adapters.amqp_bus:AmqpEventBus.from_url", "rabbitmq", "aio_pika", "aio-pika", "9.4"
    ),
}


# A password=... option in a URL's query (libpq reads one): redact_url hides it.
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, fit for an error message or a log.

    Works on text alone, so that a URL too malformed to parse (the usual reason
    for printing one) is redacted too.
    """
    # The last @ of the authority ends the user part: a password may hold an @.
    scheme, sep, rest = url.partition("://")
    if sep:
        end = len(rest)
        for mark in "/?#":
            found = rest.find(mark)
            if found != -1:
                end = min(end, found)
        authority, path = rest[:end], rest[end:]
        user, at, host = authority.rpartition("@")
        if at and ":" in user:
            authority = f"{user.partition(':')[0]}:***@{host}"
        url = f"{scheme}://{authority}{path}"
    return _QUERY_PASSWORD.sub(r"\1***", url)


def _open(kind: str, registry: dict[str, Backend], url: str) -> Any:
    if not isinstance(url, str) or "://" not in url:
        shown = redact_url(url) if isinstance(url, str) else url
        raise ConfigurationError(
            f"{kind} URL {shown!r} is malformed: expected scheme://..., e.g. memory://"
        )
    try:
        parts = urlsplit(url)
        # A port that is not a number from 0 to 65535 is refused here, at once,
        # not by the driver on first use; each of several hosts' too
        # (postgresql://h1:5432,h2:5433/db).
        user, at, hosts = parts.netloc.rpartition("@")
        for host in hosts.split(","):
            urlsplit(f"//{user}{at}{host}").port  # noqa: B018 - the property checks
    except ValueError as exc:  # an unclosed [IPv6 address, a port that is not a number
        raise ConfigurationError(f"{kind} URL {redact_url(url)!r} is malformed: {exc}") from None
    scheme = parts.scheme.split("+", 1)[0].lower()
    backend = registry.get(scheme)
    if backend is None:
        known = ", ".join(f"{s}://" for s in sorted(registry))
        raise ConfigurationError(f"no {kind} backend for {scheme}:// (available: {known})")
    if backend.driver is not None:
        try:
            importlib.import_module(backend.driver)
        except ImportError as exc:
            # The import's own error too: a driver that is installed but broken
            # (a dependency of its own missing) fails here as well.
            raise ConfigurationError(
                f"the {scheme}:// {kind} needs the "
                f"{backend.distribution or backend.driver} distribution "
                f"(import {backend.driver}: {exc}): pip install 'sagakit[{backend.extra}]'"
            ) from exc
        _check_version(scheme, kind, backend)
    module_name, _, attr = backend.target.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    return target(url)


def _release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version ("0.30.0rc1" -> (0, 30, 0))."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def _check_version(scheme: str, kind: str, backend: Backend) -> None:
    if backend.minimum is None or backend.distribution is None:
        return
    from importlib import metadata

    try:
        found = metadata.version(backend.distribution)
    except (metadata.PackageNotFoundError, ValueError):
        return  # importable without metadata (vendored, a checkout): nothing to compare
    if _release(found) < _release(backend.minimum):
        raise ConfigurationError(
            f"the {scheme}:// {kind} needs {backend.distribution}>={backend.minimum}, "
            f"found {found}: pip install -U 'sagakit[{backend.extra}]'"
        )


def open_saga_log(url: str = "memory://") -> SagaLog:
    """The saga log the URL names."""
    return cast("SagaLog", _open("saga log", SAGA_LOGS, url))


def open_event_bus(url: str = "memory://") -> EventBus:
    """The event bus the URL names."""
    return cast("EventBus", _open("event bus", EVENT_BUSES, url))
