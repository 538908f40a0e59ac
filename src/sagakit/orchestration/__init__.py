"""The orchestrator: runs saga definitions, recording every transition in a saga log.

Workers that share a log share the work: each saga is driven by the one
worker holding its lease, which it renews while it runs and gives up on a
clean stop. See :class:`Orchestrator`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

from sagakit.core.machine import (
    Begin,
    Resume,
    decide,
    initial_state,
)
from sagakit.core.outcome import SagaOutcome, outcome_of
from sagakit.core.records import (
    SagaRecord,
    SagaStarted,
    SagaStatus,
)
from sagakit.core.saga import NO_INPUT, SagaDefinition
from sagakit.errors import (
    BackendError,
    DefinitionError,
    InvalidTransition,
    LeaseLost,
    SagaError,
    SagaIdConflict,
)
from sagakit.orchestration.driver import drive
from sagakit.orchestration.leases import (
    Unrunnable,
    claim_left_behind,
    give_back,
    renew_leases,
    retrying,
    wait_for_holder,
)
from sagakit.orchestration.support import (
    Recovered,
    Run,
    RunnerCancelled,
    check_count,
    check_seconds,
    checked_input,
    checked_options,
    default_owner,
    definition_of,
    definitions_in,
    logged_outcome,
    replayed,
    saga_name,
    same_input,
    settle,
    shown,
    wait_for_run,
    wanted_status,
)
from sagakit.ports.saga_log import Claim, Journal, SagaLog, SagaSummary

__all__ = ["Orchestrator", "Recovered"]

log = logging.getLogger("sagakit.orchestrator")

T = TypeVar("T")

_INITIAL = initial_state()
# The event that begins every saga with no input: one for them all.
_BEGIN = Begin(NO_INPUT)
_run: Callable[[tuple[SagaDefinition, Mapping[str, Any]]], Run] = partial(tuple.__new__, Run)

DEFAULT_LEASE_TTL = 30.0


class Orchestrator:
    """Runs sagas step by step and compensates the completed steps when one fails.

    ``log``: a saga log or its URL (``memory://`` by default). ``sagas``: the
    definitions this orchestrator can carry on by name (for :meth:`recover`,
    :meth:`serve` and sagas :meth:`start`\\ ed elsewhere). ``owner``: the name
    its leases carry (default: host, process id and a random suffix).
    ``lease_ttl``: how long a lease lasts unless renewed (renewed every third
    of it). ``retry_for``: how long a flush, claim or renewal that failed with a
    retryable :class:`~sagakit.errors.BackendError` is retried, with backoff,
    before the error is raised (workers ride out a database restart).
    ``poll_interval``: the longest wait between two looks at the log (``serve``,
    ``result``, a saga another worker holds).

    Every intent is recorded before the work it announces (and made durable
    first on a durable log), so a saga interrupted anywhere can be carried on
    from its log. Running a saga id the log already finished returns the
    recorded outcome and runs nothing; running one that is in flight here waits
    for that run's outcome; running one another worker holds waits for its
    outcome, and takes the saga over if that worker's lease expires. If the
    caller of a run is cancelled, a caller still waiting carries the saga on.

    A compensation that raises leaves the saga ``failed`` (half undone): the
    remaining compensations do not run, since older steps may depend on the
    newer ones being undone first.
    """

    def __init__(
        self,
        log: SagaLog | str = "memory://",
        *,
        sagas: Iterable[SagaDefinition] = (),
        owner: str | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        retry_for: float = 30.0,
        poll_interval: float = 1.0,
    ) -> None:
        # Checked before a URL is opened: a refused argument leaves nothing open.
        lease_ttl, retry_for, poll_interval = checked_options(
            log, owner, lease_ttl, retry_for, poll_interval
        )
        # A log opened here from a URL is this orchestrator's to close; one
        # handed in belongs to the caller.
        self._owns_log = isinstance(log, str)
        if isinstance(log, str):
            # Imported here: the orchestrator depends on the SagaLog port, and
            # reaches the adapters only to honour a URL (the composition root's job).
            from sagakit.adapters import open_saga_log

            log = open_saga_log(log)
        self._log: SagaLog = log
        self._durable = bool(log.durable)
        # Only a name given here can have been an earlier process's (see _left_behind).
        self._named = owner is not None
        self.owner = owner or default_owner()
        self.lease_ttl = lease_ttl
        self.retry_for = retry_for
        self.poll_interval = poll_interval
        self._definitions: dict[str, SagaDefinition] = {}
        for saga in definitions_in(sagas):
            self.register(saga)
        self._running: dict[str, Run] = {}
        # The callers waiting for a run of another caller's, by saga id.
        self._waiters: dict[str, list[asyncio.Future[SagaOutcome]]] = {}
        # Leases held (one journal per saga driven here), those the renewer
        # found lost, and the renewer itself while any is held.
        self._held: dict[str, Journal] = {}
        self._lost: set[str] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._server: asyncio.Task[None] | None = None
        self._served: set[asyncio.Task[Any]] = set()
        self._fatal: BaseException | None = None  # a served step's BaseException
        self._flush = self._flush_journal if self._durable else None

    @property
    def log(self) -> SagaLog:
        return self._log

    def register(self, saga: SagaDefinition) -> None:
        """Know ``saga`` by its name, to carry on sagas of it that others started."""
        if not isinstance(saga, SagaDefinition):
            raise DefinitionError("sagas", f"must be SagaDefinitions, got {type(saga).__name__}")
        known = self._definitions.get(saga.name)
        if known is not None and known.fingerprint != saga.fingerprint:
            raise DefinitionError("sagas", f"two definitions named {saga.name!r}")
        self._definitions[saga.name] = saga

    # --- running a saga ----------------------------------------------------------------

    async def run(
        self, saga: SagaDefinition, saga_id: str, data: Mapping[str, Any] | None = None
    ) -> SagaOutcome:
        """Run ``saga`` as ``saga_id`` with input ``data`` to its end, and report how it ended."""
        if data is None and type(saga) is SagaDefinition and type(saga_id) is str and saga_id:
            data = NO_INPUT  # the arguments most runs have, checked inline
        else:
            data = checked_input(saga, saga_id, data)
        running = self._running.get(saga_id)
        if running is not None:
            return await self._join(saga, saga_id, running, data)
        self._running[saga_id] = _run((saga, data))
        try:
            # Optimistic start: a new saga costs one create and no read; only a saga
            # id the log already holds is read back (to resume or report it).
            begin = _BEGIN if data is NO_INPUT else Begin(data)
            decision = decide(saga.plan, _INITIAL, begin, time.time())
            journal = await self._create(saga_id, decision.records)
            if journal is None:
                outcome = await self._existing(saga, saga_id, data)
            else:
                self._hold(journal)
                try:
                    outcome = await drive(
                        saga, saga_id, data, journal, decision, {}, self._flush, self._lost
                    )
                except LeaseLost:
                    self._drop(saga_id)
                    # Another worker took the saga over (this one stalled past its
                    # lease): its outcome is the one to report.
                    log.warning("saga %s: lease lost; waiting for its new holder", saga_id)
                    outcome = await self._existing(saga, saga_id, data)
                except BaseException as exc:
                    await self._give_up(saga_id, journal, exc)
                    raise
                else:
                    del self._held[saga_id]  # its last record ended the lease
                    if self._lost:
                        self._lost.discard(saga_id)
        except BaseException as exc:
            if self._waiters and saga_id in self._waiters:
                settle(self._waiters.pop(saga_id), exc)
            raise
        finally:
            del self._running[saga_id]
        if self._waiters and saga_id in self._waiters:
            settle(self._waiters.pop(saga_id), outcome)
        return outcome

    def _create(self, saga_id: str, opening: Sequence[SagaRecord]) -> Awaitable[Journal | None]:
        if self._durable:  # retried through an outage (the in-memory log has none)
            return self._retrying(
                lambda: self._log.create(saga_id, opening, owner=self.owner, ttl=self.lease_ttl)
            )
        return self._log.create(saga_id, opening, owner=self.owner, ttl=self.lease_ttl)

    async def _drive(
        self,
        saga: SagaDefinition,
        saga_id: str,
        data: Mapping[str, Any],
        journal: Journal,
        decision: Any,
        results: dict[str, Any],
    ) -> SagaOutcome:
        """Drive the saga under ``journal``'s lease, as run() does inline; give the lease
        up if it stops unfinished."""
        self._hold(journal)
        try:
            outcome = await drive(
                saga, saga_id, data, journal, decision, results, self._flush, self._lost
            )
        except LeaseLost:
            self._drop(saga_id)  # nothing of ours to give up
            raise
        except BaseException as exc:
            await self._give_up(saga_id, journal, exc)
            raise
        self._drop(saga_id)  # its last record ended the lease too
        return outcome

    def _drop(self, saga_id: str) -> None:
        """Forget the lease of a saga no longer driven here (it ended, or was lost)."""
        self._held.pop(saga_id, None)
        if self._lost:
            self._lost.discard(saga_id)

    async def _give_up(self, saga_id: str, journal: Journal, exc: BaseException) -> None:
        """A saga stopped unfinished (cancelled, a step's BaseException): give its lease up,
        so that another worker may carry it on at once. One that failed (``exc`` is an
        Exception: a backend error, a record the log refused) keeps it, unrenewed, until it
        expires: given up, it would be claimed and fail again (its step re-run) at once."""
        self._drop(saga_id)
        if isinstance(exc, Exception):
            return
        try:
            await self._log.release(journal)
        except Exception:
            log.exception("saga %s: could not give its lease up", saga_id)

    async def _existing(
        self, saga: SagaDefinition, saga_id: str, data: Mapping[str, Any]
    ) -> SagaOutcome:
        """The saga id is in the log: report it, carry it on, or wait for its holder."""
        while True:
            records = await self._log.read(saga_id)
            if not records:  # forgotten since (a capped in-memory log): run it anew
                decision = decide(saga.plan, _INITIAL, Begin(data), time.time())
                journal = await self._create(saga_id, decision.records)
                if journal is not None:
                    return await self._drive(saga, saga_id, data, journal, decision, {})
                continue
            _, state, results = replayed(saga, saga_id, data, records)
            if state.status.is_final:
                return outcome_of(saga_id, saga.plan, state, results)
            claim = await self._retrying(
                lambda: self._log.claim(saga_id, owner=self.owner, ttl=self.lease_ttl)
            )
            if claim is not None:
                try:
                    return await self._resume(saga, saga_id, claim)
                except LeaseLost:
                    log.warning("saga %s: lease lost; waiting for its new holder", saga_id)
            await wait_for_holder(self._log, saga_id, self.poll_interval, self.retry_for)

    async def _resume(self, saga: SagaDefinition, saga_id: str, claim: Claim) -> SagaOutcome:
        started, state, results = replayed(saga, saga_id, None, claim.records)
        journal = claim.journal
        try:
            decision = decide(saga.plan, state, Resume(), time.time())
        except InvalidTransition as exc:  # the lease is kept: see _give_up
            raise SagaError(saga_id, f"its log cannot be carried on: {exc}") from exc
        if decision.records:
            log.info("resuming saga %s with %s", saga_id, decision.commands)
            try:
                journal.stage(decision.records)
                if self._flush is not None:
                    await self._flush(journal)
            except BaseException as exc:
                await self._give_up(saga_id, journal, exc)
                raise
        return await self._drive(saga, saga_id, started.data, journal, decision, results)

    async def _join(
        self, saga: SagaDefinition, saga_id: str, running: Run, data: Mapping[str, Any]
    ) -> SagaOutcome:
        theirs = running.saga
        if theirs.name != saga.name or theirs.step_names != saga.step_names:
            raise SagaIdConflict(saga_id, theirs.fingerprint, saga.fingerprint)
        if not same_input(running.data, data):
            raise SagaIdConflict(
                saga_id,
                f"{saga.fingerprint} with input {shown(running.data)}",
                f"{saga.fingerprint} with input {shown(data)}",
            )
        try:
            return await wait_for_run(self._waiters, saga_id)
        except RunnerCancelled:
            # Its log shows where it stopped: carry it on from there, for this
            # caller (and any other waiter, which joins this run in turn).
            log.info("saga %s: its runner was cancelled; carrying it on", saga_id)
            return await self.run(saga, saga_id, data)

    # --- starting, waiting, reading ------------------------------------------------------

    async def start(
        self, saga: SagaDefinition, saga_id: str, data: Mapping[str, Any] | None = None
    ) -> bool:
        """Record the saga durably, for a worker to run, and return at once.

        True when it was recorded now; False when the saga id was already
        recorded for this definition and input (nothing changes). Raises
        SagaIdConflict when it was recorded for another. The definition is
        registered here, so that this orchestrator's :meth:`serve` runs it.
        """
        data = checked_input(saga, saga_id, data)
        self.register(saga)
        opening = [SagaStarted(saga.name, saga.step_names, data)]
        journal = await self._retrying(
            lambda: self._log.create(saga_id, opening, owner=None, ttl=self.lease_ttl)
        )
        if journal is not None:
            return True
        records = await self._log.read(saga_id)
        if records:
            replayed(saga, saga_id, data, records)
        return False

    async def result(self, saga_id: str, timeout: float | None = None) -> SagaOutcome:  # noqa: ASYNC109 - the API the issue names
        """Wait for the saga's outcome (TimeoutError after ``timeout`` seconds).

        SagaError when the saga id is unknown.
        """
        limit = None if timeout is None else check_seconds("timeout", timeout, minimum=0.0)
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                delay = 0.01
                while True:
                    running = self._running.get(saga_id)
                    if running is not None:  # joined as run() joins it: no task of its own
                        return await self._join(running.saga, saga_id, running, running.data)
                    records = await self._retrying(lambda: self._log.read(saga_id))
                    if not records:
                        raise SagaError(saga_id, "no such saga in the log")
                    outcome = logged_outcome(saga_id, records, self._definitions)
                    if outcome.state.is_final:
                        return outcome
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.poll_interval)
        except TimeoutError:
            if not deadline.expired():  # another's, from within: not this wait's
                raise
        # asyncio's says nothing: a log line of it would not say which saga.
        raise TimeoutError(f"saga {saga_id!r}: no outcome within {limit:g} s")

    async def status(self, saga_id: str) -> SagaSummary | None:
        """The saga as the log lists it (status, lease, counts), or None when unknown."""
        return await self._log.status(saga_id)

    async def list(
        self,
        status: SagaStatus | str | Iterable[SagaStatus | str] | None = None,
        limit: int = 100,
    ) -> list[SagaSummary]:
        """Sagas in the log, newest first, of the given status(es) or all (a status is a
        SagaStatus or its text, ``"running"``; DefinitionError for another)."""
        return await self._log.list(status=wanted_status(status), limit=limit)

    # --- recovery and serving --------------------------------------------------------

    async def recover(
        self, sagas: Mapping[str, SagaDefinition] | Iterable[SagaDefinition] | None = None
    ) -> Recovered:
        """Claim every unfinished saga whose lease expired (or was given up) and carry it on;
        with an ``owner`` given, first those still leased to that name (see _left_behind).

        ``sagas``: definitions to know besides the registered ones (a mapping
        of names to definitions, or definitions). A saga whose definition is
        unknown here is left to others and reported in ``missing``; one that
        cannot be carried on (a corrupt log) in ``errors``; neither stops the rest.
        """
        definitions = dict(self._definitions)
        if sagas is not None:
            given = definitions_in(sagas.values() if isinstance(sagas, Mapping) else sagas)
            definitions.update((saga.name, saga) for saga in given)
        recovered = Recovered()
        skipped: list[Journal] = []
        try:
            left_behind = await self._left_behind()
            while True:
                claims = left_behind or await self._retrying(
                    lambda: self._log.claim_next(owner=self.owner, ttl=self.lease_ttl, limit=64)
                )
                left_behind = []
                if not claims:
                    break
                runnable = []
                for claim in claims:
                    saga = definition_of(claim, definitions)
                    if saga is None:
                        # Held until the end of this recovery, so that the next
                        # claim_next does not hand it back; then given up.
                        recovered.missing[claim.journal.saga_id] = saga_name(claim)
                        skipped.append(claim.journal)
                    else:
                        runnable.append((saga, claim))
                ended = await asyncio.gather(
                    *(self._carry_on(saga, claim) for saga, claim in runnable),
                    return_exceptions=True,
                )
                for (_, claim), result in zip(runnable, ended, strict=True):
                    if isinstance(result, SagaOutcome):
                        recovered.append(result)
                    elif isinstance(result, Exception):
                        log.error("saga %s: not recovered: %s", claim.journal.saga_id, result)
                        recovered.errors[claim.journal.saga_id] = result
                    else:
                        raise result
        finally:
            for journal in skipped:
                await self._log.release(journal)
        return recovered

    async def _carry_on(self, saga: SagaDefinition, claim: Claim) -> SagaOutcome:
        saga_id = claim.journal.saga_id
        if saga_id in self._running:  # claimed back from a run of ours that lost it
            await self._log.release(claim.journal)
            raise SagaError(saga_id, "already running here")
        started = claim.records[0]
        data = started.data if type(started) is SagaStarted else NO_INPUT
        self._running[saga_id] = Run(saga, data)
        try:
            outcome = await self._resume(saga, saga_id, claim)
        except BaseException as exc:
            if saga_id in self._waiters:
                settle(self._waiters.pop(saga_id), exc)
            raise
        finally:
            del self._running[saga_id]
        if saga_id in self._waiters:
            settle(self._waiters.pop(saga_id), outcome)
        return outcome

    async def serve(self, *, concurrency: int = 64) -> None:
        """Run sagas from the log until cancelled: those others started, and those
        whose worker died (lease expired). Polls with backoff while there is none.

        A log that refuses the first claim for good (a BackendError that is not
        retryable) is an error raised here; later failures are logged and ridden out.
        So is a step's BaseException that is not an Exception (a request to stop,
        not a failure): serving stops, its saga given back to the other workers."""
        check_count("concurrency", concurrency, least=1)  # 0 would idle for ever
        delay = 0.01
        reached = False  # whether the log ever answered a claim
        lacking = Unrunnable(self.lease_ttl)  # see _spawn
        try:
            try:
                for claim in await self._left_behind():
                    self._spawn(claim, lacking)
            except BackendError as exc:
                log.error("claiming the sagas left under this name failed: %s", exc)
            while True:
                if self._fatal is not None:  # given back, its saga would run again at once
                    fatal, self._fatal = self._fatal, None
                    raise fatal
                free = concurrency - len(self._served)
                claims: list[Claim] = []
                if free > 0:
                    try:
                        claims = await self._retrying(
                            lambda free=free: self._log.claim_next(  # type: ignore[misc]
                                owner=self.owner, ttl=self.lease_ttl, limit=free
                            )
                        )
                        reached = True
                    except BackendError as exc:
                        log.error("claiming sagas failed: %s", exc)  # said under async with too
                        if not (exc.retryable or reached):  # no such database, bad password
                            raise
                spawned = [self._spawn(claim, lacking) for claim in claims]
                if any(spawned):
                    delay = 0.01
                    await asyncio.sleep(0)
                else:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.poll_interval)
        finally:
            tasks = list(self._served)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Nothing here will poll again: hand them to a worker that has their
            # definitions (the usual one: this worker, restarted with them).
            await give_back(self._log, lacking.journals())

    async def _left_behind(self) -> Sequence[Claim]:
        """The sagas an earlier process under this owner's name left leased, claimed."""
        if not self._named:  # a name made for this process: no earlier one had it
            return []
        busy = set(self._running) | set(self._held)
        return await claim_left_behind(self._log, self.owner, self.lease_ttl, busy, self.retry_for)

    def _spawn(self, claim: Claim, lacking: Unrunnable) -> bool:
        """Run the claimed saga in a task of its own; False when its definition is unknown
        (its lease then kept in ``lacking``)."""
        saga = definition_of(claim, self._definitions)
        if saga is None:
            lacking.keep(claim.journal)
            return False
        task = asyncio.ensure_future(self._carry_on(saga, claim))
        self._served.add(task)
        task.add_done_callback(self._served_done)
        return True

    def _served_done(self, task: asyncio.Task[Any]) -> None:
        self._served.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            if isinstance(exc, LeaseLost):
                log.warning("%s", exc)
            else:
                log.error("a saga this worker served failed: %s", exc)
                if not isinstance(exc, Exception):  # a step's BaseException: serve() stops
                    self._fatal = exc

    async def __aenter__(self) -> Orchestrator:
        if self._server is None or self._server.done():
            self._server = asyncio.ensure_future(self.serve())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop serving: in-flight sagas served here stop and give their leases up.

        A saga log this orchestrator opened from a URL is closed too (its
        connections released); a log object handed in is left to its owner.
        """
        server, self._server = self._server, None
        if server is not None:
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)
        # Callers' run()s still in flight on a log not closed here keep their leases renewed.
        if self._renewer is not None and (self._owns_log or not self._held):
            renewer, self._renewer = self._renewer, None
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
        if self._owns_log:
            await self._log.close()

    def _hold(self, journal: Journal) -> None:
        self._held[journal.saga_id] = journal
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.ensure_future(self._renew())

    def _renew(self) -> Awaitable[None]:
        return renew_leases(self._log, self._held, self._lost, self.lease_ttl)

    async def _flush_journal(self, journal: Journal) -> None:
        await self._retrying(journal.flush)

    def _retrying(self, call: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        return retrying(call, self.retry_for)
