"""A TCP proxy in front of a PostgreSQL server that can lose one reply: the statement
reaches the server, runs and commits, and the connection is cut before its answer
comes back (what a network failure or a server killed at the wrong moment does).

``async with ReplyCutter(host, port) as proxy:`` listens on ``proxy.port``;
``proxy.cut_reply_to(b"some SQL text")`` arms it once: on the next connection whose
client prepares a statement containing that text (asyncpg names and caches its
statements: the default ``statement_cache_size``), the reply to its execution is not
forwarded, and both sides of that connection are closed. Other connections, and
everything afterwards, pass through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

__all__ = ["ReplyCutter"]

# The Execute message asyncpg sends: unnamed portal, no row limit ('E', length 9).
_EXECUTE = b"E\x00\x00\x00\x09\x00\x00\x00\x00"


class ReplyCutter:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.target = port
        self.port = 0
        self.cuts = 0  # replies lost so far
        self._marker: bytes | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def cut_reply_to(self, marker: bytes) -> None:
        self._marker = marker

    async def __aenter__(self) -> ReplyCutter:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            server_r, server_w = await asyncio.open_connection(self.host, self.target)
        except OSError:
            client_w.close()
            self._tasks.discard(task)
            return
        executed = asyncio.Event()  # the marked statement's execution was sent

        async def upstream() -> None:
            bind = None  # how the marked statement's execution begins
            while data := await client_r.read(65536):
                if self._marker is not None and self._marker in data and data[:1] == b"P":
                    # Parse: 'P', length, the statement's name, NUL, its text. asyncpg
                    # runs other statements (type introspection) before executing it.
                    self._marker = None
                    bind = b"\x00" + data[5 : data.index(b"\x00", 5)] + b"\x00"
                if bind is not None and data[:1] == b"B" and bind in data and _EXECUTE in data:
                    bind = None
                    server_w.write(data)
                    await server_w.drain()
                    executed.set()
                    continue
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if executed.is_set():
                    self.cuts += 1
                    return  # the reply is lost: the connection is cut below
                client_w.write(data)
                await client_w.drain()

        try:
            up = asyncio.ensure_future(upstream())
            down = asyncio.ensure_future(downstream())
            await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
            for part in (up, down):
                part.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
        finally:
            for writer in (client_w, server_w):
                with contextlib.suppress(Exception):
                    writer.transport.abort()
            self._tasks.discard(task)
