"""The PostgreSQL saga log's URL: sagakit's own options taken out of its query, the rest
left to asyncpg (a server setting, when asyncpg does not know it either)."""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sagakit.errors import ConfigurationError

__all__ = ["OPTIONS", "check_files", "split_url"]

OPTIONS = (
    "pool_size",
    "connect_timeout",
    "command_timeout",
    "statement_cache_size",
    "batches_in_flight",
)
_COUNTS = ("pool_size", "statement_cache_size", "batches_in_flight")  # whole numbers

# Files the URL names that the driver reads at each connection; one missing is an
# OSError there, taken for a server out of reach, and retried for ever.
_FILE_OPTIONS = ("sslrootcert", "sslcert", "sslkey", "sslcrl")


def split_url(url: str) -> tuple[str, dict[str, float]]:
    """The DSN for asyncpg, and sagakit's options; ConfigurationError naming a bad one."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # "Invalid IPv6 URL"
        raise ConfigurationError(f"saga log URL: {exc}") from None
    query = parse_qsl(parts.query, keep_blank_values=True)
    values: dict[str, float] = {}
    for name, raw in query:
        if name not in OPTIONS:
            continue
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        least = 0 if name == "statement_cache_size" else 1e-9
        if not least <= value < 1e9 or (name in _COUNTS and value != int(value)):
            kind = "whole number" if name in _COUNTS else "number"
            raise ConfigurationError(f"saga log URL: {name} must be a positive {kind}, got {raw!r}")
        values[name] = value
    rest = urlencode([(k, v) for k, v in query if k not in OPTIONS])
    return urlunsplit(parts._replace(scheme="postgresql", query=rest)), values


def check_files(dsn: str) -> None:
    """ConfigurationError naming the option when the URL names a file that is not there."""
    for name, value in parse_qsl(urlsplit(dsn).query):
        if name in _FILE_OPTIONS and not os.path.exists(os.path.expanduser(value)):
            raise ConfigurationError(f"saga log URL: {name}={value!r}: no such file")
