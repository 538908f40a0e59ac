"""Saga definitions: ordered steps, each an action with an optional compensation.

A definition is data plus references to callables; it does no I/O itself. The
names of the saga and its steps, the saga's input and every step's result are
plain data, so that a saga log can record them and a later process can resume.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from inspect import iscoroutinefunction
from types import MappingProxyType
from typing import Any, NamedTuple

from sagakit.core.machine import (
    Advance,
    SagaRecord,
    SagaStarted,
    forward_path,
    intent_of,
    new_saga_started,
    start,
)
from sagakit.errors import DefinitionError

__all__ = ["NO_INPUT", "SagaDefinition", "Step", "StepAction", "StepContext"]

# The input of every saga that has none: one shared, read-only mapping, since a
# saga log may keep each saga's input for as long as the process lives.
NO_INPUT: Mapping[str, Any] = MappingProxyType({})


class StepContext(NamedTuple):
    """What a step's action or compensation is given.

    ``data`` is the saga's input as the log recorded it: read it, never change
    it (an empty input is one shared, read-only mapping). ``results`` maps the
    names of the steps completed so far to their results; a compensation finds
    its own step's result as ``ctx.result``.
    """

    saga_id: str
    step: str
    data: Mapping[str, Any]
    results: Mapping[str, Any]
    attempt: int = 1

    @property
    def result(self) -> Any:
        """The result of this context's step (meaningful in a compensation)."""
        return self.results.get(self.step)


# One is built per step; see machine._new_state for why not by calling the class.
new_step_context: Callable[
    [tuple[str, str, Mapping[str, Any], Mapping[str, Any], int]], StepContext
] = partial(tuple.__new__, StepContext)


# An action or compensation may be a coroutine function or a plain function.
StepAction = Callable[[StepContext], Awaitable[Any] | Any]


def _check_name(value: object, field_name: str) -> str:
    if not isinstance(value, str):
        raise DefinitionError(field_name, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DefinitionError(field_name, "must not be empty")
    return value


@dataclass(frozen=True, slots=True)
class Step:
    """One local transaction of a saga and, optionally, the action that undoes it.

    A step without a compensation is one that needs no undoing (a read, a
    notification) or that sits after the saga's pivot and so never needs it.
    """

    name: str
    action: StepAction
    compensation: StepAction | None = None
    # Whether action / compensation are coroutine functions, found once here so
    # that the orchestrator need not ask every result whether it is awaitable.
    action_is_async: bool = field(init=False, repr=False, compare=False)
    compensation_is_async: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_name(self.name, "name")
        if not callable(self.action):
            raise DefinitionError("action", f"step {self.name!r}: must be callable")
        if self.compensation is not None and not callable(self.compensation):
            raise DefinitionError("compensation", f"step {self.name!r}: must be callable or None")
        object.__setattr__(self, "action_is_async", iscoroutinefunction(self.action))
        object.__setattr__(self, "compensation_is_async", iscoroutinefunction(self.compensation))


# Results that are certainly not awaitable, checked by type before the slower
# attribute lookup for __await__ (which a plain function may still return).
PLAIN_RESULTS = frozenset({type(None), dict, list, tuple, str, int, float, bool, bytes})


# What a driver needs to call a step's action or compensation: the step's name,
# the callable (None: no compensation) and whether it is a coroutine function.
Call = tuple[str, StepAction | None, bool]


@dataclass(frozen=True, slots=True, init=False)
class SagaDefinition:
    """A named, ordered list of steps. Step names are unique within a saga."""

    name: str
    steps: tuple[Step, ...]
    # Derived once here so the state machine and the orchestrator's hot loop
    # never recompute them per saga.
    step_names: tuple[str, ...] = field(repr=False, compare=False)
    compensable: tuple[bool, ...] = field(repr=False, compare=False)
    forward: tuple[Advance, ...] = field(repr=False, compare=False)
    actions: tuple[Call, ...] = field(repr=False, compare=False)
    compensations: tuple[Call, ...] = field(repr=False, compare=False)
    # The opening record of a saga with no input, and the whole log of one whose
    # steps then all complete with no result: the same for every such saga, so
    # built once here, and kept once by a log that keeps records as given.
    no_input_start: SagaStarted = field(repr=False, compare=False)
    happy_path_log: tuple[SagaRecord, ...] = field(repr=False, compare=False)

    def __init__(self, name: str, steps: Iterable[Step]) -> None:
        _check_name(name, "name")
        if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Iterable):
            raise DefinitionError("steps", f"must be an iterable of Step, got {steps!r}")
        steps = tuple(steps)
        if not steps:
            raise DefinitionError("steps", f"saga {name!r} needs at least one step")
        seen: set[str] = set()
        for i, step in enumerate(steps):
            if not isinstance(step, Step):
                raise DefinitionError(f"steps[{i}]", f"must be a Step, got {type(step).__name__}")
            if step.name in seen:
                raise DefinitionError(f"steps[{i}].name", f"duplicate step name {step.name!r}")
            seen.add(step.name)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "step_names", tuple(s.name for s in steps))
        object.__setattr__(self, "compensable", tuple(s.compensation is not None for s in steps))
        object.__setattr__(self, "forward", forward_path(self.compensable))
        object.__setattr__(
            self, "actions", tuple((s.name, s.action, s.action_is_async) for s in steps)
        )
        object.__setattr__(
            self,
            "compensations",
            tuple((s.name, s.compensation, s.compensation_is_async) for s in steps),
        )
        opening = new_saga_started((name, self.step_names, NO_INPUT))
        happy: list[SagaRecord] = [opening, intent_of(start(self.compensable)[1])]
        for completed, _, _, intent in self.forward:
            happy += (completed, intent)
        object.__setattr__(self, "no_input_start", opening)
        object.__setattr__(self, "happy_path_log", tuple(happy))

    @property
    def fingerprint(self) -> str:
        """What identifies the definition in a saga log: its name and step names."""
        return f"{self.name}({', '.join(self.step_names)})"
