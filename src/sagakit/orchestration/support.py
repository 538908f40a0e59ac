"""What the orchestrator keeps beside its sagas: who is waiting, how to compare inputs,
and how a logged saga is read back."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from sagakit.core.machine import Plan, SagaState, replay
from sagakit.core.outcome import SagaOutcome, outcome_of
from sagakit.core.records import (
    CompensationStarted,
    SagaRecord,
    SagaStarted,
    check_id,
    from_json,
    to_json,
)
from sagakit.core.saga import NO_INPUT, SagaDefinition, fingerprint
from sagakit.errors import DefinitionError, InvalidTransition, SagaError, SagaIdConflict
from sagakit.ports.saga_log import Claim, SagaLog

log = logging.getLogger("sagakit.orchestrator")

__all__ = [
    "MIN_LEASE_TTL",
    "Recovered",
    "Run",
    "RunnerCancelled",
    "check_count",
    "check_seconds",
    "checked_input",
    "checked_options",
    "default_owner",
    "definition_of",
    "definitions_in",
    "inferred_plan",
    "logged_outcome",
    "replayed",
    "saga_name",
    "same_input",
    "settle",
    "shown",
    "wait_for_run",
    "wanted_status",
]


MIN_LEASE_TTL = 0.1  # seconds; ``sagakit worker --lease-ttl`` has the same floor


class RunnerCancelled(Exception):
    """Told to the callers waiting for a run whose own caller was cancelled."""


class Recovered(list[SagaOutcome]):
    """What :meth:`Orchestrator.recover` carried on: the outcomes, in the order they ended.

    ``missing`` maps the id of each unfinished saga left alone, because this
    orchestrator has no definition of that name, to the name; ``errors`` maps
    the id of each saga that could not be carried on to why.
    """

    def __init__(self) -> None:
        super().__init__()
        self.missing: dict[str, str] = {}
        self.errors: dict[str, BaseException] = {}


class Run(NamedTuple):
    """A saga this orchestrator is driving (the callers waiting for it are kept apart:
    most runs have none)."""

    saga: SagaDefinition
    data: Mapping[str, Any]


def settle(
    waiters: list[asyncio.Future[SagaOutcome]], outcome: SagaOutcome | BaseException
) -> None:
    """Hand the callers waiting for a run its outcome, or the exception it ended with."""
    for waiter in waiters:
        if waiter.done():  # that caller was cancelled while it waited
            continue
        if isinstance(outcome, asyncio.CancelledError):
            # The caller that ran it was cancelled, not the ones waiting.
            waiter.set_exception(RunnerCancelled())
        elif isinstance(outcome, BaseException):
            waiter.set_exception(outcome)
        else:
            waiter.set_result(outcome)


async def wait_for_run(
    waiters: dict[str, list[asyncio.Future[SagaOutcome]]], saga_id: str
) -> SagaOutcome:
    """Wait, among ``waiters``, for the outcome of the run of ``saga_id`` under way.

    A caller that stops waiting (cancelled, timed out) is struck off at once: one
    asking again and again while a long saga runs must not pile up.
    """
    waiter: asyncio.Future[SagaOutcome] = asyncio.get_running_loop().create_future()
    waiting = waiters.setdefault(saga_id, [])
    waiting.append(waiter)
    try:
        return await waiter
    finally:
        if waiter.cancelled() and waiters.get(saga_id) is waiting:
            waiting.remove(waiter)
            if not waiting:
                del waiters[saga_id]


def checked_input(
    saga: SagaDefinition, saga_id: str, data: Mapping[str, Any] | None
) -> Mapping[str, Any]:
    """The saga's input as it will be recorded, once the arguments are checked."""
    if not isinstance(saga, SagaDefinition):
        raise DefinitionError("saga", f"must be a SagaDefinition, got {type(saga).__name__}")
    if type(saga_id) is not str or not saga_id:
        raise DefinitionError("saga_id", f"must be a non-empty string, got {saga_id!r}")
    if not data:
        if data is not None and not isinstance(data, Mapping):
            raise DefinitionError("data", f"must be a mapping, got {type(data).__name__}")
        return NO_INPUT
    if not isinstance(data, Mapping):
        raise DefinitionError("data", f"must be a mapping, got {type(data).__name__}")
    # Copied all the way down (a JSON round trip, which checks it too): the log
    # records the input and the steps read it, and the caller may go on changing
    # it, or the lists and dicts inside it.
    try:
        copy: dict[str, Any] = from_json(to_json(dict(data)))
    except (TypeError, ValueError) as exc:
        raise SagaError(saga_id, f"its input is not a JSON value: {exc}") from exc
    return copy


def definitions_in(sagas: object) -> list[SagaDefinition]:
    """The definitions in ``sagas`` (an iterable of them); DefinitionError naming
    ``sagas`` for anything else, one definition on its own included."""
    if isinstance(sagas, str | bytes | SagaDefinition) or not isinstance(sagas, Iterable):
        problem = f"must be an iterable of SagaDefinitions, got {type(sagas).__name__}"
        raise DefinitionError("sagas", problem)
    found = list(sagas)
    for saga in found:
        if not isinstance(saga, SagaDefinition):
            raise DefinitionError("sagas", f"must be SagaDefinitions, got {type(saga).__name__}")
    return found


def wanted_status(status: Any) -> Any:
    """The ``status`` of a listing, for the log: one status (a SagaStatus or its text) as
    it is, any other collection once as a list (a generator could not be read twice), and
    anything else as it is, for the log to refuse with a DefinitionError."""
    if isinstance(status, Iterable) and not isinstance(status, str):
        return list(status)
    return status


