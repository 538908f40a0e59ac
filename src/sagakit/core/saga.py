"""Saga definitions: ordered steps, each an action with an optional compensation.

A definition is data plus references to callables; it does no I/O itself. The
names of the saga and its steps, the saga's input and every step's result are
plain data, so that a saga log can record them and a later process can resume.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from inspect import iscoroutinefunction
from types import MappingProxyType
from typing import Any, NamedTuple

from sagakit.core.machine import Plan
from sagakit.core.records import check_id, to_json
from sagakit.errors import DefinitionError

__all__ = ["NO_INPUT", "SagaDefinition", "Step", "StepAction", "StepContext", "fingerprint"]

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
    attempt: int = 1  # runs of this action (or compensation), re-runs after a crash included
    compensating: bool = False  # True in a compensation

    @property
    def result(self) -> Any:
        """The result of this context's step (meaningful in a compensation)."""
        return self.results.get(self.step)

    @property
    def idempotency_key(self) -> str:
        """A stable key for this step's action (or compensation) in this saga.

        The same on every run of it, re-runs after a crash included, and
        different for any other saga id, step, or action versus compensation:
        hand it to a downstream service so that the effect happens once. A
        SHA-256 in hex (64 characters) of the three, unambiguously encoded.
        """
        kind = "compensation" if self.compensating else "action"
        return hashlib.sha256(to_json([self.saga_id, self.step, kind])).hexdigest()


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
        if not self.name.isascii():
            try:
                self.name.encode()
            except UnicodeEncodeError:  # a lone surrogate: no saga log can record it
                raise DefinitionError(
                    "name", f"must be valid Unicode (UTF-8), not {self.name!r:.100}"
                ) from None
        if not callable(self.action):
            raise DefinitionError("action", f"step {self.name!r}: must be callable")
        if self.compensation is not None and not callable(self.compensation):
            raise DefinitionError("compensation", f"step {self.name!r}: must be callable or None")
        object.__setattr__(self, "action_is_async", iscoroutinefunction(self.action))
        object.__setattr__(self, "compensation_is_async", iscoroutinefunction(self.compensation))


# Results that are certainly not awaitable, checked by type before the slower
# attribute lookup for __await__ (which a plain function may still return).
PLAIN_RESULTS = frozenset({type(None), dict, list, tuple, str, int, float, bool, bytes})


@dataclass(frozen=True, slots=True, init=False)
class SagaDefinition:
    """A named, ordered list of steps. Step names are unique within a saga.

    A saga of no steps is allowed: it completes as soon as it starts.
    """

    name: str
    steps: tuple[Step, ...]
    # What the state machine needs, derived once.
    plan: Plan = field(repr=False, compare=False)

    def __init__(self, name: str, steps: Iterable[Step]) -> None:
        _check_name(name, "name")
        check_id("name", name)  # saga logs keep it beside every saga id
        if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Iterable):
            raise DefinitionError("steps", f"must be an iterable of Step, got {steps!r}")
        steps = tuple(steps)
        seen: set[str] = set()
        for i, step in enumerate(steps):
            if not isinstance(step, Step):
                raise DefinitionError(f"steps[{i}]", f"must be a Step, got {type(step).__name__}")
            if step.name in seen:
                raise DefinitionError(f"steps[{i}].name", f"duplicate step name {step.name!r}")
            seen.add(step.name)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(
            self,
            "plan",
            Plan(
                name, tuple(s.name for s in steps), tuple(s.compensation is not None for s in steps)
            ),
        )

    @property
    def step_names(self) -> tuple[str, ...]:
        return self.plan.steps

    @property
    def compensable(self) -> tuple[bool, ...]:
        return self.plan.compensable

    @property
    def fingerprint(self) -> str:
        """What identifies the definition in a saga log: its name and step names.

        JSON, so that no two definitions share one (steps ``["a, b"]`` and
        ``["a", "b"]`` differ).
        """
        return fingerprint(self.name, self.step_names)


def fingerprint(name: str, steps: Iterable[str]) -> str:
    """The fingerprint of a saga named ``name`` with these step names."""
    return to_json([name, list(steps)]).decode()
