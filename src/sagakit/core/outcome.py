"""What a finished saga reports."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

from sagakit.core.machine import Plan, SagaState
from sagakit.core.records import SagaStatus

__all__ = ["SagaOutcome", "outcome_of"]


class SagaOutcome(NamedTuple):
    """The end of a saga: its final state and which steps completed or were undone.

    ``compensated_steps`` are in the order the compensations ran, newest step
    first. ``failed_step`` and ``error`` tell which step's action failed and why;
    for the ``failed`` state, ``stuck_step`` and ``stuck_error`` tell which
    compensation failed, leaving the saga half undone for an operator.
    """

    saga_id: str
    state: SagaStatus
    completed_steps: tuple[str, ...]
    compensated_steps: tuple[str, ...] = ()
    failed_step: str | None = None
    error: str | None = None
    stuck_step: str | None = None
    stuck_error: str | None = None
    results: Mapping[str, Any] = {}  # a NamedTuple default, never mutated

    @property
    def ok(self) -> bool:
        return self.state is SagaStatus.COMPLETED


_new_outcome: Callable[[tuple[Any, ...]], SagaOutcome] = partial(tuple.__new__, SagaOutcome)


def outcome_of(
    saga_id: str, plan: Plan, state: SagaState, results: Mapping[str, Any]
) -> SagaOutcome:
    """The outcome of a saga in ``state`` (final, or as far as it got)."""
    status, done, _, failed, error, _, stuck, stuck_error, _, _ = state
    steps = plan.steps
    if failed is None:  # nothing failed, so nothing was compensated
        return _new_outcome((saga_id, status, steps[:done], (), None, None, None, None, results))
    return _new_outcome(
        (
            saga_id,
            status,
            steps[:done],
            tuple([steps[i] for i in state.compensated(plan)]),
            steps[failed],
            error,
            None if stuck is None else steps[stuck],
            stuck_error,
            results,
        )
    )
