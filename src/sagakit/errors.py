"""The exception tree of sagakit.

Every error sagakit raises derives from :class:`SagakitError`; driver errors from
backends are translated into :class:`BackendError` at the adapter boundary, so
callers never need to import a driver to catch a failure. Errors carry data as
attributes (saga id, step, field) as well as a readable message::

    SagakitError
    ├── DefinitionError      a saga definition or API argument is invalid (names the field)
    ├── ConfigurationError   a backend URL is malformed, unknown, or its extra is missing
    ├── SagaError            something went wrong with one saga (carries saga_id)
    │   ├── SagaIdConflict   the saga id was already used for another saga or input
    │   ├── SagaLogConflict  another writer appended to the saga's log first
    │   └── LeaseLost        another worker took the saga over; this one must stop driving it
    ├── InvalidTransition    an outcome the saga's state cannot accept (a driver bug, a corrupt log)
    └── BackendError         a saga log or event bus backend failed (wraps the driver error);
        │                    ``retryable`` says whether trying again may help
        ├── BackendUnavailable  connection lost or refused, timeout, restarting (retry may help)
        ├── BackendBusy         serialization failure, deadlock, lock timeout (retry may help)
        ├── SchemaMismatch      the store's schema is newer than this sagakit, or not ours
        └── BackendRefused      permission denied, bad credentials, invalid request (no retry)
"""

from __future__ import annotations

__all__ = [
    "BackendBusy",
    "BackendError",
    "BackendRefused",
    "BackendUnavailable",
    "ConfigurationError",
    "DefinitionError",
    "InvalidTransition",
    "LeaseLost",
    "SagaError",
    "SagaIdConflict",
    "SagaLogConflict",
    "SagakitError",
    "SchemaMismatch",
]


class SagakitError(Exception):
    """Root of every error raised by sagakit."""


class DefinitionError(SagakitError, ValueError):
    """An invalid saga definition or argument; ``field`` names the offending field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class ConfigurationError(SagakitError):
    """A backend URL that cannot be used (unknown scheme, malformed, or missing extra)."""


class SagaError(SagakitError):
    """An error about one saga."""

    def __init__(self, saga_id: str, message: str, *, step: str | None = None) -> None:
        super().__init__(f"saga {saga_id!r}: {message}")
        self.saga_id = saga_id
        self.step = step


class SagaIdConflict(SagaError):
    """The saga id is already recorded for a different saga definition."""

    def __init__(self, saga_id: str, recorded: str, requested: str) -> None:
        super().__init__(saga_id, f"already recorded as {recorded}, cannot run it as {requested}")
        self.recorded = recorded
        self.requested = requested


class SagaLogConflict(SagaError):
    """Optimistic concurrency failure: the log holds more records than the writer saw."""

    def __init__(self, saga_id: str, expected: int, actual: int) -> None:
        super().__init__(
            saga_id, f"log has {actual} records, writer expected {expected}; another writer won"
        )
        self.expected = expected
        self.actual = actual


class LeaseLost(SagaError):
    """This worker's lease on the saga is gone: another worker claimed it (a newer epoch).

    The driver stops before its next action; the saga is the new holder's now.
    """

    def __init__(self, saga_id: str, owner: str, epoch: int, detail: str = "") -> None:
        message = f"lease of {owner!r} (epoch {epoch}) is no longer current"
        super().__init__(saga_id, f"{message}: {detail}" if detail else message)
        self.owner = owner
        self.epoch = epoch


class InvalidTransition(SagakitError):
    """An outcome that does not fit the saga's state (a bug in a driver, or a corrupt log).

    Raised by the pure state machine, which knows no saga id; the orchestrator
    adds it to the message when it meets one.
    """


class BackendError(SagakitError):
    """A backend failed; ``__cause__`` holds the driver's own exception.

    ``retryable`` tells whether the same call may succeed if tried again later
    (the subclasses fix it; a plain BackendError says no).
    """

    retryable: bool = False

    def __init__(self, backend: str, message: str) -> None:
        super().__init__(f"{backend}: {message}")
        self.backend = backend


class BackendUnavailable(BackendError):
    """The server cannot be reached, or the connection was lost; a retry may help."""

    retryable = True


class BackendBusy(BackendError):
    """The server refused for now (serialization failure, deadlock, lock timeout); retry."""

    retryable = True


class SchemaMismatch(BackendError):
    """The store's schema is newer than this sagakit understands, or is not sagakit's;
    ``saga_id`` names the saga, when one saga's row or records are the ones at fault."""

    def __init__(self, backend: str, message: str, *, saga_id: str | None = None) -> None:
        super().__init__(backend, message)
        self.saga_id = saga_id


class BackendRefused(BackendError):
    """The server refused the request for good (permission, credentials, invalid request)."""
