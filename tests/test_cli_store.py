"""``sagakit sagas list|show`` and ``sagakit worker``, run as users run them, on an SQLite file."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from saga_logs import start_in
from test_cli import SAGAKIT, run

from sagakit import Orchestrator, SagaDefinition, Step, StepContext
from sagakit.adapters import open_saga_log
from sagakit.cli.worker import load_sagas
from sagakit.core.records import StepStarted
from sagakit.errors import ConfigurationError

ROOT = Path(__file__).resolve().parent.parent


async def _charge(ctx: StepContext) -> dict[str, int]:
    if ctx.data.get("broke"):
        raise RuntimeError("card declined")
    return {"amount": 42}


async def _refund(ctx: StepContext) -> None:
    return None


SHOP = SagaDefinition("shop", [Step("reserve", _refund, _refund), Step("charge", _charge, _refund)])


async def _hang_first_time(ctx: StepContext) -> None:
    if ctx.attempt == 1:
        await asyncio.sleep(600)  # until the test kills its worker


SLOW = SagaDefinition("slow", [Step("a", _refund), Step("b", _hang_first_time)])


def _block(ctx: StepContext) -> None:
    time.sleep(600)  # a plain function that blocks the event loop, until the test ends it


BLOCKING = SagaDefinition("blocking", [Step("a", _block)])


@pytest.fixture
def store(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'sagas.db'}"

    async def fill() -> None:
        orchestrator = Orchestrator(url, sagas=[SHOP])
        try:
            await orchestrator.run(SHOP, "order-1", {"sku": "book"})
            await orchestrator.run(SHOP, "order-2", {"broke": True})
            await orchestrator.start(SHOP, "order-3", {"sku": "pen"})
        finally:
            await orchestrator.close()
            await orchestrator.log.close()

    asyncio.run(fill())
    return url


def test_list_shows_every_saga_newest_first(store: str) -> None:
    done = run("sagas", "list", "--store", store)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if "order-" in line]
    assert [row.split("│")[1].strip() for row in rows] == ["order-3", "order-2", "order-1"]
    assert "compensated" in rows[1]
    assert "completed" in rows[2]
    assert "running" in rows[0]


def test_list_on_a_narrow_terminal_keeps_ids_and_times_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At 80 columns a long saga id ended in "..." (unusable in `sagas show`), and
    # so did every updated time. Cells may fold onto more lines; nothing is cut.
    url = f"sqlite:///{tmp_path / 'sagas.db'}"
    saga_id = "order-2026-11-30-customer-1234567890-abcdef"

    async def fill() -> None:
        orchestrator = Orchestrator(url, sagas=[SHOP], owner="worker-" + "w" * 40)
        try:
            await orchestrator.run(SHOP, saga_id, {"sku": "book"})
        finally:
            await orchestrator.close()

    asyncio.run(fill())
    monkeypatch.setenv("COLUMNS", "80")
    done = run("sagas", "list", "--store", url)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("│")]
    assert "".join(row.split("│")[1].strip() for row in rows) == saga_id
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", done.stdout)
    assert "…" not in done.stdout
    assert max(len(line) for line in done.stdout.splitlines()) <= 80


def test_list_filters_by_status(store: str) -> None:
    done = run("sagas", "list", "--store", store, "--status", "completed,compensated")
    assert done.returncode == 0, done.stderr
    assert "order-1" in done.stdout
    assert "order-2" in done.stdout
    assert "order-3" not in done.stdout


def test_list_refuses_an_unknown_status(store: str) -> None:
    done = run("sagas", "list", "--store", store, "--status", "done")
    assert done.returncode == 2
    assert "unknown status done" in done.stderr


def test_show_gives_the_timeline_with_results_and_errors(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps long cells to the terminal's width
    done = run("sagas", "show", "order-2", "--store", store)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for expected in ("saga started", "failed", "RuntimeError: card declined", "undone", "saga"):
        assert expected in out
    assert out.index("failed") < out.index("undone")


def test_show_of_an_unknown_saga_says_so(store: str) -> None:
    done = run("sagas", "show", "nope", "--store", store)
    assert done.returncode == 1
    assert "no saga 'nope'" in done.stderr


def test_a_bad_store_url_is_a_clear_error() -> None:
    done = run("sagas", "list", "--store", "mysql://x")
    assert done.returncode == 2
    assert "no saga log backend for mysql://" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [("list",), ("show", "order-1")])
def test_reading_a_missing_sqlite_file_is_an_error_and_creates_nothing(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    # A typo in the path must not list an empty log and leave a new file behind.
    missing = tmp_path / "typo.db"
    done = run("sagas", *command, "--store", f"sqlite:///{missing}")
    assert done.returncode == 2, done.stdout
    assert f"no saga log at {missing}" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("nocolon", "expected package.module:NAME"),
        ("no_such_module_x:SAGAS", "cannot import"),
        ("test_cli_store:MISSING", "has no MISSING"),
        ("test_cli_store:ROOT", "must be a SagaDefinition or a list"),
    ],
)
def test_worker_refuses_what_is_not_a_saga(spec: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        load_sagas(spec)


def test_worker_loads_one_definition_or_a_list() -> None:
    assert load_sagas("test_cli_store:SHOP") == [SHOP]
    assert load_sagas("crash.sagas:SAGAS")[0].name == "crash-order"


def test_worker_runs_started_sagas_and_stops_cleanly_on_sigterm(store: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT / "src")]),
    }
    with open(tmp_path / "worker.log", "wb") as err:
        worker = subprocess.Popen(
            [*SAGAKIT, "worker", "--store", store, "--sagas", "test_cli_store:SHOP"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listed = run("sagas", "list", "--store", store, "--status", "running")
            if "order-3" not in listed.stdout:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the worker did not run the started saga")
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=30)
    said = (tmp_path / "worker.log").read_text()
    assert code == 0, said
    # Up, as whom and on what: once, at the start (the URL's password never shown).
    assert "starting: serving shop on " in said
    assert ":secret@" not in said
    shown = run("sagas", "show", "order-3", "--store", store)
    assert "saga finished" in shown.stdout
    assert "completed" in shown.stdout


def _worker(store: str, spec: str, log: Path, *options: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT / "src")])}
    with open(log, "ab") as err:
        return subprocess.Popen(
            [*SAGAKIT, "worker", "--store", store, "--sagas", spec, *options],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _until_step_runs(
    store: str, saga_id: str, step: str, worker: subprocess.Popen[bytes], log: Path
) -> None:
    """Wait (30 s at most) until the saga's timeline shows ``step`` begun, the worker alive."""
    deadline = time.monotonic() + 30
    while f"│ {step} " not in run("sagas", "show", saga_id, "--store", store).stdout:
        assert time.monotonic() < deadline, log.read_text()
        assert worker.poll() is None, log.read_text()
        time.sleep(0.1)


