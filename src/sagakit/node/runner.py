"""The node's I/O: stdin to the host, the host's output to stdout. Nothing else does I/O."""

from __future__ import annotations

import asyncio
import codecs
import gc
import logging
import os
import sys
from typing import BinaryIO

from sagakit.node.host import Host, Registry
from sagakit.node.kinds import default_registry
from sagakit.node.protocol import Decoder

__all__ = ["main", "serve"]

log = logging.getLogger("sagakit.node")

CHUNK = 1 << 16


class _Output:
    """Buffers output lines and writes them once per event-loop turn.

    One write per turn, not per line: a chunk of input handled in one turn
    costs one system call, and nothing waits longer than the turn it was
    produced in.
    """

    def __init__(self, stream: BinaryIO, loop: asyncio.AbstractEventLoop) -> None:
        self._stream, self._loop = stream, loop
        self._lines: list[str] = []
        self.broken = False

    def write(self, line: str) -> None:
        if not self._lines:
            self._loop.call_soon(self.flush)
        self._lines.append(line)

    def flush(self) -> None:
        if not self._lines:
            return
        data = ("\n".join(self._lines) + "\n").encode()
        self._lines.clear()
        if self.broken:
            return
        try:
            self._stream.write(data)
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            log.error("stdout is closed; dropping output from here on")
            self.broken = True


async def serve(stdin: BinaryIO, stdout: BinaryIO, registry: Registry | None = None) -> bool:
    """Serve messages from ``stdin`` until it ends, then finish all work in flight.

    Returns False when stdout was closed under the node: nobody can read a
    reply any more, so it stops reading instead of working for no one.
    """
    loop = asyncio.get_running_loop()
    output = _Output(stdout, loop)
    host = Host(registry or default_registry(), output.write)
    decoder = Decoder()
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    read = getattr(stdin, "read1", stdin.read)
    dispatch = host.dispatch
    while True:
        chunk = await loop.run_in_executor(None, read, CHUNK)
        for message in decoder.feed(text.decode(chunk, final=not chunk)):
            await dispatch(message)
        output.flush()
        if output.broken:
            return False
        if not chunk:
            break
    for message in decoder.close():
        await dispatch(message)
    await host.finish()
    output.flush()
    return not output.broken


def main() -> int:
    """Entry point of ``python3 main.py`` and ``sagakit node``."""
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("SAGAKIT_LOG", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The node keeps every saga's log in memory (a retry must find it), so the
    # heap only grows; with the default thresholds the collector re-scans it
    # every few hundred sagas. Long-lived objects are not garbage: scan less often.
    gc.set_threshold(50_000, 20, 100)
    try:
        served = asyncio.run(serve(sys.stdin.buffer, sys.stdout.buffer))
    except KeyboardInterrupt:
        return 130
    if not served:
        # Leave no buffered bytes behind for the interpreter to fail on at exit.
        sys.stdout = None
        return 1
    return 0
