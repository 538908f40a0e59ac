"""The node's I/O: stdin to the host, the host's output to stdout. Nothing else does I/O."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import gc
import io
import logging
import os
import select
import signal
import stat
import sys
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, Protocol

from sagakit.core.records import valid_id
from sagakit.errors import SagakitError
from sagakit.node.host import Host, NodeSettings, Registry
from sagakit.node.kinds import default_registry
from sagakit.node.protocol import Decoder

if TYPE_CHECKING:
    import argparse

__all__ = ["UsageError", "exit_now", "log_level", "main", "parse_settings", "serve"]

log = logging.getLogger("sagakit.node")

CHUNK = 1 << 16
# Once the node is told to stop (SIGTERM, SIGINT), how long it waits for a
# reader that takes no output before it gives up the replies still unwritten.
STOP_GRACE = 5.0
# Chunks read ahead of the node at most: enough to keep it busy, little enough
# that an endless input cannot fill the memory.
READ_AHEAD = 16


class _Chunks(Protocol):
    async def get(self) -> bytes:
        """The next chunk of input; b"" at the end."""
        ...


class _FileChunks:
    """Chunks of a regular file, read on the event loop's own thread.

    A read from a file never waits for a writer, so it needs no thread; and
    handing every chunk over from one costs a switch of the GIL each way.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd

    async def get(self) -> bytes:
        # A turn of the loop per chunk, as a reader thread's queue would give:
        # other tasks (the event bus's dispatcher) run between chunks.
        await asyncio.sleep(0)
        try:
            return os.read(self._fd, CHUNK)
        except OSError as exc:
            log.error("cannot read stdin (%s); treating it as ended", exc)
            return b""


def _input_chunks(stdin: BinaryIO, loop: asyncio.AbstractEventLoop) -> _Chunks:
    try:
        fd = stdin.fileno()
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return _FileChunks(fd)
    except (AttributeError, OSError, ValueError):  # no descriptor: an in-memory stream (tests)
        pass
    return _start_reader(stdin, loop)


