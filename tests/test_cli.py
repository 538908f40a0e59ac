"""The ``sagakit`` command: the demo's sagas, and the CLI run as users run it."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

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


def test_the_demo_runs_six_sagas_in_order(demo: DemoRun) -> None:
    assert demo.order == [
        "trip-lisbon",
        "trip-reykjavik",
        "trip-durable",
        "order-ok",
        "order-declined",
        "order-unshippable",
    ]
    assert [demo.rows[s].style for s in demo.order] == ["orchestration"] * 3 + ["choreography"] * 3


def test_a_saga_whose_worker_was_killed_is_finished_by_another(demo: DemoRun) -> None:
    row = demo.rows["trip-durable"]
    assert row.outcome == "completed"
    assert row.steps_done == ("book_flight", "book_hotel", "book_car")
    text = demo.text[demo.text.index("Durability") : demo.text.index("Choreography")]
    assert "killed (SIGKILL) while booking the hotel" in text
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines()]
    hotel = [r[1:4] for r in rows if len(r) > 3 and r[2] == "book_hotel"]
    # Announced a second time, as attempt 2, by the worker that took it over.
    assert hotel == [
        ["started", "book_hotel", "1"],
        ["started", "book_hotel", "2"],
        ["completed", "book_hotel", ""],
    ]


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
        ["trip-durable", "orchestration", "completed", "3", "—"],
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


def test_node_command_names_itself_in_its_help_and_usage_errors() -> None:
    # Its options are python3 main.py's, parsed by the same code: the usage
    # line must name the command the user typed.
    done = run("node", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: sagakit node ")
    assert "--store URL" in done.stdout
    done = run("node", "--no-such-option", stdin="")
    assert done.returncode == 2
    assert "sagakit node: error: unrecognized arguments: --no-such-option" in done.stderr


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


def test_worker_options_default_to_what_the_orchestrator_does() -> None:
    # --lease-ttl showed no default in --help; it is now shown, so it must be the real one.
    import inspect

    import typer.main

    from sagakit.cli import app
    from sagakit.orchestration import Orchestrator

    worker = typer.main.get_command(app).commands["worker"]  # type: ignore[attr-defined]
    defaults = {param.name: param.default for param in worker.params}
    api = inspect.signature(Orchestrator.__init__).parameters
    serve = inspect.signature(Orchestrator.serve).parameters
    assert defaults["lease_ttl"] == api["lease_ttl"].default
    assert defaults["concurrency"] == serve["concurrency"].default


# --- sagakit dlq, and the demo on a named bus ---------------------------------------------


def _dead_letters_on(url: str, count: int) -> list[str]:
    """Leave ``count`` dead letters in group "payment" of the shared bus ``url``; their ids."""
    from sagakit import Event, open_event_bus

    async def fill() -> list[str]:
        bus = open_event_bus(url)

        def decline(event: Event) -> None:
            raise RuntimeError(f"card declined\nfor {event.saga_id}")

        subscription = await bus.subscribe(
            "PaymentRequested", decline, group="payment", max_deliveries=2, backoff=0.0
        )
        for i in range(count):
            await bus.publish(Event("PaymentRequested", f"o-{i}", {"n": i}, source="shop"))
        await bus.drain()
        await subscription.cancel()
        _KEEP.append(bus)  # the named broker lives while a bus refers to it
        return [d.id for d in await bus.dead_letters("payment")]

    return asyncio.run(fill())


_KEEP: list[object] = []


def _cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from sagakit.cli import app

    return CliRunner().invoke(app, list(args))


def test_dlq_list_shows_each_dead_letter() -> None:
    url = f"memory://dlq-{uuid.uuid4().hex}"
    ids = _dead_letters_on(url, 2)
    done = _cli("dlq", "list", "--bus", url, "--group", "payment")
    assert done.exit_code == 0, done.output
    out = done.output
    assert "2 dead letter(s) in group 'payment'" in out
    for letter_id, saga_id in zip(ids, ("o-0", "o-1"), strict=True):
        assert f"{letter_id}  PaymentRequested  saga {saga_id}" in out
    assert "after 2 deliveries from shop" in out
    assert "error: RuntimeError: card declined for o-0" in out  # one line, whatever the error
    limited = _cli("dlq", "list", "--bus", url, "--group", "payment", "--limit", "1")
    assert "1 dead letter(s)" in limited.output


def test_dlq_list_json_lines() -> None:
    url = f"memory://dlq-{uuid.uuid4().hex}"
    ids = _dead_letters_on(url, 2)
    done = _cli("dlq", "list", "--bus", url, "--group", "payment", "--json")
    assert done.exit_code == 0, done.output
    entries = [json.loads(line) for line in done.output.splitlines()]
    assert [e["id"] for e in entries] == ids
    assert entries[0]["group"] == "payment"
    assert entries[0]["deliveries"] == 2
    assert entries[0]["event"]["v"] == 1
    assert entries[0]["event"]["saga_id"] == "o-0"
    assert entries[0]["event"]["payload"] == {"n": 0}


def test_dlq_list_of_an_empty_group() -> None:
    done = _cli("dlq", "list", "--bus", "memory://", "--group", "payment")
    assert done.exit_code == 0
    assert "no dead letters in group 'payment' on memory://" in done.output


def test_dlq_replay_delivers_again_and_removes() -> None:
    from sagakit import Event, open_event_bus

    url = f"memory://dlq-{uuid.uuid4().hex}"
    first, second = _dead_letters_on(url, 2)
    done = _cli("dlq", "replay", "--bus", url, "--group", "payment", first)
    assert done.exit_code == 0, done.output
    assert f"replayed {first} to group 'payment'" in done.output

    async def consume() -> tuple[list[Event], list[str]]:
        bus = open_event_bus(url)
        got: list[Event] = []
        await bus.subscribe("PaymentRequested", got.append, group="payment")
        await bus.drain()
        left = [d.id for d in await bus.dead_letters("payment")]
        await bus.close()
        return got, left

    got, left = asyncio.run(consume())
    assert [e.saga_id for e in got] == ["o-0"]
    assert left == [second]
    again = _cli("dlq", "replay", "--bus", url, "--group", "payment", "--all")
    assert again.exit_code == 0, again.output
    assert f"replayed {second}" in again.output
    assert _cli("dlq", "replay", "--bus", url, "--group", "payment", "--all").output.startswith(
        "no dead letters"
    )


def test_dlq_replay_of_an_unknown_id_fails() -> None:
    done = run("dlq", "replay", "--bus", "memory://", "--group", "payment", "dl-404")
    assert done.returncode == 1
    assert "dead_letter_id" in done.stderr
    assert "dl-404" in done.stderr


def test_dlq_replay_needs_ids_or_all() -> None:
    assert _cli("dlq", "replay", "--bus", "memory://", "--group", "g").exit_code == 2
    both = _cli("dlq", "replay", "--bus", "memory://", "--group", "g", "--all", "dl-1")
    assert both.exit_code == 2


def test_dlq_with_an_unusable_bus_says_why() -> None:
    done = run("dlq", "list", "--bus", "carrier-pigeon://coop", "--group", "g")
    assert done.returncode == 2
    assert "no event bus backend for carrier-pigeon://" in done.stderr


def test_urls_are_printed_without_their_password() -> None:
    from sagakit.cli.dlq import redact

    assert redact("amqp://guest:s3cret@host:5672/vh") == "amqp://guest:***@host:5672/vh"
    assert redact("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
    assert "s3cret" not in redact("redis://:s3cret@h/0")


def test_demo_on_a_named_bus_prints_the_same_choreography(demo: DemoRun) -> None:
    console = Console(record=True, width=120, file=io.StringIO())
    url = f"memory://demo-{uuid.uuid4().hex}"
    run_demo(console, bus_url=url)
    text = console.export_text()
    assert "services over an in-memory bus" in text
    for saga_id in ("order-ok", "order-declined", "order-unshippable"):
        assert DemoRun([], text).section(saga_id) == demo.section(saga_id)


def test_demo_with_an_unusable_bus_says_why() -> None:
    done = run("demo", "--bus", "carrier-pigeon://coop")
    assert done.returncode == 2
    assert "sagakit demo: no event bus backend for carrier-pigeon://" in done.stderr


def test_demo_on_an_unreachable_broker_fails_before_running_anything() -> None:
    # Nothing listens on port 1: the demo says so at once, instead of running the
    # orchestration and durability parts (seconds, a worker killed) for nothing.
    done = run("demo", "--bus", "redis://127.0.0.1:1/0")
    assert done.returncode == 2
    assert "sagakit demo: redis://127.0.0.1:1" in done.stderr
    assert "Orchestration" not in done.stdout
    assert "Durability" not in done.stdout


def test_dlq_replay_all_goes_past_a_dead_letter_that_cannot_be_replayed(
    nats_server: Any,
) -> None:
    """One unreplayable dead letter (here a record that is not one) used to end ``--all``
    at it, leaving every dead letter behind it where it was, for ever."""
    import nats

    from sagakit import Event, open_event_bus

    url = f"{nats_server.url}?prefix=dlq{uuid.uuid4().hex[:12]}"
    prefix = url.rsplit("prefix=", 1)[1]

    async def fill() -> None:
        bus = open_event_bus(url)

        def decline(event: Event) -> None:
            raise RuntimeError("card declined")

        await bus.subscribe("PaymentRequested", decline, group="payment", max_deliveries=1)
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().publish(f"{prefix}.dlq.payment", b"not a dead letter")
        await nc.close()
        await bus.publish(Event("PaymentRequested", "o-1", source="shop"))
        async with asyncio.timeout(20):
            while len(await bus.dead_letters("payment")) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await bus.close()

    asyncio.run(fill())
    done = run("dlq", "replay", "--bus", url, "--group", "payment", "--all")
    assert done.returncode == 1
    assert "corrupt" in done.stderr
    assert done.stdout.count("replayed ") == 1
    listed = run("dlq", "list", "--bus", url, "--group", "payment", "--json")
    [left] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert left["event"]["type"] == "sagakit.Undecodable"


@pytest.mark.parametrize("server", ["nats_server", "redis_server", "amqp_server"])
def test_dlq_on_a_broker(server: str, request: pytest.FixtureRequest) -> None:
    """List and replay from a shell the dead letters another process left on a real broker."""
    from sagakit import Event, open_event_bus

    base = request.getfixturevalue(server).url
    url = f"{base}{'&' if '?' in base else '?'}prefix=dlq{uuid.uuid4().hex[:12]}"

    async def fill() -> list[str]:
        bus = open_event_bus(url)

        def decline(event: Event) -> None:
            raise RuntimeError("card declined")

        await bus.subscribe(
            "PaymentRequested", decline, group="payment", max_deliveries=1, backoff=0.05
        )
        for i in range(2):
            await bus.publish(Event("PaymentRequested", f"o-{i}", {"n": i}, source="shop"))
        async with asyncio.timeout(20):
            while len(await bus.dead_letters("payment")) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        ids = [d.id for d in await bus.dead_letters("payment")]
        await bus.close()
        return ids

    first, second = asyncio.run(fill())
    listed = run("dlq", "list", "--bus", url, "--group", "payment", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [e["id"] for e in entries] == [first, second]
    # The two sagas' events fail concurrently (a task per saga on Redis): they reach the
    # dead letters in either order, which the listing keeps.
    assert sorted(e["event"]["saga_id"] for e in entries) == ["o-0", "o-1"]
    first_saga = entries[0]["event"]["saga_id"]
    assert entries[0]["error"] == "RuntimeError: card declined"
    replayed = run("dlq", "replay", "--bus", url, "--group", "payment", first)
    assert replayed.returncode == 0, replayed.stderr

    async def consume() -> tuple[list[Event], list[str]]:
        bus = open_event_bus(url)
        got: list[Event] = []
        await bus.subscribe("PaymentRequested", got.append, group="payment")
        async with asyncio.timeout(20):
            while not got:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        left = [d.id for d in await bus.dead_letters("payment")]
        await bus.close()
        return got, left

    got, left = asyncio.run(consume())
    assert [e.saga_id for e in got] == [first_saga]
    assert left == [second]
    unknown = run("dlq", "replay", "--bus", url, "--group", "payment", first)
    assert unknown.returncode == 1
    cleanup = getattr(request.getfixturevalue(server), "delete_namespace", None)
    if cleanup is not None:  # a shared server: leave nothing behind
        asyncio.run(cleanup(url.rsplit("prefix=", 1)[1]))


async def _broker_state(server: str, url: str, prefix: str) -> list[str]:
    """What the broker holds under ``prefix``: streams, keys, or the events exchange."""
    if server == "nats_server":
        import nats

        nc = await nats.connect(url.split("?", 1)[0])
        try:
            streams = await nc.jetstream().streams_info()
        finally:
            await nc.close()
        return [s.config.name or "" for s in streams if (s.config.name or "").startswith(prefix)]
    if server == "redis_server":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url.split("?", 1)[0])
        try:
            return [k.decode() for k in await client.keys(f"{prefix}*")]
        finally:
            await client.aclose()
    import aio_pika
    import aiormq.exceptions

    connection = await aio_pika.connect(url.split("?", 1)[0])
    try:
        channel = await connection.channel()
        try:
            await channel.declare_exchange(f"{prefix}.events", passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return []
        return [f"exchange {prefix}.events"]
    finally:
        await connection.close()


@pytest.mark.parametrize("server", ["nats_server", "redis_server", "amqp_server"])
def test_dlq_list_on_a_broker_with_none_creates_nothing(
    server: str, request: pytest.FixtureRequest
) -> None:
    """A look is read-only: listing made the NATS streams and the RabbitMQ exchange."""
    base = request.getfixturevalue(server).url
    prefix = f"look{uuid.uuid4().hex[:12]}"
    url = f"{base}{'&' if '?' in base else '?'}prefix={prefix}"
    listed = run("dlq", "list", "--bus", url, "--group", "payment")
    assert listed.returncode == 0, listed.stderr
    assert "no dead letters in group 'payment'" in listed.stdout
    assert asyncio.run(_broker_state(server, base, prefix)) == []