def check_count(field: str, value: object, *, least: int) -> int:
    """A whole number at least ``least``; DefinitionError naming ``field``."""
    if type(value) is not int or value < least:
        raise DefinitionError(field, f"must be a whole number >= {least}, not {value!r}")
    return value


def checked_options(
    log: object, owner: str | None, lease_ttl: float, retry_for: float, poll_interval: float
) -> tuple[float, float, float]:
    """The Orchestrator's ``lease_ttl``, ``retry_for`` and ``poll_interval``, checked with
    its ``log`` and ``owner``; DefinitionError naming the one refused."""
    # Renewed every third of its life, each renewal a round trip to the log (a synced
    # commit): a shorter lease would expire under a worker that is alive and well.
    lease_ttl = check_seconds("lease_ttl", lease_ttl, minimum=MIN_LEASE_TTL)
    if owner is not None:
        check_id("owner", owner)  # what every saga log can keep
    if not isinstance(log, str | SagaLog):  # None, say, from an unset variable
        raise DefinitionError("log", f"must be a saga log or its URL, not {log!r:.100}")
    # NaN would retry for ever; a poll interval of 0 would poll in a busy loop.
    return (
        lease_ttl,
        check_seconds("retry_for", retry_for, minimum=0.0),
        check_seconds("poll_interval", poll_interval, minimum=0.001),
    )


def check_seconds(field: str, value: object, *, minimum: float) -> float:
    """A number of seconds, finite and at least ``minimum``; DefinitionError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DefinitionError(field, f"must be a number of seconds, not {value!r}")
    if not minimum <= value < math.inf:  # NaN too
        problem = f"must be at least {minimum:g} seconds and finite, not {value!r}"
        raise DefinitionError(field, problem)
    return float(value)


def saga_name(claim: Claim) -> str:
    """The name of the definition a claimed saga was started under ("?" for a log
    that does not open with SagaStarted)."""
    started = claim.records[0] if claim.records else None
    return started.saga if type(started) is SagaStarted else "?"


def definition_of(claim: Claim, definitions: Mapping[str, SagaDefinition]) -> SagaDefinition | None:
    """The definition a claimed saga runs under; None, logged, when this worker lacks it
    (recover() and serve() then leave the saga to others, each in its own way)."""
    name = saga_name(claim)
    saga = definitions.get(name)
    if saga is None:
        log.warning(
            "saga %s: no definition of %r here; left to others", claim.journal.saga_id, name
        )
    return saga


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def same_input(recorded: Mapping[str, Any], requested: Mapping[str, Any]) -> bool:
    if recorded == requested:
        return True
    try:  # a durable log hands back JSON: a tuple given is a list recorded
        return bool(from_json(to_json(dict(requested))) == from_json(to_json(dict(recorded))))
    except (TypeError, ValueError):
        return False


def shown(data: Mapping[str, Any]) -> str:
    try:
        text = to_json(dict(data)).decode()
    except (TypeError, ValueError):
        text = repr(data)
    return text if len(text) <= 200 else text[:197] + "..."


def inferred_plan(started: SagaStarted, records: Iterable[SagaRecord]) -> Plan:
    """The plan of a logged saga whose definition is not at hand (for reporting it):
    the steps it compensated are the ones that have a compensation."""
    undone = {r.step for r in records if type(r) is CompensationStarted}
    return Plan(started.saga, started.steps, tuple(i in undone for i in range(len(started.steps))))


def replayed(
    saga: SagaDefinition,
    saga_id: str,
    data: Mapping[str, Any] | None,
    records: list[SagaRecord],
) -> tuple[SagaStarted, SagaState, dict[str, Any]]:
    """A logged saga rebuilt for ``saga``: its opening, state and results.

    Raises SagaIdConflict when the log holds another definition, or (``data``
    given) another input; SagaError when the log cannot be replayed.
    """
    started = records[0]
    if type(started) is not SagaStarted:
        raise SagaError(saga_id, f"log opens with {started!r}, not SagaStarted")
    if started.saga != saga.name or tuple(started.steps) != saga.step_names:
        raise SagaIdConflict(saga_id, fingerprint(started.saga, started.steps), saga.fingerprint)
    if data is not None and not same_input(started.data, data):
        raise SagaIdConflict(
            saga_id,
            f"{saga.fingerprint} with input {shown(started.data)}",
            f"{saga.fingerprint} with input {shown(data)}",
        )
    try:
        _, state, results = replay(saga.plan, records)
    except InvalidTransition as exc:
        raise SagaError(saga_id, f"its log cannot be replayed: {exc}") from exc
    return started, state, results


def logged_outcome(
    saga_id: str, records: list[SagaRecord], definitions: Mapping[str, SagaDefinition]
) -> SagaOutcome:
    """How far a logged saga got, with or without its definition at hand."""
    started = records[0]
    if type(started) is not SagaStarted:
        raise SagaError(saga_id, f"log opens with {started!r}, not SagaStarted")
    saga = definitions.get(started.saga)
    if saga is not None and saga.step_names == tuple(started.steps):
        plan = saga.plan
    else:
        plan = inferred_plan(started, records)
    try:
        _, state, results = replay(plan, records)
    except InvalidTransition as exc:
        raise SagaError(saga_id, f"its log cannot be replayed: {exc}") from exc
    return outcome_of(saga_id, plan, state, results)