class _ThreadChunks:
    """Chunks that a reader thread hands over, at most READ_AHEAD waiting at a time."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        # Taken by the reader before it hands a chunk over, given back when the
        # node takes it: the thread blocks while READ_AHEAD chunks wait (backpressure).
        self.slots = threading.Semaphore(READ_AHEAD)

    async def get(self) -> bytes:
        chunk = await self.queue.get()
        self.slots.release()
        return chunk


def _start_reader(stdin: BinaryIO, loop: asyncio.AbstractEventLoop) -> _ThreadChunks:
    """Read stdin in a daemon thread, chunk by chunk; b"" at the end.

    Not the loop's executor: asyncio.run joins its threads on the way out, so a
    node interrupted while waiting for input would hang until the next line.
    A daemon thread is simply left behind. Chunks are handed over with a plain
    callback, not a coroutine per chunk: a coroutine scheduled just as the loop
    closes is dropped unawaited, and Python warns of it on stderr.
    """
    chunks = _ThreadChunks()
    try:
        # The raw descriptor: a thread blocked in a buffered reader holds its
        # lock, and the interpreter aborts at exit when it cannot take it.
        fd = stdin.fileno()
    except (AttributeError, OSError, ValueError):  # an in-memory stream (tests)
        read = getattr(stdin, "read1", stdin.read)
    else:

        def read(size: int) -> bytes:
            return os.read(fd, size)

    def pump() -> None:
        chunk = b"-"
        while chunk:
            try:
                chunk = read(CHUNK)
            except (OSError, ValueError) as exc:
                log.error("cannot read stdin (%s); treating it as ended", exc)
                chunk = b""
            chunks.slots.acquire()  # blocks this thread while READ_AHEAD chunks wait
            try:
                loop.call_soon_threadsafe(chunks.queue.put_nowait, chunk)
            except RuntimeError:
                return  # the loop is closed: the node is shutting down

    threading.Thread(target=pump, name="sagakit-stdin", daemon=True).start()
    return chunks


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
            view = memoryview(data)
            written = self._stream.write(view)
            if written is not None and written < len(view):
                # A signal (SIGTERM, SIGINT) arriving while a write waits on a full
                # pipe cuts it short: BufferedWriter then returns what it wrote and
                # drops the rest, which tore a line and lost the replies after it.
                self._write_rest(view[written:])
            self._stream.flush()
        except (OSError, ValueError) as exc:
            # Closed (EPIPE, or a closed file: ValueError), full (ENOSPC),
            # opened read-only (EBADF): nobody will read a reply again.
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            log.error("stdout is closed or cannot be written (%s); the node stops", reason)
            self.broken = True

    def _write_rest(self, view: memoryview) -> None:
        """The rest of a write a signal cut short, while stdout takes it.

        The node is being stopped: it waits for its reader to take what it made,
        but not forever, since a reader that is stuck would then keep it alive
        through any number of SIGTERMs. In pieces a pipe takes whole once it is
        writable (PIPE_BUF), so that no write blocks past the wait.
        """
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError):  # an in-memory stream (tests): it takes everything
            fd = -1
        while view:
            if fd >= 0 and not select.select([], [fd], [], STOP_GRACE)[1]:
                raise OSError(errno.ETIMEDOUT, f"not read for {STOP_GRACE:g} s after a stop")
            piece = view[: select.PIPE_BUF]
            self._stream.write(piece)
            self._stream.flush()
            view = view[len(piece) :]


async def serve(
    stdin: BinaryIO,
    stdout: BinaryIO,
    registry: Registry | None = None,
    settings: NodeSettings | None = None,
) -> bool:
    """Serve messages from ``stdin`` until it ends, then finish all work in flight.

    One message at a time, in input order: a message is handled, and the work
    it sets off (the events of a choreography) is finished, before the next
    is read, so the output depends only on the input's bytes, not on how
    they arrive (in what pieces, after what pauses).

    Returns False when stdout was closed under the node: nobody can read a
    reply any more, so it stops reading instead of working for no one.
    """
    loop = asyncio.get_running_loop()
    settings = settings or NodeSettings()
    output = _Output(stdout, loop)
    host = Host(registry or default_registry(), output.write, settings)
    if settings.store is not None:
        # Opened before any input is read: a store that cannot be opened stops
        # the node at once, not after each execute has retried it for a while.
        saga_node = host.node("saga")
        await saga_node.open()
    decoder = Decoder(settings.max_line)
    # utf-8-sig: a byte order mark at the very start is dropped, not an error.
    text = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
    chunks = _input_chunks(stdin, loop)
    restore = _cancel_on_sigterm(loop)
    try:
        return await _serve(chunks, decoder, text, host, output)
    finally:
        # However serving ends (SIGTERM or SIGINT cancel it at its next wait),
        # the replies of the requests already handled are written.
        output.flush()
        restore()


def _cancel_on_sigterm(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """SIGTERM cancels the serving task, as asyncio.run does for SIGINT, so that
    its output is flushed (the default action would drop it); returns the undo."""
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - serve always runs in a task
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    try:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    except (NotImplementedError, RuntimeError, ValueError):  # not Unix, not the main thread
        return lambda: None

    def restore() -> None:
        loop.remove_signal_handler(signal.SIGTERM)
        if previous is not None:  # None: a handler not set from Python, left as it is
            signal.signal(signal.SIGTERM, previous)

    return restore


async def _serve(
    chunks: _Chunks, decoder: Decoder, text: codecs.IncrementalDecoder, host: Host, output: _Output
) -> bool:
    dispatch = host.dispatch
    while True:
        chunk = await chunks.get()
        for message in decoder.feed(text.decode(chunk, final=not chunk)):
            try:
                await dispatch(message)
            except Exception:  # a bug, not bad input: the next message still gets served
                log.exception("internal error while handling a message; skipped")
        output.flush()
        if output.broken:
            return False
        if not chunk:
            break
    for message in decoder.close():
        try:
            await dispatch(message)
        except Exception:
            log.exception("internal error while handling a message; skipped")
    await host.finish()
    output.flush()
    return not output.broken


class UsageError(ValueError):
    """A bad option or ``SAGAKIT_*`` value: reported as argparse reports an unknown
    option (a usage line, then ``prog: error: ...``), exit status 2."""


# Given, not composed by argparse: its own usage wraps with the terminal's
# width, and a usage error is then no longer two lines (usage, error).
_USAGE = (
    "%(prog)s [-h] [--max-sagas N] [--max-records N] [--max-line CHARS] [--store URL]"
    " [--owner NAME] [--retry-for SECONDS]"
)


def _positive(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{name} must be a whole number >= 1, got {raw!r}")
    return value


def _seconds(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86_400:  # NaN too
        raise UsageError(f"{name} must be seconds from 0 to 86400, got {raw!r}")
    return value


def _owner(name: str, raw: str) -> str:
    if not valid_id(raw):
        raise UsageError(
            f"{name} must be text without NUL, at most 1,024 bytes of UTF-8, got {raw[:80]!r}"
        )
    return raw


def _parser(prog: str) -> argparse.ArgumentParser:
    import argparse

    defaults = NodeSettings()
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=_USAGE,
        description="The protocol node: JSON messages on stdin, replies on stdout.",
    )
    parser.add_argument(
        "--max-sagas",
        metavar="N",
        help="finished sagas kept to answer retries, per node kind "
        f"(env SAGAKIT_MAX_SAGAS; default {defaults.max_sagas})",
    )
    parser.add_argument(
        "--max-records",
        metavar="N",
        help="records and steps the saga node's finished sagas may hold in all, in memory;"
        " past it the oldest are forgotten, as past --max-sagas "
        f"(env SAGAKIT_MAX_RECORDS; default {defaults.max_records})",
    )
    parser.add_argument(
        "--max-line",
        metavar="CHARS",
        help="longest input line or value, in characters "
        f"(env SAGAKIT_MAX_LINE; default {defaults.max_line})",
    )
    parser.add_argument(
        "--store",
        metavar="URL",
        help="the saga node's log, e.g. sqlite:///sagas.db: sagas outlive the process "
        "(env SAGAKIT_STORE; default in memory, capped by --max-sagas and --max-records)",
    )
    parser.add_argument(
        "--owner",
        metavar="NAME",
        help="the name the saga node takes leases under in the store (env SAGAKIT_OWNER;"
        " default: its node id, or 'saga' before an init, @ this host's name)",
    )
    parser.add_argument(
        "--retry-for",
        metavar="SECONDS",
        help="how long a request retries a store that is down before it is answered"
        f" code 11 (env SAGAKIT_RETRY_FOR; default {defaults.retry_for:g})",
    )
    return parser


def parse_settings(
    argv: list[str], environ: Mapping[str, str], prog: str = "python3 main.py"
) -> NodeSettings:
    """The node's settings from its arguments, then its environment, then the defaults.

    ``prog``: the command named in ``--help`` and usage errors. An option argparse
    does not know ends the program (status 2); a bad value raises UsageError,
    naming the option or the variable it came from.
    """
    defaults = NodeSettings()
    # (where it came from, the raw value): what a refusal names.
    given: dict[str, tuple[str, str]] = {}
    for key in ("max_sagas", "max_records", "max_line", "store", "owner", "retry_for"):
        variable = "SAGAKIT_" + key.upper()
        if environ.get(variable):
            given[key] = (variable, environ[variable])
    if argv:
        args = vars(_parser(prog).parse_args(argv))
        for key, value in args.items():
            if value:
                given[key] = ("--" + key.replace("_", "-"), value)

    def setting(key: str, check: Callable[[str, str], object], default: object) -> Any:
        return check(*given[key]) if key in given else default

    return NodeSettings(
        max_sagas=setting("max_sagas", _positive, defaults.max_sagas),
        max_records=setting("max_records", _positive, defaults.max_records),
        max_line=setting("max_line", _positive, defaults.max_line),
        store=setting("store", lambda _name, url: url, None),
        owner=setting("owner", _owner, None),
        retry_for=setting("retry_for", _seconds, defaults.retry_for),
    )


def _printable(text: str, keep: str = "") -> str:
    """``text`` with what a terminal acts on escaped as repr escapes it (but ``keep``)."""
    return "".join(c if c.isprintable() or c in keep else ascii(c)[1:-1] for c in text)


class _PrintableFormatter(logging.Formatter):
    """Log lines with their control characters escaped.

    The node's log quotes its input (bad input, saga ids, step names), which is
    hostile text: an escape sequence would clear or retitle the terminal, and a
    newline or carriage return forge a log line of its own. A traceback keeps its
    line breaks.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        return text if text.isprintable() else _printable(text)

    def formatException(self, ei: Any) -> str:
        return _printable(super().formatException(ei), keep="\n")


