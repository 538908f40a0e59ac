"""The ``sagakit`` command: the demo's sagas, and the CLI run as users run it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import sagakit
from sagakit.cli.demo import SummaryRow, run_demo

# The console script the editable install puts beside the interpreter; without
# it (an uninstalled checkout), the module form runs the same main().
_SCRIPT = Path(sys.executable).with_name("sagakit")
SAGAKIT = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "sagakit.cli"]

EXECUTE = {
    "src": "c1",
    "dest": "saga",
    "body": {"type": "execute", "msg_id": 1, "saga_id": "s1", "steps": ["a", "b"]},
}
EXECUTE_REPLY = (
    '{"src": "saga", "dest": "c1", "body": {"type": "saga_completed", "in_reply_to": 1, '
    '"saga_id": "s1", "state": "completed", "completed_steps": 2}}'
)


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    # UTF-8 whatever the runner's locale, so the output's symbols are the ones asserted.
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [*SAGAKIT, *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=60,
        check=False,
    )


class DemoRun:
    def __init__(self, rows: list[SummaryRow], text: str) -> None:
        self.rows = {row.saga: row for row in rows}
        self.order = [row.saga for row in rows]
        self.text = text

    def section(self, saga_id: str) -> list[str]:
        """The timeline lines of one saga: from its title to the blank line after it."""
        lines = self.text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(f"{saga_id}  "))
        end = lines.index("", start)
        return [line.strip() for line in lines[start + 1 : end]]


@pytest.fixture(scope="module")
def demo() -> DemoRun:
    console = Console(record=True, width=120, file=io.StringIO())
    rows = run_demo(console)
    return DemoRun(rows, console.export_text())


def test_the_demo_runs_five_sagas_in_order(demo: DemoRun) -> None:
    assert demo.order == [
        "trip-lisbon",
        "trip-reykjavik",
        "order-ok",
        "order-declined",
        "order-unshippable",
    ]
    assert [demo.rows[s].style for s in demo.order] == ["orchestration"] * 2 + ["choreography"] * 3


def test_successful_booking_completes_all_three_steps(demo: DemoRun) -> None:
    row = demo.rows["trip-lisbon"]
    assert row.outcome == "completed"
    assert row.steps_done == ("book_flight", "book_hotel", "book_car")
    assert row.compensations == ()
    lines = demo.section("trip-lisbon")
    assert lines[0].startswith("▶ booking")
    assert "✔ book_flight completed confirmation=FL-101" in [" ".join(x.split()) for x in lines]
    assert lines[-1].split() == ["■", "booking", "completed"]


def test_failed_booking_is_compensated_newest_step_first(demo: DemoRun) -> None:
    row = demo.rows["trip-reykjavik"]
    assert row.outcome == "compensated"
    assert row.steps_done == ("book_flight", "book_hotel")
    assert list(row.compensations) == ["book_hotel", "book_flight"]
    lines = [" ".join(line.split()) for line in demo.section("trip-reykjavik")]
    failed = lines.index("✘ book_car failed NoCarsAvailable: no cars left in Reykjavik")
    assert lines[failed + 1 :] == [
        "○ cancel_hotel started",
        "↩ cancel_hotel completed undid book_hotel (confirmation=HT-102)",
        "○ cancel_flight started",
        "↩ cancel_flight completed undid book_flight (confirmation=FL-102)",
        "■ booking compensated",
    ]
    # The compensations cancelled the failed trip's bookings; the other trip's stand.
    assert "Bookings the agency still holds: CR-101, FL-101, HT-101" in demo.text


def test_successful_order_completes(demo: DemoRun) -> None:
    row = demo.rows["order-ok"]
    assert row.outcome == "completed"
    assert row.steps_done == ("InventoryReserved", "PaymentCharged", "ShipmentCreated")
    assert row.compensations == ()
    assert [" ".join(line.split()) for line in demo.section("order-ok")] == [
        "✔ inventory → InventoryReserved reservation_id=r1 sku=book-42 quantity=1",
        "✔ payment → PaymentCharged payment_id=p1 amount=99.99",
        "✔ shipping → ShipmentCreated shipment_id=s1",
        "■ completed",
    ]


def test_declined_payment_releases_the_inventory(demo: DemoRun) -> None:
    row = demo.rows["order-declined"]
    assert row.outcome == "compensated"
    assert row.steps_done == ("InventoryReserved",)
    assert row.compensations == ("InventoryReleased",)
    assert [" ".join(line.split()) for line in demo.section("order-declined")] == [
        "✔ inventory → InventoryReserved reservation_id=r2 sku=book-42 quantity=1",
        "✘ payment → PaymentFailed reason=insufficient_funds",
        "↩ inventory → InventoryReleased reservation_id=r2",
        "■ compensated",
    ]


def test_failed_shipping_refunds_then_releases(demo: DemoRun) -> None:
    row = demo.rows["order-unshippable"]
    assert row.outcome == "compensated"
    assert row.steps_done == ("InventoryReserved", "PaymentCharged")
    assert row.compensations == ("PaymentRefunded", "InventoryReleased")
    assert [" ".join(line.split()) for line in demo.section("order-unshippable")] == [
        "✔ inventory → InventoryReserved reservation_id=r3 sku=book-42 quantity=1",
        "✔ payment → PaymentCharged payment_id=p2 amount=99.99",
        "✘ shipping → ShipmentFailed reason=no_carrier_available",
        "↩ payment → PaymentRefunded payment_id=p2 amount=99.99",
        "↩ inventory → InventoryReleased reservation_id=r3",
        "■ compensated",
    ]


def test_summary_table_lists_every_saga(demo: DemoRun) -> None:
    summary = demo.text[demo.text.index("Summary") :]
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in summary.splitlines()]
    body = [row for row in cells if row and row[0]]
    assert body == [
        ["trip-lisbon", "orchestration", "completed", "3", "—"],
        ["trip-reykjavik", "orchestration", "compensated", "2", "book_hotel"],
        ["order-ok", "choreography", "completed", "3", "—"],
        ["order-declined", "choreography", "compensated", "1", "InventoryReleased"],
        ["order-unshippable", "choreography", "compensated", "2", "PaymentRefunded"],
    ]


def test_the_demo_is_the_same_every_run(demo: DemoRun) -> None:
    console = Console(record=True, width=120, file=io.StringIO())
    run_demo(console)
    assert console.export_text() == demo.text


def test_demo_command_prints_timelines_and_summary_on_a_pipe() -> None:
    done = run("demo")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    out = done.stdout
    # Not a terminal: rich writes plain text, with no escape codes.
    assert "\x1b[" not in out
    assert "Summary" in out
    for saga_id in ("trip-lisbon", "trip-reykjavik", "order-ok", "order-declined"):
        assert f"│ {saga_id} " in out
    assert out.index("Summary") > out.index("order-unshippable  order saga")


def test_node_command_serves_the_protocol_on_stdout_only() -> None:
    done = run("node", stdin=json.dumps(EXECUTE) + "\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == EXECUTE_REPLY + "\n"


def test_node_command_does_not_load_rich() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sagakit.cli", "node"],
        input="",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert "sagakit.node.runner" in imported
    assert not {m for m in imported if m == "rich" or m.startswith("rich.")}


def test_version() -> None:
    done = run("--version")
    assert done.returncode == 0
    assert done.stdout == f"{sagakit.__version__}\n"
    assert sagakit.__version__ == "0.1.0"


def test_help_lists_the_commands() -> None:
    done = run("--help")
    assert done.returncode == 0
    assert "demo" in done.stdout
    assert "node" in done.stdout
