"""A private server process of the test session: a free loopback port, restartable.

A backend's module names its binary's command line and how to tell that the
server is ready; this class starts it, stops it cleanly (SIGTERM) or as a crash
would (SIGKILL), and starts it again on the same port and files, which the
fault tests need. A server named by an env var instead (``binary`` None) is
used as is and never restarted.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import pytest

from tests.servers import unavailable

__all__ = ["ServerProcess", "serve"]

START_TIMEOUT = 15.0


def _die_with_parent() -> None:
    # A test run killed outright (SIGKILL, a timeout) must not leave its server
    # running on a shared machine: on Linux the kernel stops it with its parent.
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# The "parent" of PR_SET_PDEATHSIG is the thread that started the process, not the
# process: a server restarted from asyncio.to_thread died with that worker thread a
# moment later. Every server is therefore started from this one thread, which lives
# as long as the test run.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-servers")


S = TypeVar("S", bound="ServerProcess")


class ServerProcess:
    """A server of this test session (``process`` is None while stopped or external)."""

    name = "server"  # the binary's name, for messages
    env_url = ""  # the env var that names an external server instead
    # An external server the tests may not restart: skip (it is not missing), or, where
    # the backend's restart tests must run in CI, count it as missing (fails under CI).
    missing_if_not_restartable = False

    def __init__(self, url: str, *, binary: str | None = None, log: Path | None = None) -> None:
        self.url = url
        self._binary, self._log = binary, log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def restartable(self) -> bool:
        return self._binary is not None

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None
        return port

    def command(self, binary: str) -> list[str]:
        """The command line that starts the server on ``self.port``."""
        raise NotImplementedError

    def answers(self, sock: socket.socket) -> bool:
        """Whether the server on the other end of ``sock`` is ready for clients."""
        raise NotImplementedError

    def start(self) -> None:
        assert self._binary is not None
        assert self._log is not None
        self._log.parent.mkdir(parents=True, exist_ok=True)
        with self._log.open("ab") as log:
            self.process = _SPAWNER.submit(
                subprocess.Popen,
                self.command(self._binary),
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            ).result()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            if self._ready():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.name} did not start within {START_TIMEOUT}s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                return self.answers(sock)
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM: it flushes its files, as on a clean restart)."""
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
            message = f"the {self.name} at {self.url} ({self.env_url}) is not ours to restart"
            if self.missing_if_not_restartable:
                unavailable(message)
            pytest.skip(message)
        if crash:
            self.kill()
        else:
            self.stop()
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        if self._log is None or not self._log.exists():
            return ""
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])


def serve(server: S) -> Iterator[S]:
    """A session fixture's body for a private server: started, yielded, stopped."""
    try:
        server.start()
    except RuntimeError as exc:
        unavailable(str(exc))
    try:
        yield server
    finally:
        server.stop()
