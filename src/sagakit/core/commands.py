"""The state machine's events (what happened to a saga) and commands (what the driver
does next): small immutable values, each equal only to values of its own kind.

Defined here and named in :mod:`sagakit.core.machine`, which is where they are used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from sagakit.core.records import OfItsKind, SagaStatus

__all__ = [
    "Begin",
    "Command",
    "CompensationRaised",
    "CompensationSucceeded",
    "Event",
    "Finish",
    "Resume",
    "RunCompensation",
    "RunStep",
    "StepRaised",
    "StepSucceeded",
]


# --- events: what happened -----------------------------------------------------------


class _Begin(NamedTuple):
    data: Mapping[str, Any]


class Begin(OfItsKind, _Begin):
    """A new saga, with its input."""

    __slots__ = ()


class _Resume(NamedTuple):
    pass


class Resume(OfItsKind, _Resume):
    """A saga taken over from its log: announce again what was in flight, or go on."""

    __slots__ = ()


class _StepSucceeded(NamedTuple):
    step: int
    result: Any = None


class StepSucceeded(OfItsKind, _StepSucceeded):
    __slots__ = ()


class _StepRaised(NamedTuple):
    step: int
    error: str


class StepRaised(OfItsKind, _StepRaised):
    __slots__ = ()


class _CompensationSucceeded(NamedTuple):
    step: int


class CompensationSucceeded(OfItsKind, _CompensationSucceeded):
    __slots__ = ()


class _CompensationRaised(NamedTuple):
    step: int
    error: str


class CompensationRaised(OfItsKind, _CompensationRaised):
    __slots__ = ()


Event = Begin | Resume | StepSucceeded | StepRaised | CompensationSucceeded | CompensationRaised


# --- commands: what the driver does next ---------------------------------------------


class _RunStep(NamedTuple):
    step: int
    attempt: int = 1


class RunStep(OfItsKind, _RunStep):
    __slots__ = ()


class _RunCompensation(NamedTuple):
    step: int
    attempt: int = 1


class RunCompensation(OfItsKind, _RunCompensation):
    __slots__ = ()


class _Finish(NamedTuple):
    status: SagaStatus


class Finish(OfItsKind, _Finish):
    __slots__ = ()


Command = RunStep | RunCompensation | Finish
