"""The RabbitMQ server of the tests: the one named by ``SAGAKIT_TEST_AMQP_URL``.

RabbitMQ ships no wheel, so the tests use a running server, by default this
machine's at ``amqp://guest:guest@127.0.0.1:5672/`` (``.ci/run`` starts it when
it is down). Each test gets a namespace of its own (a bus ``prefix``); its
queues and exchange are deleted when the test ends (listed with ``rabbitmqctl``,
so only on a server of this machine; elsewhere the exchange alone is deleted and
the queues, named ``t<session>x<n>.*``, are left).

Faults are injected from the server's side with ``rabbitmqctl`` (the
management plugin is not enabled here): :meth:`AmqpServer.close_connections`
closes a client's connections as a broker would, and :meth:`AmqpServer.restart`
stops and starts the RabbitMQ application on its storage. The server is shared
with whatever else runs on the machine, so a restart happens only when
``SAGAKIT_TEST_AMQP_RESTART=1`` (``.ci/run`` sets it); elsewhere those tests
skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
from collections.abc import AsyncIterator
from urllib.parse import unquote, urlsplit

import aio_pika
import pytest

from tests.servers import unavailable

__all__ = ["AmqpServer", "amqp_namespace", "amqp_server"]

ENV_URL = "SAGAKIT_TEST_AMQP_URL"
ENV_RESTART = "SAGAKIT_TEST_AMQP_RESTART"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
START_TIMEOUT = 60.0


class AmqpServer:
    """A running RabbitMQ, and what the tests do to it from the server's side."""

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 5672
        self.vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        # rabbitmqctl talks to the node on this machine: of use for a local server only.
        local = self.host in ("127.0.0.1", "localhost", "::1")
        self._ctl = shutil.which("rabbitmqctl") if local else None
        self._made = 0
        self._session = os.urandom(3).hex()

    def bus_url(self, prefix: str, **options: object) -> str:
        query = "&".join([f"prefix={prefix}", *(f"{k}={v}" for k, v in options.items())])
        return f"{self.url}{'&' if '?' in self.url else '?'}{query}"

    def new_prefix(self) -> str:
        self._made += 1
        return f"t{self._session}x{self._made}"

    def reachable(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=2):
                return True
        except OSError:
            return False

    async def _ctl_run(self, *args: str, within: float = 30.0) -> str:
        if self._ctl is None:
            unavailable(
                "the tests that inject faults from the server's side need rabbitmqctl and"
                f" the server on this machine (the server is {self.host}:{self.port})"
            )
        process = await asyncio.create_subprocess_exec(
            self._ctl,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(within):
                out, err = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {err.decode()[-500:]}")
        return out.decode()

    async def close_connections(self, connection_name: str) -> int:
        """Close, from the server, every connection whose client named it so; how many."""
        # One line per connection: its pid (what close_connection takes), a tab, the
        # client's properties, where the connection's name appears quoted.
        listing = await self._ctl_run("list_connections", "-s", "pid", "client_properties")
        closed = 0
        for line in listing.splitlines():
            pid, _, properties = line.partition("\t")
            if f'"{connection_name}"' in properties:
                await self._ctl_run("close_connection", pid, "closed by a sagakit test")
                closed += 1
        return closed

    async def restart(self) -> None:
        """Stop and start the RabbitMQ application (same node, same storage)."""
        if os.environ.get(ENV_RESTART) != "1":
            unavailable(f"restarting the shared RabbitMQ needs {ENV_RESTART}=1 (.ci/run sets it)")
        await self._ctl_run("stop_app", within=120)
        await self._ctl_run("start_app", within=120)
        await self._ctl_run("await_startup", within=120)
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT
        while True:
            try:
                connection = await aio_pika.connect(self.url, timeout=5)
            except Exception:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.2)
            else:
                await connection.close()
                return

    @contextlib.asynccontextmanager
    async def memory_alarm(self) -> AsyncIterator[None]:
        """The broker blocks its publishers inside the block (a memory alarm), as when full."""
        if os.environ.get(ENV_RESTART) != "1":
            unavailable(f"raising an alarm on the shared RabbitMQ needs {ENV_RESTART}=1")
        was = await self._ctl_run("eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
        was = was.strip()
        # A relative fraction is restored as it was; an absolute setting, to the default.
        restore = was if was.replace(".", "", 1).isdigit() else "0.4"
        await self._ctl_run("set_vm_memory_high_watermark", "0")
        try:
            yield
        finally:
            await self._ctl_run("set_vm_memory_high_watermark", restore)

    async def delete_namespace(self, prefix: str) -> None:
        """Delete the queues and the exchange of one bus prefix."""
        names: list[str] = []
        if self._ctl is not None:
            listing = await self._ctl_run(
                "list_queues", "-q", "-p", self.vhost, "name", "--formatter", "json"
            )
            names = [
                row["name"]
                for row in json.loads(listing or "[]")
                if row["name"].startswith(f"{prefix}.")
            ]
        connection = await aio_pika.connect(self.url, timeout=5)
        try:
            for name in names:
                channel = await connection.channel()
                # Gone already: an exclusive queue of a closed connection.
                with contextlib.suppress(aio_pika.exceptions.AMQPError):
                    await channel.queue_delete(name)
                if not channel.is_closed:
                    await channel.close()
            channel = await connection.channel()
            await channel.exchange_delete(f"{prefix}.events")
        finally:
            await connection.close()


@pytest.fixture(scope="session")
def amqp_server() -> AmqpServer:
    """The RabbitMQ of the tests (SAGAKIT_TEST_AMQP_URL, else this machine's)."""
    server = AmqpServer(os.environ.get(ENV_URL) or DEFAULT_URL)
    if not server.reachable():
        unavailable(
            f"no RabbitMQ at {server.host}:{server.port}: start one (rabbitmq-server -detached)"
            f" or set {ENV_URL}=amqp://user:password@host:5672/vhost"
        )
    return server


@pytest.fixture
async def amqp_namespace(amqp_server: AmqpServer) -> AsyncIterator[str]:
    """A bus prefix of this test's own, deleted with its queues when the test ends."""
    prefix = amqp_server.new_prefix()
    yield prefix
    await amqp_server.delete_namespace(prefix)
