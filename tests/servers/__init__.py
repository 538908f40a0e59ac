"""Real servers for the tests: private instances started per test session, or external ones.

Each backend has a module here that provides a session fixture for its server.
A server that cannot be had fails the run when ``CI`` is set (CI must never
pass by skipping), and skips elsewhere with a message that says how to point
the tests at one.
"""

from __future__ import annotations

import os
import socket
from typing import NoReturn

import pytest


def unavailable(message: str) -> NoReturn:
    """Fail under CI, skip elsewhere: a missing server is never a silent pass in CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
