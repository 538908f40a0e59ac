"""The ``sagakit`` command: ``sagakit demo`` and ``sagakit node``.

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
def demo() -> None:
    """Run orchestrated and choreographed sagas in memory and show how each one went."""
    from sagakit.cli.demo import run_demo

    run_demo()


@app.command()
def node() -> None:
    """Serve the protocol node: JSON messages on stdin, replies on stdout."""
    from sagakit.node.runner import exit_now
    from sagakit.node.runner import main as serve_node

    exit_now(serve_node())


def main() -> None:
    # Running any command through typer loads its pydantic-based parameter
    # machinery, which costs more than starting the node itself; a bare
    # ``sagakit node`` has no parameters to parse, so it skips all of that.
    if sys.argv[1:] == ["node"]:
        from sagakit.node.runner import exit_now
        from sagakit.node.runner import main as serve_node

        exit_now(serve_node())
    app(prog_name="sagakit")