def test_a_second_signal_ends_a_worker_whose_step_blocks_the_loop(tmp_path: Path) -> None:
    # Both signals went to the event loop's handler, which a blocking step kept
    # from running: the worker lived on until the step returned.
    store = f"sqlite:///{tmp_path / 'sagas.db'}"

    start_in(store, BLOCKING, "blocked-1")
    log = tmp_path / "worker.log"
    worker = _worker(store, "test_cli_store:BLOCKING", log)
    try:
        _until_step_runs(store, "blocked-1", "a", worker, log)
        worker.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert worker.poll() is None  # the first signal waits for the step
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=10) == -signal.SIGTERM, log.read_text()
    finally:
        worker.kill()
        worker.wait(timeout=30)


def test_a_signal_delivered_twice_at_once_still_stops_the_worker_cleanly(tmp_path: Path) -> None:
    """GNU timeout (and a kill of the process group) sends the signal to the worker and to
    its group: two at once. Taken for an operator's second signal, it ended the worker
    as a kill does, its leases left to expire."""
    store = f"sqlite:///{tmp_path / 'sagas.db'}"
    start_in(store, SLOW, "slow-1")
    log = tmp_path / "worker.log"
    worker = _worker(store, "test_cli_store:SLOW", log)
    try:
        _until_step_runs(store, "slow-1", "b", worker, log)
        worker.send_signal(signal.SIGINT)
        worker.send_signal(signal.SIGINT)
        assert worker.wait(timeout=30) == 0, log.read_text()
    finally:
        worker.kill()
        worker.wait(timeout=30)

    async def holder() -> str | None:
        saga_log = open_saga_log(store)
        try:
            summary = await saga_log.status("slow-1")
            assert summary is not None
            return summary.owner
        finally:
            await saga_log.close()

    assert asyncio.run(holder()) is None  # given back, not left to expire


