"""How the demo shows sagas: a timeline per saga and a summary table, with rich.

Nothing here runs a saga; it reads what sagas leave behind (an orchestrated
saga's log records, a choreographed saga's events) and lays it out. Timelines
carry no timestamps, so the output of a run is the same every time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any, NamedTuple

from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from sagakit.core.event import Event
from sagakit.core.machine import (
    CompensationCompleted,
    CompensationFailed,
    CompensationStarted,
    SagaFinished,
    SagaRecord,
    SagaStarted,
    SagaStatus,
    StepCompleted,
    StepFailed,
    StepStarted,
)
from sagakit.core.saga import SagaDefinition

__all__ = [
    "Role",
    "SummaryRow",
    "Symbols",
    "choreography_timeline",
    "classify",
    "orchestration_timeline",
    "summary_table",
    "symbols_for",
]

STATUS_STYLE: Mapping[str, str] = {
    SagaStatus.COMPLETED: "bold green",
    SagaStatus.COMPENSATED: "bold yellow",
    SagaStatus.FAILED: "bold red",
    SagaStatus.RUNNING: "cyan",
    SagaStatus.COMPENSATING: "yellow",
}


class SummaryRow(NamedTuple):
    """One saga of the demo, as the summary table shows it.

    For an orchestrated saga, ``steps_done`` and ``compensations`` are step
    names; for a choreographed one, which has no steps but events, they are the
    types of the events that did the work and of those that undid it, in order.
    """

    saga: str
    style: str  # "orchestration" or "choreography"
    outcome: str  # a SagaStatus value
    steps_done: tuple[str, ...]
    compensations: tuple[str, ...]


class Symbols(NamedTuple):
    saga: str
    started: str
    completed: str
    failed: str
    compensated: str
    finished: str
    arrow: str
    none: str


_UNICODE = Symbols("▶", "○", "✔", "✘", "↩", "■", "→", "—")
# For a console whose encoding cannot carry the symbols above (a pipe under a
# non-UTF-8 locale): rich degrades its own boxes and rules, these must follow.
_ASCII = Symbols(">", ".", "+", "x", "<", "#", "->", "-")


def symbols_for(console: Console) -> Symbols:
    return _ASCII if console.options.ascii_only else _UNICODE


def _fields(values: Any) -> str:
    if values is None:
        return ""
    if isinstance(values, Mapping):
        return " ".join(f"{key}={value}" for key, value in values.items())
    return str(values)


def _title(saga_id: str, what: str) -> Text:
    return Text.assemble((saga_id, "bold"), "  ", (what, "dim"))


def _grid(rows: Iterable[Sequence[Text]], columns: int) -> RenderableType:
    grid = Table.grid(padding=(0, 1))
    for i in range(columns):
        # The last column holds the details, the only one worth wrapping.
        last = i == columns - 1
        grid.add_column(overflow="fold" if last else "ellipsis", no_wrap=not last)
    for row in rows:
        grid.add_row(*row)
    return Padding(grid, (0, 0, 0, 2), expand=False)


def orchestration_timeline(
    saga_id: str, definition: SagaDefinition, records: Sequence[SagaRecord], symbols: Symbols
) -> RenderableType:
    """An orchestrated saga, one line per record of its log."""
    steps = definition.steps
    results: dict[int, Any] = {}

    def undo_name(index: int) -> str:
        undo = steps[index].compensation
        return getattr(undo, "__name__", None) or f"undo {steps[index].name}"

    rows: list[tuple[Text, ...]] = []
    for record in records:
        match record:
            case SagaStarted():
                row = (symbols.saga, "bold", record.saga, "started", _fields(record.data))
            case StepStarted():
                row = (symbols.started, "dim", steps[record.step].name, "started", "")
            case StepCompleted():
                results[record.step] = record.result
                name = steps[record.step].name
                row = (symbols.completed, "green", name, "completed", _fields(record.result))
            case StepFailed():
                name = steps[record.step].name
                row = (symbols.failed, "bold red", name, "failed", record.error)
            case CompensationStarted():
                row = (symbols.started, "dim yellow", undo_name(record.step), "started", "")
            case CompensationCompleted():
                undone = _fields(results.get(record.step))
                detail = f"undid {steps[record.step].name}" + (f" ({undone})" if undone else "")
                row = (symbols.compensated, "yellow", undo_name(record.step), "completed", detail)
            case CompensationFailed():
                row = (symbols.failed, "bold red", undo_name(record.step), "failed", record.error)
            case SagaFinished():
                style = STATUS_STYLE[record.status]
                row = (symbols.finished, style, definition.name, record.status.value, "")
        symbol, style, subject, verb, detail = row
        rows.append(
            (
                Text(symbol, style=style),
                Text(subject, style=style),
                Text(verb, style=style),
                Text(detail),
            )
        )
    title = _title(saga_id, f"{definition.name} saga, orchestrated ({len(records)} log records)")
    return Group(title, _grid(rows, 4))


class Role(StrEnum):
    """What an event did for its saga."""

    FORWARD = "forward"
    FAILURE = "failure"
    COMPENSATION = "compensation"


_UNDOING = frozenset({SagaStatus.COMPENSATING, SagaStatus.COMPENSATED})


def classify(
    events: Iterable[Event], status_after: Mapping[str, SagaStatus]
) -> list[tuple[Event, Role]]:
    """Tell apart the events that did a saga's work, the one that failed it, and the undoing.

    A choreography has no step list to say so; its status mapping (the one its
    tracker uses) does: the event that turns a running saga towards compensation
    is the failure, and the events after it are compensations.
    """
    status = SagaStatus.RUNNING
    classified = []
    for event in events:
        after = status_after.get(event.type, status)
        if status in _UNDOING:
            role = Role.COMPENSATION
        elif after in _UNDOING:
            role = Role.FAILURE
        else:
            role = Role.FORWARD
        classified.append((event, role))
        status = after
    return classified


def choreography_timeline(
    saga_id: str,
    saga_name: str,
    events: Sequence[tuple[Event, Role]],
    status: SagaStatus,
    symbols: Symbols,
) -> RenderableType:
    """A choreographed saga, one line per event: who published what, with its payload."""
    look = {
        Role.FORWARD: (symbols.completed, "green"),
        Role.FAILURE: (symbols.failed, "bold red"),
        Role.COMPENSATION: (symbols.compensated, "yellow"),
    }
    rows: list[tuple[Text, ...]] = []
    for event, role in events:
        symbol, style = look[role]
        rows.append(
            (
                Text(symbol, style=style),
                Text(event.source or "?", style="bold"),
                Text(symbols.arrow, style="dim"),
                Text(event.type, style=style),
                Text(_fields(event.payload)),
            )
        )
    end = STATUS_STYLE[status]
    rows.append((Text(symbols.finished, style=end), Text(status.value, style=end)))
    title = _title(saga_id, f"{saga_name} saga, choreographed ({len(events)} events)")
    return Group(title, _grid(rows, 5))


def summary_table(rows: Sequence[SummaryRow], symbols: Symbols) -> Table:
    table = Table(title="Summary", title_style="bold", title_justify="left")
    # Names are never wrapped mid-word: on an 80-column terminal the table fits
    # by wrapping the "steps done" header, the one cell that can spare the width.
    table.add_column("saga", style="bold", no_wrap=True)
    table.add_column("style", no_wrap=True)
    table.add_column("outcome", no_wrap=True)
    table.add_column("steps done", justify="right")
    table.add_column("compensations", no_wrap=True)
    for row in rows:
        table.add_row(
            row.saga,
            row.style,
            Text(row.outcome, style=STATUS_STYLE.get(row.outcome, "")),
            str(len(row.steps_done)),
            # One per line, in the order they ran.
            "\n".join(row.compensations) or symbols.none,
        )
    return table
