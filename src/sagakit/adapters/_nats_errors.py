"""NATS client errors as sagakit's, at the boundary: whether a retry may help."""

from __future__ import annotations

import nats.errors
import nats.js.errors

from sagakit.adapters.nats_consumer import describe
from sagakit.errors import BackendBusy, BackendError, BackendRefused, BackendUnavailable

__all__ = ["translate"]

# JetStream's "insufficient resources" and "insufficient storage": full, not down.
_JS_FULL = frozenset({10023, 10047})


def translate(url: str, doing: str, exc: BaseException) -> BackendError:
    """A driver error as one of sagakit's (the caller raises it ``from exc``)."""
    message = f"{doing}: {describe(exc)}"
    if isinstance(exc, nats.js.errors.APIError):
        code = exc.code or 0
        if exc.err_code in _JS_FULL:
            return BackendBusy(url, f"{message} (JetStream's storage is full)")
        if code == 503 or isinstance(exc, nats.js.errors.ServiceUnavailableError):
            return BackendUnavailable(url, message)
        if code == 429:
            return BackendBusy(url, message)
        return BackendRefused(url, message)
    if isinstance(exc, nats.errors.MaxPayloadError | nats.errors.AuthorizationError):
        return BackendRefused(url, message)
    if isinstance(exc, nats.errors.BadSubjectError | nats.errors.BadHeaderError):
        return BackendRefused(url, message)
    if isinstance(
        exc,
        nats.errors.Error | TimeoutError | OSError | nats.js.errors.NoStreamResponseError,
    ):
        # Timeouts, lost or refused connections, no responders while JetStream starts.
        return BackendUnavailable(url, message)
    return BackendError(url, message)
