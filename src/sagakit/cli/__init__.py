"""The ``sagakit`` command: ``demo``, ``node``, ``worker``, ``sagas list|show``.

Only typer is imported up front. ``sagakit node`` is started afresh for every
run of a protocol test, and its stdout carries protocol messages only, so it
needs neither rich nor the demo; those load inside ``demo``.
"""

# No ``from __future__ import annotations``: typer reads the parameters'
# annotations at run time to build the options.
import sys
from typing import Annotated

import typer

from sagakit import __version__

__all__ = ["app", "main"]

app = typer.Typer(
    name="sagakit",
    help="Sagas for Python services: orchestration with a saga log, choreography over events.",
    no_args_is_help=True,
    add_completion=False,
    # A crash's locals may hold whole saga logs; a traceback is enough.
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Sagas for Python services: orchestration with a saga log, choreography over events."""


@app.command()
def demo(
    bus: Annotated[
        str,
        typer.Option(
            "--bus", help="The event bus the choreographed orders run on, e.g. nats://host:4222."
        ),
    ] = "memory://",
) -> None:
    """Run orchestrated sagas (in memory, and on SQLite with a worker killed mid-saga) and
    choreographed orders (on --bus), and show how each one went."""
    from sagakit.cli.demo import run_demo
    from sagakit.errors import SagakitError

    try:
        run_demo(bus_url=bus)
    except SagakitError as exc:
        typer.echo(f"sagakit demo: {exc}", err=True)
        raise typer.Exit(2) from None


from sagakit.cli.dlq import dlq_app  # noqa: E402  (a sub-app: defined beside its commands)

app.add_typer(dlq_app, name="dlq")


@app.command()
def node() -> None:
    """Serve the protocol node: JSON messages on stdin, replies on stdout."""
    from sagakit.node.runner import exit_now
    from sagakit.node.runner import main as serve_node

    exit_now(serve_node([]))


@app.command()
def worker(
    store: Annotated[
        str, typer.Option("--store", help="The saga log's URL, e.g. sqlite:///sagas.db.")
    ],
    sagas: Annotated[
        list[str],
        typer.Option(
            "--sagas",
            help="package.module:NAME, a saga definition or a list of them (repeatable).",
        ),
    ],
    owner: Annotated[
        str | None,
        typer.Option(
            "--owner",
            help="This worker's name in leases (default: host:pid:random). Restarted under"
            " the same name, it takes over at once the sagas it left leased.",
        ),
    ] = None,
    lease_ttl: Annotated[
        float,
        typer.Option(
            "--lease-ttl",
            min=0.1,
            help="Seconds a saga stays leased to this worker between renewals; a dead "
            "worker's sagas are taken over once it passes.",
        ),
    ] = 30.0,  # the Orchestrator's default, shown in --help (tests/test_cli.py checks)
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="Sagas driven at once, at most.")
    ] = 64,
) -> None:
    """Run sagas from a shared saga log until SIGTERM or SIGINT, then give the leases up."""
    import asyncio
    import logging
    import os

    from sagakit.cli.worker import load_sagas, run_worker
    from sagakit.errors import SagakitError
    from sagakit.node.runner import UsageError, log_level

    try:
        level = log_level(os.environ, "INFO")
    except UsageError as exc:  # exit status 2, as for the worker's other settings
        typer.echo(f"sagakit worker: {exc}", err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        definitions = [d for spec in sagas for d in load_sagas(spec)]
        asyncio.run(run_worker(store, definitions, owner, lease_ttl, concurrency))
    except SagakitError as exc:
        typer.echo(f"sagakit worker: {exc}", err=True)
        raise typer.Exit(2) from None


sagas_app = typer.Typer(help="Inspect the sagas of a saga log.", no_args_is_help=True)
app.add_typer(sagas_app, name="sagas")


@sagas_app.command("list")
def sagas_list(
    store: Annotated[str, typer.Option("--store", help="The saga log's URL.")],
    status: Annotated[
        list[str] | None,
        typer.Option(
            "--status",
            help="Only sagas of this status (repeatable or comma-separated): running, "
            "compensating, completed, compensated, failed.",
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 50,
) -> None:
    """List sagas, newest first."""
    import asyncio

    from sagakit.cli.sagas import open_existing, parse_statuses, print_table, show_list
    from sagakit.errors import SagakitError

    try:
        statuses = parse_statuses(status or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--status") from None
    try:
        print_table(asyncio.run(show_list(open_existing(store), statuses, limit)))
    except SagakitError as exc:
        typer.echo(f"sagakit sagas list: {exc}", err=True)
        raise typer.Exit(2) from None


@sagas_app.command("show")
def sagas_show(
    saga_id: Annotated[str, typer.Argument(help="The saga's id.")],
    store: Annotated[str, typer.Option("--store", help="The saga log's URL.")],
) -> None:
    """Show every record of one saga: step, attempt, result or error, time."""
    import asyncio

    from sagakit.cli.sagas import open_existing, print_table, show_saga
    from sagakit.errors import SagakitError

    try:
        table = asyncio.run(show_saga(open_existing(store), saga_id))
    except SagakitError as exc:
        typer.echo(f"sagakit sagas show: {exc}", err=True)
        raise typer.Exit(2) from None
    if table is None:
        from sagakit.adapters import redact_url

        typer.echo(f"sagakit sagas show: no saga {saga_id!r} in {redact_url(store)}", err=True)
        raise typer.Exit(1)
    print_table(table)


def main() -> None:
    # Running any command through typer loads its pydantic-based parameter
    # machinery, which costs more than starting the node itself; ``sagakit
    # node`` parses its few options itself (those of ``python3 main.py``).
    if sys.argv[1:2] == ["node"]:
        from sagakit.node.runner import exit_now
        from sagakit.node.runner import main as serve_node

        exit_now(serve_node(sys.argv[2:], prog="sagakit node"))
    app(prog_name="sagakit")
