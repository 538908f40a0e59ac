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
from enum import StrEnum
from typing import Any, ClassVar, NamedTuple

from sagakit.errors import DefinitionError, SchemaMismatch

__all__ = [
    "MAX_ID_BYTES",
    "RECORD_KINDS",
    "CompensationCompleted",
    "CompensationFailed",
    "CompensationStarted",
    "OfItsKind",
    "SagaFinished",
    "SagaRecord",
    "SagaStarted",
    "SagaStatus",
    "StepCompleted",
    "StepFailed",
    "StepStarted",
    "check_id",
    "check_json",
    "decode_record",
    "encode_record",
    "from_json",
    "status_after",
    "to_json",
    "valid_id",
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
        data = _dumps(value)
    except TypeError:
        raise
    except Exception as exc:  # orjson.JSONEncodeError is a TypeError; be sure all the same
        raise TypeError(str(exc)) from exc
    # orjson writes NaN and the infinities as null: a value stored would come
    # back changed. Walked only when the output has a null at all.
    if b"null" in data and _has_non_finite(value):
        raise ValueError("NaN and Infinity are not JSON values")
    return data


def _has_non_finite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is float:
            if item != item or item in (float("inf"), float("-inf")):
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


def from_json(data: bytes | str) -> Any:
    return _loads(data)


_SCALARS = frozenset({type(None), str, bool})


def check_json(value: Any) -> None:
    """Raise TypeError unless ``value`` is a JSON value (see :func:`to_json`).

    The common scalars are accepted without encoding: every step result goes
    through here.
    """
    kind = type(value)
    if kind in _SCALARS or (kind is int and -(2**63) <= value < 2**64):
        return
    to_json(value)


# --- identifiers ----------------------------------------------------------------------
# Saga ids, lease owners and definition names are keys in every durable backend
# (PostgreSQL's primary keys and indexes cap them; NUL cannot be stored in its
# text). One rule for every backend, memory included, so that code that runs on
# memory:// runs on a database.

MAX_ID_BYTES = 1024


def valid_id(value: object) -> bool:
    """Whether ``value`` is non-empty text without NUL, at most MAX_ID_BYTES in UTF-8."""
    if type(value) is str and value.isascii():  # the common case, without encoding it
        return 0 < len(value) <= MAX_ID_BYTES and "\x00" not in value
    if not isinstance(value, str) or not value or "\x00" in value:
        return False
    try:
        return len(value.encode()) <= MAX_ID_BYTES
    except UnicodeEncodeError:  # a lone surrogate
        return False


def check_id(field: str, value: object) -> None:
    """DefinitionError naming ``field`` unless :func:`valid_id`."""
    if not valid_id(value):
        raise DefinitionError(
            field,
            f"must be non-empty Unicode text without NUL, at most {MAX_ID_BYTES} bytes"
            f" in UTF-8, not {value!r:.100}",
        )


# --- records ------------------------------------------------------------------------
# Each kind is a NamedTuple (cheap to build: a saga writes several per step)
# under a subclass that adds its KIND and makes it equal only to records of its
# own kind (plain NamedTuples compare as tuples: StepStarted(1) would equal
# CompensationStarted(1)). Immutable, matched with ``match``.


class OfItsKind:
    """Equality and hashing by kind and fields (a mixin for NamedTuple kinds)."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and _tuple_eq(self, other)

    def __ne__(self, other: object) -> bool:
        return not (type(self) is type(other) and _tuple_eq(self, other))

    # The tuple's own hash, as a C slot: a record of one kind and one of another with
    # the same fields share it, and still differ.
    __hash__ = tuple.__hash__


_tuple_eq: Callable[[object, object], bool] = tuple.__eq__  # type: ignore[assignment]


class _SagaStarted(NamedTuple):
    saga: str  # the definition's name
    steps: tuple[str, ...]  # its step names, which the log must match on resume
    data: Mapping[str, Any]  # the saga's input


class SagaStarted(OfItsKind, _SagaStarted):
    __slots__ = ()
    KIND: ClassVar[str] = "saga_started"


class _StepStarted(NamedTuple):
    step: int
    attempt: int = 1


class StepStarted(OfItsKind, _StepStarted):
    """The intent: step ``step``'s action is about to run, for the ``attempt``-th time."""

    __slots__ = ()
    KIND: ClassVar[str] = "step_started"


class _StepCompleted(NamedTuple):
    step: int
    result: Any = None


class StepCompleted(OfItsKind, _StepCompleted):
    __slots__ = ()
    KIND: ClassVar[str] = "step_completed"


class _StepFailed(NamedTuple):
    step: int
    error: str
    attempt: int = 1


class StepFailed(OfItsKind, _StepFailed):
    __slots__ = ()
    KIND: ClassVar[str] = "step_failed"


class _CompensationStarted(NamedTuple):
    step: int
    attempt: int = 1


class CompensationStarted(OfItsKind, _CompensationStarted):
    __slots__ = ()
    KIND: ClassVar[str] = "compensation_started"


class _CompensationCompleted(NamedTuple):
    step: int


class CompensationCompleted(OfItsKind, _CompensationCompleted):
    __slots__ = ()
    KIND: ClassVar[str] = "compensation_completed"


class _CompensationFailed(NamedTuple):
    step: int
    error: str
    attempt: int = 1


class CompensationFailed(OfItsKind, _CompensationFailed):
    __slots__ = ()
    KIND: ClassVar[str] = "compensation_failed"


class _SagaFinished(NamedTuple):
    status: SagaStatus


class SagaFinished(OfItsKind, _SagaFinished):
    __slots__ = ()
    KIND: ClassVar[str] = "saga_finished"


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
            # A read-only input (sagakit.core.saga.NO_INPUT) is a mapping, not a dict.
            data = data if type(data) is dict else dict(data)
            fields: dict[str, Any] = {"saga": saga, "steps": list(steps), "data": data}
        case StepCompleted(step, result):
            fields = {"step": step, "result": result}
        case SagaFinished(status):
            fields = {"status": str(status)}
        case _:
            fields = record._asdict()
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
    try:
        fields = from_json(payload)
        if cls is SagaStarted:
            return SagaStarted(fields["saga"], tuple(fields["steps"]), fields["data"])
        if cls is SagaFinished:
            return SagaFinished(SagaStatus(fields["status"]))
        record: SagaRecord = cls(**fields)
    except (ValueError, TypeError, KeyError) as exc:
        # Edited by hand, or damaged: refused like a newer record (claim_next passes
        # over it), never the decoder's own error.
        raise SchemaMismatch(
            "saga log", f"a {kind!r} record is damaged: its payload does not fit ({exc!r:.200})"
        ) from exc
    return record
