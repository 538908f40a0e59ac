"""``sagakit sagas list`` and ``sagakit sagas show``: what a saga log holds, for an operator."""

from __future__ import annotations

import datetime
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

__all__ = ["list_table", "parse_statuses", "timeline_table"]


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    for column in ("saga id", "saga", "status", "records", "lease holder", "updated"):
        table.add_column(column, justify="right" if column == "records" else "left")
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
            return "saga started", "-", "-", f"{saga} with input {dict(data)!r}"
        case StepStarted(step=step, attempt=attempt):
            resumed = " (run again after an interruption)" if attempt > 1 else ""
            return "step started", name(step), str(attempt), resumed.strip()
        case StepCompleted(step=step, result=result):
            return "step completed", name(step), "", f"result {result!r}"
        case StepFailed(step=step, error=error, attempt=attempt):
            return "step failed", name(step), str(attempt), error
        case CompensationStarted(step=step, attempt=attempt):
            return "compensation started", name(step), str(attempt), ""
        case CompensationCompleted(step=step):
            return "compensation completed", name(step), "", ""
        case CompensationFailed(step=step, error=error, attempt=attempt):
            return "compensation failed", name(step), str(attempt), error
        case SagaFinished(status=status):
            return "saga finished", "-", "-", str(status)
    return type(record).__name__, "-", "-", repr(record)


def timeline_table(saga_id: str, history: Sequence[LoggedRecord]) -> Table:
    steps: Sequence[str] = ()
    if history and isinstance(history[0].record, SagaStarted):
        steps = history[0].record.steps
    table = Table(title=f"saga {saga_id}: {len(history)} record(s)", title_justify="left")
    for column in ("#", "time", "event", "step", "attempt", "result or error"):
        table.add_column(column, justify="right" if column in ("#", "attempt") else "left")
    for logged in history:
        event, step, attempt, detail = _describe(logged.record, steps)
        table.add_row(str(logged.seq), _time(logged.recorded_at), event, step, attempt, detail)
    return table


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
