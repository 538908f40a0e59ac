"""``sagakit sagas list`` and ``sagakit sagas show``: what a saga log holds, for an operator."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from sagakit.core.records import (
    CompensationCompleted,
    CompensationFailed,
    CompensationStarted,
    SagaFinished,
    SagaStarted,
    SagaStatus,
    StepCompleted,
    StepFailed,
    StepStarted,
)
from sagakit.ports.saga_log import LoggedRecord, SagaLog, SagaSummary

__all__ = ["list_table", "open_existing", "parse_statuses", "timeline_table"]


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _clock(seconds: float) -> str:
    """Time of day (UTC) to the millisecond: a saga's records are seconds apart, not days."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%H:%M:%S.%f")[:-3]


def parse_statuses(values: Sequence[str]) -> list[SagaStatus] | None:
    """``--status`` values (repeatable, or comma-separated) as statuses; None for all."""
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    if not names:
        return None
    known = {status.value: status for status in SagaStatus}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"unknown status {', '.join(unknown)} (one of: {', '.join(sorted(known))})"
        )
    return [known[name] for name in names]


def list_table(summaries: Sequence[SagaSummary]) -> Table:
    table = Table(title=f"{len(summaries)} saga(s), newest first", title_justify="left")
    # Ids and names fold onto more lines rather than end in "...": an operator
    # copies a saga id from here into `sagas show`; short fields never wrap.
    table.add_column("saga id", overflow="fold")
    table.add_column("saga", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("records", justify="right", no_wrap=True)
    table.add_column("lease holder", overflow="fold")
    table.add_column("updated", no_wrap=True)
    for s in summaries:
        holder = "-" if s.owner is None else f"{s.owner} (until {_time(s.lease_expires_at)})"
        table.add_row(s.saga_id, s.saga, str(s.status), str(s.records), holder, _time(s.updated_at))
    return table


def _describe(record: Any, steps: Sequence[str]) -> tuple[str, str, str, str]:
    """(event, step, attempt, detail) of one record, in an operator's words."""

    def name(index: int) -> str:
        return steps[index] if 0 <= index < len(steps) else f"#{index}"

    match record:
        case SagaStarted(saga=saga, data=data):
            shown = _json(dict(data)) if data else ""
            return "saga started", saga, "-", shown
        case StepStarted(step=step, attempt=attempt):
            resumed = "again: the last run was cut off" if attempt > 1 else ""
            return "started", name(step), str(attempt), resumed
        case StepCompleted(step=step, result=result):
            return "completed", name(step), "", "" if result is None else _json(result)
        case StepFailed(step=step, error=error, attempt=attempt):
            return "failed", name(step), str(attempt), error
        case CompensationStarted(step=step, attempt=attempt):
            return "undo started", name(step), str(attempt), ""
        case CompensationCompleted(step=step):
            return "undone", name(step), "", ""
        case CompensationFailed(step=step, error=error, attempt=attempt):
            return "undo failed", name(step), str(attempt), error
        case SagaFinished(status=status):
            return "saga finished", "-", "-", str(status)
    return type(record).__name__, "-", "-", repr(record)


def timeline_table(saga_id: str, history: Sequence[LoggedRecord], *, times: bool = True) -> Table:
    steps: Sequence[str] = ()
    if history and isinstance(history[0].record, SagaStarted):
        steps = history[0].record.steps
    table = Table(title=f"saga {saga_id}: {len(history)} record(s)", title_justify="left")
    first = _time(history[0].recorded_at)[:10] if history else ""
    table.add_column("#", justify="right")
    if times:
        table.add_column(f"UTC {first}", no_wrap=True)
    table.add_column("event", no_wrap=True)
    table.add_column("step", no_wrap=True)
    table.add_column("try", justify="right")
    table.add_column("result or error", overflow="fold")  # whole, as an operator needs it
    for logged in history:
        event, step, attempt, detail = _describe(logged.record, steps)
        when = [_clock(logged.recorded_at)] if times else []
        table.add_row(str(logged.seq), *when, event, step, attempt, detail)
    return table


def open_existing(store: str) -> SagaLog:
    """The saga log ``store`` names, for reading only: an SQLite file must exist.

    Opening a missing file would create an empty saga log there, so a typo in
    the path would list nothing and leave a stray file behind; a worker or a
    node creates the file, ``sagas list|show`` only read one.
    """
    from sagakit.adapters import open_saga_log
    from sagakit.adapters.sqlite_log import SQLiteSagaLog
    from sagakit.errors import ConfigurationError

    log = open_saga_log(store)
    if isinstance(log, SQLiteSagaLog) and not log.path.is_file():
        raise ConfigurationError(
            f"no saga log at {log.path}: the file does not exist"
            " (a worker or a node creates it on first use)"
        )
    return log


async def show_list(log: SagaLog, statuses: list[SagaStatus] | None, limit: int) -> Table:
    try:
        return list_table(await log.list(status=statuses, limit=limit))
    finally:
        await log.close()


async def show_saga(log: SagaLog, saga_id: str) -> Table | None:
    try:
        history = await log.history(saga_id)
        return timeline_table(saga_id, history) if history else None
    finally:
        await log.close()


def print_table(table: Table) -> None:
    Console(soft_wrap=False).print(table)
