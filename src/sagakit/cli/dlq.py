"""``sagakit dlq list|replay``: the dead letters of one consumer group on a bus, for an operator.

``list`` prints the group's dead letters, oldest first (``--json``: one object
per line, for scripts); ``replay`` delivers the named ones again to that group
and removes them from its dead letters (``--all``: every one that can be, the
others named on stderr). Exit status: 0 done, 1 a dead letter id the group does
not hold or cannot replay, 2 a bus that cannot be used (bad URL, missing extra,
server unreachable). ``memory://`` buses live inside one process, so from a
shell their dead letters are always empty.
"""

# No ``from __future__ import annotations``: typer reads the parameters'
# annotations at run time to build the options.
import asyncio
import datetime
import json
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from sagakit.adapters import redact_url as redact

__all__ = ["dlq_app", "redact", "render_letters"]

dlq_app = typer.Typer(
    help="Inspect and replay the dead letters of a consumer group.", no_args_is_help=True
)

BusOption = Annotated[
    str, typer.Option("--bus", help="The event bus's URL, e.g. nats://127.0.0.1:4222.")
]
GroupOption = Annotated[
    str, typer.Option("--group", help="The consumer group (a service's name, e.g. payment).")
]


def _time(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _one_line(text: str, width: int = 120) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def render_letters(letters: Sequence[Any], group: str, url: str, as_json: bool) -> str:
    """The dead letters as text (a heading and one block per letter) or JSON lines."""
    if as_json:
        from sagakit.core.envelope import encode_event

        lines = []
        for d in letters:
            entry = {
                "id": d.id,
                "group": d.group,
                "deliveries": d.deliveries,
                "error": d.error,
                "failed_at": d.failed_at,
                "event": json.loads(encode_event(d.event)),
            }
            lines.append(json.dumps(entry, ensure_ascii=False))
        return "\n".join(lines)
    if not letters:
        return f"no dead letters in group {group!r} on {redact(url)}"
    out = [f"{len(letters)} dead letter(s) in group {group!r} on {redact(url)}, oldest first"]
    for d in letters:
        e = d.event
        out.append("")
        # An undecodable message is shown as an event without an id.
        out.append(f"{d.id}  {e.type}  saga {e.saga_id}  event {e.event_id or '-'}")
        source = f" from {e.source}" if e.source else ""
        out.append(f"  failed {_time(d.failed_at)} after {d.deliveries} deliveries{source}")
        out.append(f"  error: {_one_line(d.error)}")
    return "\n".join(out)


async def _list(url: str, group: str, limit: int) -> Sequence[Any]:
    from sagakit.adapters import open_event_bus

    bus = open_event_bus(url)
    try:
        return await bus.dead_letters(group, limit=limit)
    finally:
        await bus.close()


async def _replay(
    url: str, group: str, ids: Sequence[str], every: bool
) -> tuple[list[str], list[Exception]]:
    """The ids replayed, and with ``every`` the letters that could not be (the others
    are replayed all the same: one that cannot be must not hold back the rest)."""
    from sagakit.adapters import open_event_bus
    from sagakit.errors import DefinitionError

    bus = open_event_bus(url)
    replayed: list[str] = []
    refused: list[Exception] = []
    try:
        if every:
            ids = [d.id for d in await bus.dead_letters(group, limit=1_000_000)]
        for letter_id in ids:
            try:
                await bus.replay_dead_letter(group, letter_id)
            except DefinitionError as exc:
                if not every:
                    raise
                refused.append(exc)  # one that cannot be replayed, or replayed meanwhile
                continue
            replayed.append(letter_id)
    finally:
        await bus.close()
        for letter_id in replayed:
            typer.echo(f"replayed {letter_id} to group {group!r}")
    return replayed, refused


def _fail(command: str, exc: Exception, status: int) -> typer.Exit:
    typer.echo(f"sagakit dlq {command}: {exc}", err=True)
    return typer.Exit(status)


@dlq_app.command("list")
def dlq_list(
    bus: BusOption,
    group: GroupOption,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 100,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per dead letter, per line.")
    ] = False,
) -> None:
    """List a group's dead letters, oldest first: id, event, error, deliveries, time."""
    from sagakit.errors import SagakitError

    try:
        letters = asyncio.run(_list(bus, group, limit))
    except SagakitError as exc:
        raise _fail("list", exc, 2) from None
    text = render_letters(letters, group, bus, as_json)
    if text:
        typer.echo(text)


@dlq_app.command("replay")
def dlq_replay(
    bus: BusOption,
    group: GroupOption,
    ids: Annotated[
        list[str] | None, typer.Argument(help="The dead letters' ids (as `dlq list` shows).")
    ] = None,
    every: Annotated[
        bool, typer.Option("--all", help="Replay every dead letter of the group.")
    ] = False,
) -> None:
    """Deliver dead letters again to their group, and remove them from its dead letters."""
    from sagakit.errors import DefinitionError, SagakitError

    if bool(ids) == every:
        raise typer.BadParameter("name the dead letters' ids, or give --all (not both)")
    try:
        replayed, refused = asyncio.run(_replay(bus, group, ids or [], every))
    except DefinitionError as exc:
        raise _fail("replay", exc, 1) from None
    except SagakitError as exc:
        raise _fail("replay", exc, 2) from None
    for error in refused:
        typer.echo(f"sagakit dlq replay: {error}", err=True)
    if refused:
        raise typer.Exit(1)
    if every and not replayed:
        typer.echo(f"no dead letters in group {group!r} on {redact(bus)}")
