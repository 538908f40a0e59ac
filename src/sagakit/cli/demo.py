"""``sagakit demo``: both saga styles, each succeeding and failing, all in memory.

Two trips are booked by an orchestrator (one runs out of cars and is undone
step by step), and three orders go through the e-commerce choreography (one
paid for, one declined by payment, one that no carrier will ship). No servers,
no flags, no randomness in what is shown: every run prints the same thing.
``sagakit demo --bus URL`` runs the choreographed orders on that event bus
(a broker) instead of in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from itertools import count
from typing import Any

from rich.console import Console
from rich.text import Text

from sagakit.adapters import open_event_bus
from sagakit.adapters.memory_bus import DeliveryFailure
from sagakit.choreography.ecommerce import STATUS_AFTER, Shop, open_shop
from sagakit.cli.demo_durable import run_durability
from sagakit.cli.dlq import redact
from sagakit.cli.render import (
    Role,
    SummaryRow,
    Symbols,
    choreography_timeline,
    classify,
    orchestration_timeline,
    summary_table,
    symbols_for,
)
from sagakit.core.saga import SagaDefinition, Step, StepContext
from sagakit.orchestration import Orchestrator
from sagakit.ports.event_bus import EventBus

__all__ = ["NoCarsAvailable", "SummaryRow", "TravelAgency", "run_demo"]


class NoCarsAvailable(Exception):
    """The car rental has nothing left at the destination."""


class TravelAgency:
    """Flights, hotels and cars, kept in memory, with confirmations numbered in order.

    What is booked stays in :attr:`booked`, so the demo can show that the failed
    trip's compensations really cancelled its bookings.
    """

    PREFIXES: Mapping[str, str] = {"flight": "FL", "hotel": "HT", "car": "CR"}

    def __init__(self, cars: Mapping[str, int]) -> None:
        self.cars = dict(cars)
        self.booked: dict[str, str] = {}  # confirmation -> saga id
        self._serials = {kind: count(101) for kind in self.PREFIXES}

    def _book(self, kind: str, ctx: StepContext) -> dict[str, str]:
        confirmation = f"{self.PREFIXES[kind]}-{next(self._serials[kind])}"
        self.booked[confirmation] = ctx.saga_id
        return {"confirmation": confirmation}

    def _cancel(self, ctx: StepContext) -> None:
        # A compensation finds what its own step did in ctx.result; pop, not del,
        # because a compensation that runs again after a crash must still succeed.
        self.booked.pop(ctx.result["confirmation"], None)

    async def book_flight(self, ctx: StepContext) -> dict[str, str]:
        return self._book("flight", ctx)

    async def book_hotel(self, ctx: StepContext) -> dict[str, str]:
        return self._book("hotel", ctx)

    async def book_car(self, ctx: StepContext) -> dict[str, str]:
        city = ctx.data["destination"]
        if self.cars.get(city, 0) < 1:
            raise NoCarsAvailable(f"no cars left in {city}")
        self.cars[city] -= 1
        return self._book("car", ctx)

    async def cancel_flight(self, ctx: StepContext) -> None:
        self._cancel(ctx)

    async def cancel_hotel(self, ctx: StepContext) -> None:
        self._cancel(ctx)

    async def cancel_car(self, ctx: StepContext) -> None:
        self.cars[ctx.data["destination"]] += 1
        self._cancel(ctx)

    def booking_saga(self) -> SagaDefinition:
        return SagaDefinition(
            "booking",
            [
                Step("book_flight", self.book_flight, self.cancel_flight),
                Step("book_hotel", self.book_hotel, self.cancel_hotel),
                Step("book_car", self.book_car, self.cancel_car),
            ],
        )


TRIPS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("trip-lisbon", {"traveller": "ada", "destination": "Lisbon", "nights": 3}),
    ("trip-reykjavik", {"traveller": "alan", "destination": "Reykjavik", "nights": 2}),
)

# (saga id, service told to fail it, if any); faults are injected, not random.
ORDERS: tuple[tuple[str, str | None], ...] = (
    ("order-ok", None),
    ("order-declined", "payment"),
    ("order-unshippable", "shipping"),
)


async def _orchestration(console: Console, symbols: Symbols) -> list[SummaryRow]:
    agency = TravelAgency(cars={"Lisbon": 2, "Reykjavik": 0})
    saga = agency.booking_saga()
    orchestrator = Orchestrator("memory://")
    rows = []
    try:
        for saga_id, data in TRIPS:
            outcome = await orchestrator.run(saga, saga_id, data)
            records = await orchestrator.log.read(saga_id)
            console.print(orchestration_timeline(saga_id, saga, records, symbols))
            console.print()
            rows.append(
                SummaryRow(
                    saga_id,
                    "orchestration",
                    outcome.state.value,
                    outcome.completed_steps,
                    outcome.compensated_steps,
                )
            )
    finally:
        await orchestrator.log.close()
    held = ", ".join(sorted(agency.booked)) or symbols.none
    console.print(Text(f"Bookings the agency still holds: {held}", style="dim"))
    return rows


# How long the choreography may take on a broker before the demo gives up waiting.
SETTLE_TIMEOUT = 30.0


async def _settle(bus: EventBus, shop: Shop) -> list[str]:
    """Wait until every order's saga is finished; the ids of those that did not."""

    def unfinished() -> list[str]:
        sagas = shop.tracker.sagas
        return [s for s, _ in ORDERS if s not in sagas or not sagas[s].status.is_final]

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(SETTLE_TIMEOUT):
            await bus.drain()
            # A broker's deliveries may still be on their way when drain returns,
            # and the tracker has no event to wait on: look again shortly.
            while unfinished():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    return unfinished()