def test_a_worker_killed_and_restarted_under_its_name_carries_its_saga_on_at_once(
    tmp_path: Path,
) -> None:
    store = f"sqlite:///{tmp_path / 'sagas.db'}"

    start_in(store, SLOW, "slow-1")
    log = tmp_path / "workers.log"
    # A lease far longer than the test: only the same name can take the saga early.
    options = ("--owner", "w1", "--lease-ttl", "120")
    first = _worker(store, "test_cli_store:SLOW", log, *options)
    try:
        _until_step_runs(store, "slow-1", "b", first, log)
    finally:
        first.kill()
        first.wait(timeout=30)
    began = time.monotonic()
    second = _worker(store, "test_cli_store:SLOW", log, *options)
    try:
        while "completed" not in run("sagas", "list", "--store", store).stdout:
            assert time.monotonic() - began < 30, log.read_text()  # not after the 120 s lease
            assert second.poll() is None, log.read_text()
            time.sleep(0.1)
    finally:
        second.send_signal(signal.SIGTERM)
        code = second.wait(timeout=30)
    assert code == 0, log.read_text()

    async def records() -> list[Any]:
        saga_log = open_saga_log(store)
        try:
            return [logged.record for logged in await saga_log.history("slow-1")]
        finally:
            await saga_log.close()

    # Step b, cut off by the kill, ran again as attempt 2; nothing else did.
    started = [r for r in asyncio.run(records()) if type(r) is StepStarted]
    assert started == [StepStarted(0, 1), StepStarted(1, 1), StepStarted(1, 2)]


def test_worker_with_an_unknown_log_level_exits_2_with_one_line(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGAKIT_LOG", "verbose")
    done = run("worker", "--store", store, "--sagas", "test_cli_store:SHOP")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "sagakit worker: SAGAKIT_LOG must be debug, info, warning, error or critical, got 'verbose'"
    ]


def test_worker_with_a_bad_spec_exits_2_with_one_line(store: str) -> None:
    done = subprocess.run(
        [*SAGAKIT, "worker", "--store", store, "--sagas", "nowhere:X"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert done.returncode == 2
    assert done.stderr.startswith("sagakit worker: --sagas 'nowhere:X': cannot import")
    assert "Traceback" not in done.stderr


def _worker_refused(store: str) -> subprocess.CompletedProcess[str]:
    """``sagakit worker`` on ``store``, which it is expected to refuse and leave."""
    return subprocess.run(
        [*SAGAKIT, "worker", "--store", store, "--sagas", "test_cli_store:SHOP"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT / "src")])},
    )


def test_worker_on_a_database_that_does_not_exist_exits_2(postgres_url: str) -> None:
    """A real server refusing for good (no such database): the worker says so and
    exits, instead of logging the refusal every second for ever."""
    missing = postgres_url.rsplit("/", 1)[0] + "/sagakit_no_such_database"
    done = _worker_refused(missing)
    assert done.returncode == 2, done.stderr
    assert 'database "sagakit_no_such_database" does not exist' in done.stderr
    assert "Traceback" not in done.stderr


def test_module_is_importable_from_tests() -> None:
    assert sys.modules[__name__].SHOP is SHOP


def test_worker_on_a_sqlite_folder_that_does_not_exist_exits_2_with_one_error_line(
    tmp_path: Path,
) -> None:
    """It retried for ever, a warning a second: the missing folder was taken for a
    passing failure (SQLITE_CANTOPEN)."""
    path = tmp_path / "no" / "such" / "dir" / "sagas.db"
    done = _worker_refused(f"sqlite:///{path}")
    assert done.returncode == 2, done.stderr
    starting, line = done.stderr.strip().splitlines()
    assert "starting: serving shop on sqlite:///" in starting
    assert line.startswith("sagakit worker: ")
    assert str(path.parent) in line
    assert not path.parent.exists()


@pytest.mark.parametrize("store", ["memory://", "memory://?max_finished=10"])
def test_worker_on_an_in_memory_log_exits_2_with_one_line(store: str) -> None:
    """It served for ever and did nothing: no other process can start a saga in its memory."""
    done = _worker_refused(store)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("sagakit worker: ")
    assert "memory://" in line
    assert "sqlite:///" in line  # what to give instead
