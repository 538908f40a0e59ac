"""sagakit: sagas for Python services.

Orchestration: define a saga as ordered steps with compensations and let an
:class:`Orchestrator` run it, recording every transition in a saga log.
Choreography: services that react to events on an :class:`EventBus` and publish
their own, with no coordinator. Everything here is the public API; modules not
re-exported here are private.
"""

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
from sagakit.ports.event_bus import ALL_EVENTS, DeadLetter, EventBus
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
    "open_event_bus",
    "open_saga_log",
]