async def _choreography(
    console: Console, symbols: Symbols, bus: EventBus, shop: Shop, bus_url: str
) -> list[SummaryRow]:
    for saga_id, failing in ORDERS:
        if failing is not None:
            shop.faults.fail(saga_id, failing)
    # All orders are placed before any is handled, as concurrent customers would:
    # the bus interleaves their events, and the tracker sorts them out per saga.
    for saga_id, _ in ORDERS:
        await shop.order(saga_id, "book-42")
    stuck = await _settle(bus, shop)
    for saga_id in stuck:
        console.print(
            Text(f"{saga_id} did not finish within {SETTLE_TIMEOUT:.0f}s on {redact(bus_url)}"),
            style="bold red",
        )

    rows = []
    for saga_id, _ in ORDERS:
        if saga_id not in shop.tracker.sagas:
            continue
        tracked = shop.tracker[saga_id]
        events = classify(tracked.events, STATUS_AFTER)
        console.print(choreography_timeline(saga_id, "order", events, tracked.status, symbols))
        console.print()
        rows.append(
            SummaryRow(
                saga_id,
                "choreography",
                tracked.status.value,
                tuple(e.type for e, role in events if role is Role.FORWARD),
                tuple(e.type for e, role in events if role is Role.COMPENSATION),
            )
        )
    # A handler that raised is a bug in a service, not a business failure: say so.
    # (A broker bus logs its handlers' failures instead.)
    failures: list[DeliveryFailure] = getattr(bus, "failures", [])
    for failure in failures:
        console.print(
            Text(f"handler {failure.handler} failed on {failure.event.type}: {failure.error}"),
            style="bold red",
        )
    return rows


async def _demo(console: Console, bus_url: str = "memory://") -> list[SummaryRow]:
    symbols = symbols_for(console)
    in_memory = bus_url.startswith("memory:")
    where = (
        ": six sagas, in memory and on an SQLite file; no servers to start."
        if in_memory
        else f": six sagas, the orchestrated in memory and on SQLite, the choreographed over "
        f"{redact(bus_url)}."
    )
    console.print(Text.assemble(("sagakit demo", "bold"), where))
    console.print()
    bus = open_event_bus(bus_url)
    try:
        # The shop's services subscribe first: a bus that cannot be used fails the
        # demo now, not after the orchestration part has run for seconds.
        shop = await open_shop(bus)
        console.rule("Orchestration: booking a trip (Orchestrator over memory://)", style="cyan")
        rows = await _orchestration(console, symbols)
        console.print()
        console.rule(
            "Durability: a worker killed mid-saga, another one finishing it (SQLite)", style="cyan"
        )
        saga_id, state, completed = await run_durability(console)
        rows.append(SummaryRow(saga_id, "orchestration", state, completed, ()))
        console.print()
        over = "an in-memory bus" if in_memory else redact(bus_url)
        console.rule(f"Choreography: placing an order (services over {over})", style="cyan")
        rows += await _choreography(console, symbols, bus, shop, bus_url)
    finally:
        await bus.close()
    console.print(summary_table(rows, symbols))
    return rows


def run_demo(console: Console | None = None, bus_url: str = "memory://") -> list[SummaryRow]:
    """Run the demo's six sagas, print their timelines and summary, and return the summary.

    ``bus_url`` names the event bus the choreographed orders run on.
    """
    return asyncio.run(_demo(console or Console(), bus_url))
