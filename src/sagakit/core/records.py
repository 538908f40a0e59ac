"""Saga log records: versioned data, and the one codec that turns them into rows and back.

A saga's log is the sequence of these records; replaying it rebuilds the
saga's state exactly (attempts included). Each record kind has a tag
(``KIND``) and a schema version; :func:`encode_record` gives a backend
``(kind, version, payload)`` to store, and :func:`decode_record` refuses a
version newer than this sagakit knows, so an old worker never misreads a new
log.

Saga input and step results are JSON values on every backend, the in-memory one
included (:func:`to_json` is the rule), so code that works on ``memory://``
works on PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from sagakit.errors import SchemaMismatch

__all__ = [
    "RECORD_KINDS",
    "CompensationCompleted",
    "CompensationFailed",
    "CompensationStarted",
    "SagaFinished",
    "SagaRecord",
    "SagaStarted",
    "SagaStatus",
    "StepCompleted",
    "StepFailed",
    "StepStarted",
    "decode_record",
    "encode_record",
    "from_json",
    "status_after",
    "to_json",
]


class SagaStatus(StrEnum):
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    # A compensation failed: the saga is stuck half-undone and needs an operator.
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED})


# --- the JSON rule ------------------------------------------------------------------

_dumps: Callable[[Any], bytes]
_loads: Callable[[bytes | str], Any]
try:  # orjson where installed; the node must still run on a bare Python.
    import orjson

    _dumps = orjson.dumps
    _loads = orjson.loads
except ImportError:  # pragma: no cover - exercised by the node on python3 -S
    _encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    def _dumps(value: Any) -> bytes:
        return _encoder.encode(value).encode()

    _loads = json.loads


def to_json(value: Any) -> bytes:
    """``value`` as JSON bytes; TypeError or ValueError when it is not a JSON value
    (a set, an object, NaN, a non-string key, an integer past 64 bits)."""
    try:
        return _dumps(value)
    except TypeError:
        raise
    except Exception as exc:  # orjson.JSONEncodeError is a TypeError; be sure all the same
        raise TypeError(str(exc)) from exc


def from_json(data: bytes | str) -> Any:
    return _loads(data)


# --- records ------------------------------------------------------------------------
# Frozen dataclasses: compared by kind and fields, matched with ``match``.


@dataclass(frozen=True, slots=True)
class SagaStarted:
    KIND: ClassVar[str] = "saga_started"
    saga: str  # the definition's name
    steps: tuple[str, ...]  # its step names, which the log must match on resume
    data: Mapping[str, Any]  # the saga's input


@dataclass(frozen=True, slots=True)
class StepStarted:
    """The intent: step ``step``'s action is about to run, for the ``attempt``-th time."""

    KIND: ClassVar[str] = "step_started"
    step: int
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class StepCompleted:
    KIND: ClassVar[str] = "step_completed"
    step: int
    result: Any = None


@dataclass(frozen=True, slots=True)
class StepFailed:
    KIND: ClassVar[str] = "step_failed"
    step: int
    error: str
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class CompensationStarted:
    KIND: ClassVar[str] = "compensation_started"
    step: int
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class CompensationCompleted:
    KIND: ClassVar[str] = "compensation_completed"
    step: int


@dataclass(frozen=True, slots=True)
class CompensationFailed:
    KIND: ClassVar[str] = "compensation_failed"
    step: int
    error: str
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class SagaFinished:
    KIND: ClassVar[str] = "saga_finished"
    status: SagaStatus


SagaRecord = (
    SagaStarted
    | StepStarted
    | StepCompleted
    | StepFailed
    | CompensationStarted
    | CompensationCompleted
    | CompensationFailed
    | SagaFinished
)

# The schema version this sagakit writes for each kind, and the newest it reads.
RECORD_KINDS: dict[str, tuple[type[Any], int]] = {
    kind.KIND: (kind, 1)
    for kind in (
        SagaStarted,
        StepStarted,
        StepCompleted,
        StepFailed,
        CompensationStarted,
        CompensationCompleted,
        CompensationFailed,
        SagaFinished,
    )
}


def status_after(record: SagaRecord) -> SagaStatus | None:
    """The saga's status once ``record`` is in its log, or None when it does not change it.

    What a backend keeps beside the records, so that listing sagas by status
    needs no replay.
    """
    match record:
        case SagaStarted():
            return SagaStatus.RUNNING
        case StepFailed() | CompensationStarted():
            return SagaStatus.COMPENSATING
        case SagaFinished(status=status):
            return status
    return None


# --- codec --------------------------------------------------------------------------


def encode_record(record: SagaRecord) -> tuple[str, int, bytes]:
    """``(kind, schema version, JSON payload)``: what a backend stores for ``record``.

    Raises TypeError when the saga's input or a step's result is not a JSON value.
    """
    kind = record.KIND
    match record:
        case SagaStarted(saga, steps, data):
            fields: dict[str, Any] = {"saga": saga, "steps": list(steps), "data": data}
        case StepCompleted(step, result):
            fields = {"step": step, "result": result}
        case SagaFinished(status):
            fields = {"status": str(status)}
        case _:
            fields = {name: getattr(record, name) for name in record.__dataclass_fields__}
    return kind, RECORD_KINDS[kind][1], to_json(fields)


def decode_record(kind: str, version: int, payload: bytes | str) -> SagaRecord:
    """The record that :func:`encode_record` stored; refuses a kind or version it does not know."""
    known = RECORD_KINDS.get(kind)
    if known is None:
        raise SchemaMismatch(
            "saga log", f"unknown record kind {kind!r}: written by a newer sagakit?"
        )
    cls, newest = known
    if version > newest:
        raise SchemaMismatch(
            "saga log",
            f"record kind {kind!r} has schema version {version}; this sagakit reads up to {newest}",
        )
    fields = from_json(payload)
    if cls is SagaStarted:
        return SagaStarted(fields["saga"], tuple(fields["steps"]), fields["data"])
    if cls is SagaFinished:
        return SagaFinished(SagaStatus(fields["status"]))
    record: SagaRecord = cls(**fields)
    return record