def log_level(environ: Mapping[str, str], default: str) -> str:
    """``SAGAKIT_LOG`` as a level name; a name logging does not know is a UsageError
    (logging itself raised ValueError, a traceback, at start-up)."""
    given = environ.get("SAGAKIT_LOG", default)
    level = given.strip().upper()
    if not isinstance(logging.getLevelName(level), int):
        # Quoted as given: the operator wrote "verbose", not "VERBOSE".
        raise UsageError(
            f"SAGAKIT_LOG must be debug, info, warning, error or critical, got {given!r}"
        )
    return level


def main(argv: list[str] | None = None, prog: str = "python3 main.py") -> int:
    """Entry point of ``python3 main.py`` and ``sagakit node``: ``argv`` are their options."""
    try:
        settings = parse_settings(argv or [], os.environ, prog)
        level = log_level(os.environ, "WARNING")
    except UsageError as exc:
        # As argparse reports an option it does not know, so that every usage
        # error looks and exits alike (status 2), whatever was wrong.
        _parser(prog).print_usage(sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    # The node keeps every saga's log in memory (a retry must find it), so the
    # heap only grows; with the default thresholds the collector re-scans it
    # every few hundred sagas. Long-lived objects are not garbage: scan less often.
    gc.set_threshold(50_000, 20, 100)
    # Everything made so far is the program itself (main.py turns the collector
    # off while it imports): out of the collector's sight for good, then on.
    gc.freeze()
    gc.enable()
    if sys.stdout is None:
        # Started with descriptor 1 closed: the interpreter leaves the stream None.
        log.error("stdout is closed; the node stops")
        return 1
    # Descriptor 0 closed: no input at all, which the node serves as an empty one.
    stdin = io.BytesIO() if sys.stdin is None else sys.stdin.buffer
    try:
        served = asyncio.run(serve(stdin, sys.stdout.buffer, settings=settings))
    except KeyboardInterrupt:
        return 130
    except asyncio.CancelledError:  # SIGTERM, its output flushed
        return 143
    except SagakitError as exc:  # the store: a bad URL, a missing extra, a foreign file
        log.error("cannot serve: %s", exc)
        return 2
    if not served:
        # Leave no buffered bytes behind for the interpreter to fail on at exit.
        sys.stdout = None
        return 1
    return 0


def exit_now(code: int) -> NoReturn:
    """Leave the process with ``code`` once its output is flushed, skipping the teardown.

    The node keeps every saga it ran. An ordinary exit frees them one object at
    a time and runs a last full collection over them: work that no one waits
    for, yet about 3% of a short run over a large input. atexit handlers do not
    run: a node kind releases what it holds in ``Node.finish``, which ``serve``
    awaits before it returns.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            # Closed under us (OSError, ValueError): nothing more can reach it.
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    os._exit(code)
