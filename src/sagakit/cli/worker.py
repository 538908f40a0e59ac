"""``sagakit worker``: a worker process that carries sagas on from a shared saga log.

It claims every unfinished saga whose lease expired (a dead worker's, or one
that ``Orchestrator.start`` only recorded), drives it to its end, and goes on
doing so until SIGTERM or SIGINT; then it stops taking work, lets the step in
flight finish or be abandoned at the next record, and gives its leases up so
another worker may carry on at once. A second signal ends it at once (one within
REPEAT_WINDOW of the first is taken for the same one, delivered twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable
from typing import Any

from sagakit.adapters import redact_url
from sagakit.core.saga import SagaDefinition
from sagakit.errors import ConfigurationError

__all__ = ["load_sagas", "run_worker"]

log = logging.getLogger("sagakit.worker")

# Far shorter than an operator signals twice, far longer than a signal sent to a
# process and its group takes to arrive twice.
REPEAT_WINDOW = 0.2


def load_sagas(spec: str) -> list[SagaDefinition]:
    """The definitions ``package.module:NAME`` names: NAME is one definition or an
    iterable of them. The current directory is importable, as ``python -m`` makes it."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"--sagas {spec!r}: expected package.module:NAME")
    if module_name.startswith("."):  # import_module would raise a TypeError
        raise ConfigurationError(
            f"--sagas {spec!r}: {module_name} is relative; give the module's full name"
        )
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"--sagas {spec!r}: cannot import {module_name}: {exc}") from exc
    try:
        value: object = module
        for part in attr.split("."):
            value = getattr(value, part)
    except AttributeError as exc:
        raise ConfigurationError(f"--sagas {spec!r}: {module_name} has no {attr}") from exc
    if isinstance(value, SagaDefinition):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        sagas = list(value)
        if sagas and all(isinstance(s, SagaDefinition) for s in sagas):
            return sagas
    raise ConfigurationError(
        f"--sagas {spec!r}: {attr} must be a SagaDefinition or a list of them, "
        f"not {type(value).__name__}"
    )


async def run_worker(
    store: str,
    sagas: list[SagaDefinition],
    owner: str | None = None,
    lease_ttl: float | None = None,
    concurrency: int = 64,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop cleanly."""
    from sagakit.orchestration import Orchestrator

    if store.partition("://")[0].strip().lower() == "memory":
        # It would serve for ever and do nothing: no other process can reach its log.
        raise ConfigurationError(
            f"--store {store!r}: memory:// lives inside one process, where no other can"
            " start a saga; give the log the sagas are started on (sqlite:///sagas.db,"
            " postgresql://...)"
        )

    options: dict[str, Any] = {} if lease_ttl is None else {"lease_ttl": lease_ttl}
    orchestrator = Orchestrator(store, sagas=sagas, owner=owner, **options)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)

    first: list[float] = []  # when the first signal came

    def stopping_now(signum: int, frame: object) -> None:
        # A second signal ends the process at once, as a kill would (the leases
        # then expire): a step that ignores cancellation, or blocks, would
        # otherwise keep the worker alive whatever the operator did. A plain
        # signal handler, not the loop's: the loop's runs only once the loop
        # gets control back, which a step blocking it (a plain function calling
        # time.sleep, a blocking driver) withholds, so both signals waited for
        # the step to return. Python runs this one in the main thread at once,
        # a blocking sleep included; call_soon_threadsafe wakes the loop.
        now = time.monotonic()
        if not first:
            first.append(now)
            loop.call_soon_threadsafe(stop.set)
        elif now - first[0] >= REPEAT_WINDOW:
            for each in signals:
                signal.signal(each, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        # Else the same request delivered twice: GNU timeout, and a kill of the
        # process group, send the signal to the worker and to its group.

    previous = {signum: signal.signal(signum, stopping_now) for signum in signals}
    serving = asyncio.create_task(orchestrator.serve(concurrency=concurrency))
    # Said once, so that an operator sees the worker is up, as whom and on what: it is
    # silent afterwards while there is no work. (Before the log has answered: a log
    # that cannot be used is the next line.)
    log.info(
        "starting: serving %s on %s as %s (up to %d sagas at once)",
        ", ".join(sorted({saga.name for saga in sagas})),
        redact_url(store),
        orchestrator.owner,
        concurrency,
    )
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            serving.result()  # serve() ended by itself: say why
        log.info("stopping: giving the leases up (signal again to exit at once)")
    finally:
        stopping.cancel()
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        await orchestrator.close()
        for signum, handler in previous.items():
            if signal.getsignal(signum) is stopping_now:
                signal.signal(signum, handler)
