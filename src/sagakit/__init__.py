"""sagakit: sagas for Python services.

Orchestration: define a saga as ordered steps with compensations and let an
:class:`Orchestrator` run it, recording every transition in a saga log.
Choreography: services that react to events on an :class:`EventBus` and publish
their own, with no coordinator. Everything here is the public API; modules not
re-exported here are private.

The names are imported on first use (PEP 562), not with the package: a process
that needs one corner of sagakit (the protocol node, the CLI, a choreographed
service) does not pay for importing the rest. ``from sagakit import X`` works as
before; type checkers read the imports under ``TYPE_CHECKING``.
"""

from __future__ import annotations

# Not typing.TYPE_CHECKING: importing typing would be most of the cost of
# importing sagakit. Type checkers take any name TYPE_CHECKING to be true.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any

    from sagakit.adapters import open_event_bus, open_saga_log
    from sagakit.adapters.memory_bus import InMemoryEventBus
    from sagakit.adapters.memory_log import InMemorySagaLog
    from sagakit.choreography.service import Service, handles
    from sagakit.choreography.tracker import SagaTracker, TrackedSaga
    from sagakit.core.event import Event
    from sagakit.core.outcome import SagaOutcome
    from sagakit.core.records import SagaStatus
    from sagakit.core.saga import SagaDefinition, Step, StepContext
    from sagakit.errors import (
        BackendBusy,
        BackendError,
        BackendRefused,
        BackendUnavailable,
        ConfigurationError,
        DefinitionError,
        InvalidTransition,
        LeaseLost,
        SagaError,
        SagaIdConflict,
        SagakitError,
        SagaLogConflict,
        SchemaMismatch,
    )
    from sagakit.orchestration import Orchestrator, Recovered
    from sagakit.ports.event_bus import ALL_EVENTS, DeadLetter, EventBus, new_event
    from sagakit.ports.saga_log import Journal, Lease, SagaLog, SagaSummary

__version__ = "0.1.0"

__all__ = [
    "ALL_EVENTS",
    "BackendBusy",
    "BackendError",
    "BackendRefused",
    "BackendUnavailable",
    "ConfigurationError",
    "DeadLetter",
    "DefinitionError",
    "Event",
    "EventBus",
    "InMemoryEventBus",
    "InMemorySagaLog",
    "InvalidTransition",
    "Journal",
    "Lease",
    "LeaseLost",
    "Orchestrator",
    "Recovered",
    "SagaDefinition",
    "SagaError",
    "SagaIdConflict",
    "SagaLog",
    "SagaLogConflict",
    "SagaOutcome",
    "SagaStatus",
    "SagaSummary",
    "SagaTracker",
    "SagakitError",
    "SchemaMismatch",
    "Service",
    "Step",
    "StepContext",
    "TrackedSaga",
    "handles",
    "new_event",
    "open_event_bus",
    "open_saga_log",
]

# The module each public name comes from; keep it in step with the imports above
# (tests/test_public_api.py checks that the two and __all__ agree).
_ORIGINS: dict[str, str] = {
    "ALL_EVENTS": "sagakit.ports.event_bus",
    "BackendBusy": "sagakit.errors",
    "BackendError": "sagakit.errors",
    "BackendRefused": "sagakit.errors",
    "BackendUnavailable": "sagakit.errors",
    "ConfigurationError": "sagakit.errors",
    "DeadLetter": "sagakit.ports.event_bus",
    "DefinitionError": "sagakit.errors",
    "Event": "sagakit.core.event",
    "EventBus": "sagakit.ports.event_bus",
    "InMemoryEventBus": "sagakit.adapters.memory_bus",
    "InMemorySagaLog": "sagakit.adapters.memory_log",
    "InvalidTransition": "sagakit.errors",
    "Journal": "sagakit.ports.saga_log",
    "Lease": "sagakit.ports.saga_log",
    "LeaseLost": "sagakit.errors",
    "Orchestrator": "sagakit.orchestration",
    "Recovered": "sagakit.orchestration",
    "SagaDefinition": "sagakit.core.saga",
    "SagaError": "sagakit.errors",
    "SagaIdConflict": "sagakit.errors",
    "SagaLog": "sagakit.ports.saga_log",
    "SagaLogConflict": "sagakit.errors",
    "SagaOutcome": "sagakit.core.outcome",
    "SagaStatus": "sagakit.core.records",
    "SagaSummary": "sagakit.ports.saga_log",
    "SagaTracker": "sagakit.choreography.tracker",
    "SagakitError": "sagakit.errors",
    "SchemaMismatch": "sagakit.errors",
    "Service": "sagakit.choreography.service",
    "Step": "sagakit.core.saga",
    "StepContext": "sagakit.core.saga",
    "TrackedSaga": "sagakit.choreography.tracker",
    "handles": "sagakit.choreography.service",
    "new_event": "sagakit.ports.event_bus",
    "open_event_bus": "sagakit.adapters",
    "open_saga_log": "sagakit.adapters",
}


def _load(name: str) -> Any:
    """The public ``name``, imported from its module and kept as a global of the package."""
    origin = _ORIGINS.get(name)
    if origin is None:
        import sys

        raise AttributeError(
            f"module {__name__!r} has no attribute {name!r}", name=name, obj=sys.modules[__name__]
        )
    from importlib import import_module

    value = getattr(import_module(origin), name)
    # Kept: the next lookup finds the global and no longer comes here.
    globals()[name] = value
    return value


if not TYPE_CHECKING:
    # Hidden from type checkers: a module __getattr__ would make them accept any
    # name imported from sagakit (as Any) instead of flagging a misspelt one.
    __getattr__ = _load


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
