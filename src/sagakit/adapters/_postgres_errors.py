"""PostgreSQL driver errors as sagakit's, at the boundary: whether a retry may help."""

from __future__ import annotations

import asyncpg  # type: ignore[import-untyped]

from sagakit.errors import (
    BackendBusy,
    BackendError,
    BackendRefused,
    BackendUnavailable,
    ConfigurationError,
)

__all__ = ["BACKEND", "DRIVER_ERRORS", "misconfigured", "translate"]

BACKEND = "postgresql"

_UNAVAILABLE_STATES = {"57P01", "57P02", "57P03", "53300", "08000", "08001", "08003", "08004"}
_UNAVAILABLE_STATES |= {"08006", "08007", "08P01"}
# A read-only server: a standby, or a primary being failed over; the next may accept writes.
_UNAVAILABLE_STATES |= {"25006"}
_BUSY_STATES = {"40001", "40P01", "55P03", "57014"}


def translate(exc: BaseException, waited: str = "") -> BackendError:
    """The sagakit error for a driver error (with the driver's as its cause).

    ``waited``: the timeout a TimeoutError ran out of (``"connect_timeout=10 s"``). The
    driver's own says nothing, and an error saying only "TimeoutError:" leaves a user
    with a timeout set too short no clue what to change.
    """
    state = getattr(exc, "sqlstate", None) or ""
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TimeoutError) and not str(exc):
        message = f"TimeoutError: no answer within {waited or 'the time allowed'}"
    error: BackendError
    if (
        isinstance(exc, asyncpg.PostgresConnectionError | OSError | TimeoutError)
        or state in _UNAVAILABLE_STATES
        # asyncpg's "connection is closed", "pool is closing"
        or (isinstance(exc, asyncpg.InterfaceError) and "clos" in str(exc))
        or isinstance(exc, asyncpg.exceptions.InternalClientError)
    ):
        error = BackendUnavailable(BACKEND, message)  # OSError: refused, reset, no route, DNS
    elif state in _BUSY_STATES or state.startswith(("40", "53")):
        error = BackendBusy(BACKEND, message)
    elif state.startswith(("28", "42501", "3D")):
        error = BackendRefused(BACKEND, message)
    else:
        error = BackendError(BACKEND, message)
    error.__cause__ = exc
    return error


DRIVER_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,  # a protocol left half-way by a lost server
    OSError,
    TimeoutError,
)


# A connection refused for a setting the URL's query sent to the server: an unknown
# parameter, a bad value, one that cannot be set at connection start. Every connection
# would be refused alike: no retry helps, the URL must change.
_SETTING_STATES = {"42704", "22023", "55P02"}


def misconfigured(exc: BaseException) -> ConfigurationError | None:
    """The error for a connection refused because of the URL's own options (call it on
    what connecting raised), or None when the URL is not to blame."""
    if isinstance(exc, ValueError | OverflowError):  # asyncpg's ClientConfigurationError too
        error = ConfigurationError(f"saga log URL: {type(exc).__name__}: {exc}")
    elif getattr(exc, "sqlstate", None) in _SETTING_STATES:
        error = ConfigurationError(
            f"saga log URL: the server refused a setting in its query ({exc}); a query"
            " parameter other than sagakit's own options is sent to the server as a setting"
        )
    else:
        return None
    error.__cause__ = exc
    return error
