"""docs/*.md must stay true, as tests/test_readme.py keeps README.md: what their code
blocks hold is run or checked. They hold no whole programs (README.md has those), but
`sagakit` command lines, the node's options, an envelope, and the SQL that prunes a
saga log: each is checked against the code, the SQL run on real tables."""

from __future__ import annotations

import asyncio
import re
import shlex
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sagakit import Orchestrator, SagaDefinition, Step

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]


def blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S)


def test_python_blocks_in_docs_run() -> None:
    # None today; one added later runs here, as README.md's do in test_readme.py.
    for page in DOCS:
        for code in blocks(page, "python"):
            done = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
            )
            assert done.returncode == 0, f"{page.name}:\n{code}\n{done.stderr}"


def _command_lines() -> list[tuple[str, str]]:
    """(page, what follows "sagakit ") for each command shown in a code span or sh block."""
    found = []
    for page in PAGES:
        text = page.read_text()
        pieces = re.findall(r"`([^`\n]+)`", text)
        for block in blocks(page, "sh"):  # a command continued after a backslash is one
            pieces += block.replace("\\\n", " ").splitlines()
        for piece in pieces:
            match = re.search(r"(?:^|\s)sagakit ([a-z].*)", piece)
            if match:
                found.append((page.name, match.group(1).split(" #")[0]))
    return found


def _options() -> dict[str, set[str]]:
    """Each command path ("worker", "sagas list"...) and the options it takes."""
    import typer.main

    from sagakit.cli import app
    from sagakit.node.runner import _parser

    commands: dict[str, set[str]] = {}

    def walk(path: str, command: Any) -> None:
        commands[path] = {opt for param in command.params for opt in param.opts}
        for name, sub in getattr(command, "commands", {}).items():
            walk(f"{path} {name}".strip(), sub)

    walk("", typer.main.get_command(app))
    # The node parses its own options (argparse), as python3 main.py does.
    commands["node"] = set(_parser("sagakit node")._option_string_actions)
    return commands


def test_every_sagakit_command_shown_exists_with_the_options_shown() -> None:
    commands = _options()
    lines = _command_lines()
    assert len(lines) > 20  # the pattern still finds them
    for page, line in lines:
        words = shlex.split(line.replace("[", " ").replace("]", " "))  # [optional] parts
        path, rest = words[0].rstrip(":"), words[1:]  # "sagakit node: error: ..." too
        if rest and "|" in rest[0]:  # "sagas list|show"
            paths, rest = [f"{path} {name}" for name in rest[0].split("|")], rest[1:]
        elif rest and f"{path} {rest[0]}" in commands:
            paths, rest = [f"{path} {rest[0]}"], rest[1:]
        else:
            paths = [path]
        for each in paths:
            assert each in commands, f"{page}: no command sagakit {each} ({line})"
            for word in rest:
                if word.startswith("--"):
                    option = word.split("=")[0]
                    assert option in commands[each], f"{page}: sagakit {each} has no {option}"


def test_the_node_options_table_says_what_the_node_does() -> None:
    from sagakit.node.runner import _parser

    text = (ROOT / "docs" / "node.md").read_text()
    rows = re.findall(r"^\| `(--[a-z-]+) [A-Z]+` \| `(SAGAKIT_[A-Z_]+)` \| ([^|]+) \|", text, re.M)
    actions = _parser("sagakit node")._option_string_actions
    # Every option the node reads from the environment is in the table, and no other.
    with_env = {name for name, action in actions.items() if "env SAGAKIT_" in (action.help or "")}
    assert {option for option, _, _ in rows} == with_env
    for option, variable, default in rows:
        shown = actions[option].help or ""
        assert f"env {variable}" in shown, option
        number = default.strip().replace(",", "")
        if number.isdigit():
            assert f"default {number}" in shown, (option, default)


def test_the_envelope_shown_is_one_the_buses_read() -> None:
    from sagakit.core.envelope import decode_event

    [shown] = blocks(ROOT / "docs" / "event-buses.md", "json")
    event = decode_event(shown.encode())
    assert (event.type, event.saga_id, event.source) == ("PaymentCharged", "order-7", "payment")


# --- the pruning SQL of docs/saga-logs.md, on real saga logs ------------------------------


async def _noop(ctx: Any) -> None:
    return None


SAGA = SagaDefinition("prune", [Step("a", _noop)])
OLD = 31 * 86400  # seconds: older than the 30 days the SQL keeps


async def _fill(url: str) -> None:
    """Sagas old-done, new-done and old-running (left running: a lease given up)."""
    async with Orchestrator(url, sagas=[SAGA]) as orchestrator:
        for saga_id in ("old-done", "new-done"):
            assert (await orchestrator.run(SAGA, saga_id)).ok
    log = Orchestrator(url)
    try:
        await log.start(SAGA, "old-running")
    finally:
        await log.close()


async def _rerun(url: str) -> bool:
    orchestrator = Orchestrator(url, sagas=[SAGA])
    try:
        return await orchestrator.start(SAGA, "old-done")  # True: a new saga
    finally:
        await orchestrator.close()


def test_the_sqlite_pruning_sql_deletes_only_old_finished_sagas(tmp_path: Path) -> None:
    [prune] = [sql for sql in blocks(ROOT / "docs" / "saga-logs.md", "sql") if "BEGIN" in sql]
    path = tmp_path / "sagas.db"
    url = f"sqlite:///{path}"
    asyncio.run(_fill(url))
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute(
            "UPDATE sagas SET updated_at = ? WHERE saga_id IN ('old-done', 'old-running')",
            (time.time() - OLD,),
        )
        db.executescript(prune)
        kept = sorted(row[0] for row in db.execute("SELECT saga_id FROM sagas"))
        records = {row[0] for row in db.execute("SELECT saga_id FROM records")}
    finally:
        db.close()
    assert kept == ["new-done", "old-running"]
    assert records == {"new-done", "old-running"}
    assert asyncio.run(_rerun(url)) is True  # "A pruned saga id is unknown again"


def test_the_postgres_pruning_sql_deletes_only_old_finished_sagas(postgres_url: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    [prune] = [sql for sql in blocks(ROOT / "docs" / "saga-logs.md", "sql") if "WITH" in sql]
    asyncio.run(_fill(postgres_url))

    async def prune_and_read() -> tuple[list[str], set[str]]:
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(
                "UPDATE sagakit_sagas SET updated_at = now() - interval '31 days'"
                " WHERE saga_id IN ('old-done', 'old-running')"
            )
            await conn.execute(prune)
            kept = sorted(r[0] for r in await conn.fetch("SELECT saga_id FROM sagakit_sagas"))
            rows = await conn.fetch("SELECT saga_id FROM sagakit_records")
            return kept, {r[0] for r in rows}
        finally:
            await conn.close()

    kept, records = asyncio.run(prune_and_read())
    assert kept == ["new-done", "old-running"]
    assert records == {"new-done", "old-running"}
    assert asyncio.run(_rerun(postgres_url)) is True


LINKING = [*PAGES, ROOT / "BENCHMARKS.md"]


@pytest.mark.parametrize("page", LINKING, ids=[page.name for page in LINKING])
def test_links_to_headings_lead_to_headings_that_exist(page: Path) -> None:
    # test_readme.py checks that linked files exist; the part after "#" went unchecked.
    for target, anchor in re.findall(r"\]\(([^)#:]*)#([^)]+)\)", page.read_text()):
        linked = (page.parent / target) if target else page
        headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
        slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
        assert anchor in slugs, f"{page.name} links to {target}#{anchor}, no such heading"
