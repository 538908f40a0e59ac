"""The orchestrator: runs saga definitions, recording every transition in a saga log."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from sagakit.core.machine import (
    CompensationFailed,
    Finish,
    Outcome,
    RunStep,
    SagaRecord,
    SagaStarted,
    SagaState,
    StepFailed,
    compensation_completed,
    decide,
    intent_of,
    new_saga_started,
    replay,
    start,
    step_completed,
)
from sagakit.core.outcome import SagaOutcome, outcome_of
from sagakit.core.saga import NO_INPUT, PLAIN_RESULTS, SagaDefinition, new_step_context
from sagakit.errors import (
    DefinitionError,
    InvalidTransition,
    SagaError,
    SagaIdConflict,
    SagaLogConflict,
)
from sagakit.ports.saga_log import ImmediateSagaLog, SagaLog

__all__ = ["Orchestrator"]

log = logging.getLogger("sagakit.orchestrator")


# StepStarted(0) as the machine shares it: the very object that every
# definition's happy_path_log holds, which the driver compares by identity first.
_FIRST_INTENT = intent_of(RunStep(0))


class _RunnerCancelled(Exception):
    """Told to the callers waiting for a run whose own caller was cancelled."""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Orchestrator:
    """Runs sagas step by step and compensates the completed steps when one fails.

    Every transition is appended to the saga log *before* the work it announces,
    so a saga interrupted anywhere can be carried on from its log
    (:meth:`recover`). Running a saga id that the log already finished returns
    the recorded outcome and runs nothing; running one that is in flight in this
    orchestrator waits for that run's outcome. If the caller of that run is
    cancelled, a caller still waiting carries the saga on from its log.

    A compensation that raises leaves the saga ``failed`` (half undone): the
    remaining compensations do not run, since older steps may depend on the
    newer ones being undone first.
    """

    def __init__(self, log: SagaLog | str = "memory://") -> None:
        if isinstance(log, str):
            # Imported here: the orchestrator depends on the SagaLog port, and
            # reaches the adapters only to honour a URL (the composition root's job).
            from sagakit.adapters import open_saga_log

            log = open_saga_log(log)
        self._log: SagaLog = log
        self._append_now = self._log.append_now if isinstance(self._log, ImmediateSagaLog) else None
        self._volatile = self._append_now is not None and getattr(log, "volatile", False) is True
        # The sagas this orchestrator is running, and the callers waiting for
        # one of them (created only when a second caller comes).
        self._running: dict[str, SagaDefinition] = {}
        self._waiters: dict[str, list[asyncio.Future[SagaOutcome]]] = {}

    @property
    def log(self) -> SagaLog:
        return self._log

    async def run(
        self, saga: SagaDefinition, saga_id: str, data: Mapping[str, Any] | None = None
    ) -> SagaOutcome:
        """Run ``saga`` as ``saga_id`` with input ``data`` to its end, and report how it ended."""
        if not isinstance(saga, SagaDefinition):
            raise DefinitionError("saga", f"must be a SagaDefinition, got {type(saga).__name__}")
        if type(saga_id) is not str or not saga_id:
            raise DefinitionError("saga_id", f"must be a non-empty string, got {saga_id!r}")
        if not data:
            if data is not None and not isinstance(data, Mapping):
                raise DefinitionError("data", f"must be a mapping, got {type(data).__name__}")
            data = NO_INPUT
        elif type(data) is dict or isinstance(data, Mapping):
            # Copied: the log records the input, which the caller may go on changing.
            data = dict(data)
        else:
            raise DefinitionError("data", f"must be a mapping, got {type(data).__name__}")

        running = self._running
        if saga_id in running:
            return await self._join(saga, saga_id, running[saga_id], data)
        running[saga_id] = saga
        try:
            # Optimistic start: a new saga costs one append and no read; only a
            # saga id the log already holds is read back (to resume or report it).
            state, command = start(saga.compensable)
            first: list[SagaRecord] = [
                saga.no_input_start
                if data is NO_INPUT
                else new_saga_started((saga.name, saga.step_names, data)),
                _FIRST_INTENT,
            ]
            held: list[SagaRecord] | None = None
            try:
                if self._volatile:
                    # An empty append only checks that the saga id is new. The
                    # opening records wait with the rest (see ImmediateSagaLog.volatile).
                    self._append_now(saga_id, 0, ())  # type: ignore[misc]
                    held, version = first, 0
                elif self._append_now is not None:
                    self._append_now(saga_id, 0, first)
                    version = 2
                else:
                    await self._log.append(saga_id, 0, first)
                    version = 2
            except SagaLogConflict:
                outcome = await self._resume(saga, saga_id, await self._log.read(saga_id))
            else:
                outcome = await self._drive(saga, saga_id, data, state, command, version, {}, held)
        except BaseException as exc:
            for waiter in self._waiters.pop(saga_id, ()):
                if waiter.done():  # that caller was cancelled while it waited
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    # The caller that ran it was cancelled, not the ones waiting.
                    waiter.set_exception(_RunnerCancelled())
                else:
                    waiter.set_exception(exc)
            raise
        finally:
            del running[saga_id]
        if self._waiters:
            for waiter in self._waiters.pop(saga_id, ()):
                if not waiter.done():
                    waiter.set_result(outcome)
        return outcome

    async def _join(
        self,
        saga: SagaDefinition,
        saga_id: str,
        running: SagaDefinition,
        data: Mapping[str, Any],
    ) -> SagaOutcome:
        if running.fingerprint != saga.fingerprint:
            raise SagaIdConflict(saga_id, running.fingerprint, saga.fingerprint)
        waiter: asyncio.Future[SagaOutcome] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(saga_id, []).append(waiter)
        try:
            return await waiter
        except _RunnerCancelled:
            # Its log shows where it stopped: carry it on from there, for this
            # caller (and any other waiter, which joins this run in turn).
            log.info("saga %s: its runner was cancelled; carrying it on", saga_id)
            return await self.run(saga, saga_id, data)

    async def recover(self, sagas: Mapping[str, SagaDefinition]) -> list[SagaOutcome]:
        """Carry every unfinished saga in the log on to its end.

        ``sagas`` maps saga definition names to definitions; an unfinished saga
        whose definition is not given raises :class:`SagaError` naming it.
        """
        outcomes = []
        for saga_id in await self._log.unfinished():
            if saga_id in self._running:
                continue
            records = await self._log.read(saga_id)
            if not records:  # listed, then gone (another process finished it): nothing to do
                continue
            started = records[0]
            if type(started) is not SagaStarted:
                raise SagaError(saga_id, f"log opens with {started!r}, not SagaStarted")
            saga = sagas.get(started.saga)
            if saga is None:
                raise SagaError(saga_id, f"no definition given for saga {started.saga!r}")
            outcomes.append(await self.run(saga, saga_id, started.data))
        return outcomes

    async def _resume(
        self, saga: SagaDefinition, saga_id: str, records: list[SagaRecord]
    ) -> SagaOutcome:
        started = records[0]
        if (
            type(started) is not SagaStarted
            or started.saga != saga.name
            or tuple(started.steps) != saga.step_names
        ):
            recorded = (
                f"{started.saga}({', '.join(started.steps)})"
                if type(started) is SagaStarted
                else repr(started)
            )
            raise SagaIdConflict(saga_id, recorded, saga.fingerprint)
        try:
            state, command, results = replay(saga.compensable, records)[1:]
        except InvalidTransition as exc:
            raise SagaError(saga_id, f"its log cannot be replayed: {exc}") from exc
        if state.status.is_final:
            return outcome_of(saga_id, saga.step_names, state, results)
        # Interrupted: announce the pending command again, then carry on from it.
        version = len(records)
        await self._log.append(saga_id, version, (intent_of(command),))
        log.info("resuming saga %s at %s", saga_id, command)
        held: list[SagaRecord] | None = [] if self._volatile else None
        return await self._drive(
            saga, saga_id, started.data, state, command, version + 1, results, held
        )

    async def _drive(
        self,
        saga: SagaDefinition,
        saga_id: str,
        data: Mapping[str, Any],
        state: SagaState,
        command: Any,
        version: int,
        results: dict[str, Any],
        held: list[SagaRecord] | None,
    ) -> SagaOutcome:
        """Carry the saga on from ``command``; ``version`` records are written.

        ``held``: records not written yet, which only a volatile log lets wait,
        and only until the next await (see ImmediateSagaLog.volatile); None
        when each transition is written at once.
        """
        actions, compensations = saga.actions, saga.compensations
        compensable, forward = saga.compensable, saga.forward
        append, append_now = self._log.append, self._append_now
        try:
            while (kind := type(command)) is not Finish:
                index = command[0]
                # RunCompensation is only ever decided for a step that has one.
                name, call, is_async = (actions if kind is RunStep else compensations)[index]
                ctx = new_step_context((saga_id, name, data, results, 1))
                outcome: Outcome
                # ok: whether the call returned; value: what it returned, or raised.
                try:
                    value, ok = call(ctx), True  # an async callable: nothing ran yet
                except Exception as exc:
                    value, ok = exc, False
                # None first: what a synchronous step most often returns.
                if (
                    ok
                    and value is not None
                    and (
                        is_async
                        or (type(value) not in PLAIN_RESULTS and hasattr(type(value), "__await__"))
                    )
                ):
                    if held:
                        version, held = self._write_held(saga_id, version, held, value)
                    ok, value = await _settled(value)
                if kind is RunStep and ok:
                    results[name] = value
                    # The commonest transition, the same for every saga of this
                    # definition: decide's answer, kept by the definition.
                    outcome, state, command, intent = forward[index]
                    if value is not None:
                        outcome = step_completed(index, value)
                else:
                    if kind is RunStep:
                        outcome = _step_failed(saga_id, name, index, value)
                    elif ok:
                        outcome = compensation_completed(index)
                    else:
                        outcome = _compensation_failed(saga_id, name, index, value)
                    value = None  # an exception's traceback would hold this frame
                    state, command = decide(compensable, state, outcome)
                    intent = intent_of(command)
                if held is not None:
                    held += (outcome, intent)
                elif append_now is not None:
                    append_now(saga_id, version, (outcome, intent))
                    version += 2
                else:
                    await append(saga_id, version, (outcome, intent))
                    version += 2
        except BaseException:
            # Stopped between two awaits (KeyboardInterrupt, say): the log must
            # still show what was announced, as it would have without holding.
            if held:
                try:
                    self._write_held(saga_id, version, held, None)
                except Exception:
                    log.exception("saga %s: cannot write its last transitions", saga_id)
            raise
        if held:
            records: Sequence[SagaRecord] = held
            happy = saga.happy_path_log
            if version == 0 and len(held) == len(happy) and tuple(held) == happy:
                # The log every saga on the happy path has: the definition's copy,
                # so that a log keeping records as given keeps it once for them all.
                records = happy
            append_now(saga_id, version, records)  # type: ignore[misc]
        return outcome_of(saga_id, saga.step_names, state, results)

    def _write_held(
        self, saga_id: str, version: int, held: list[SagaRecord], pending: Any
    ) -> tuple[int, list[SagaRecord]]:
        """Write the held records (before an await); return the new version and an empty hold."""
        try:
            self._append_now(saga_id, version, held)  # type: ignore[misc]
        except BaseException:
            close = getattr(pending, "close", None)
            if close is not None:  # a coroutine that will never be awaited now
                close()
            raise
        return version + len(held), []


async def _settled(awaitable: Any) -> tuple[bool, Any]:
    """Await what a step handed back: (True, its result), or (False, what it raised)."""
    try:
        return True, await awaitable
    except Exception as exc:
        return False, exc


def _step_failed(saga_id: str, step: str, index: int, exc: Exception) -> StepFailed:
    log.info("saga %s: step %s failed: %r", saga_id, step, exc)
    return StepFailed(index, _describe(exc))


def _compensation_failed(saga_id: str, step: str, index: int, exc: Exception) -> CompensationFailed:
    error = _describe(exc)
    log.error("saga %s: compensation of %s failed: %s", saga_id, step, error)
    return CompensationFailed(index, error)
