"""The ``saga`` node: runs orchestrated sagas of simulated steps (seed 002)."""

from __future__ import annotations

import socket
from collections.abc import Callable

from sagakit.core.machine import SagaStatus
from sagakit.core.records import valid_id
from sagakit.core.saga import SagaDefinition, Step, StepContext
from sagakit.errors import BackendBusy, BackendUnavailable, DefinitionError, SagaIdConflict
from sagakit.node.host import Body, Host, Node
from sagakit.node.protocol import (
    MAX_ID,
    Encoded,
    ErrorCode,
    RequestError,
    json_string,
    optional_str,
    require_id,
    require_msg_id_of,
    require_str_list,
)
from sagakit.orchestration import Orchestrator

__all__ = ["SagaNode"]


def _owner(node: str) -> str:
    """The node's default lease owner: the same for the same node on the same host.

    A node killed mid-saga leaves that saga leased to it. Restarted on its store
    under the same name, it takes the saga over at once (a saga log lets a lease's
    owner claim it again) instead of waiting out the lease it can no longer renew.
    Two processes running at once under one name would take each other's sagas
    over: correct still (the epoch fences the one that lost it, which then reports
    the other's outcome), but a step in flight would run twice; such processes
    need ``--owner`` names of their own.
    """
    return f"{node}@{socket.gethostname()}"


class StepRefused(Exception):
    """The simulated failure that ``fail_step`` asks for."""


def _step_done(ctx: StepContext) -> None:
    return None


def _refusal(step: str) -> Callable[[StepContext], None]:
    """The action of a step the request asks to fail. Its message is made once per
    definition: the orchestrator reads it from every failure it records."""
    message = f"{step} failed as the request asked"

    def refuse(ctx: StepContext) -> None:
        raise StepRefused(message)

    return refuse


def _undone(ctx: StepContext) -> None:
    return None


class _Variants(dict[str | None, SagaDefinition]):
    """The definitions of one step list: one per ``fail_step``, None for no failure.

    The simulated failure is part of the definition, not of the saga's input:
    the log keeps every saga's input for as long as the node lives, and most of
    what it would keep is this flag. All variants share the name and the steps,
    hence the fingerprint, so a retry answered from the log matches any of them.
    Built when first asked for: a long step list would make many.
    """

    def __init__(self, steps: tuple[str, ...]) -> None:
        super().__init__()
        self.steps = steps
        self[None] = build(steps, None)

    def add(self, fail_step: str) -> SagaDefinition:
        """The variant failing at ``fail_step``; the one failing nowhere when that is not
        one of the steps (the seed protocol reads ``fail_step`` as "simulate a failure
        here": naming no step, it fails nothing)."""
        if fail_step not in self.steps:
            return self[None]  # not kept: a client may name any number of such steps
        definition = self[fail_step] = build(self.steps, fail_step)
        return definition


def build(steps: tuple[str, ...], fail_step: str | None) -> SagaDefinition:
    return SagaDefinition(
        "execute",
        [Step(s, _refusal(s) if s == fail_step else _step_done, _undone) for s in steps],
    )


class SagaNode(Node):
    """``execute`` runs the listed steps; ``fail_step`` makes that step fail.

    Replies are exactly the seed's: ``saga_completed`` with the number of
    completed steps, or ``saga_compensated`` with the compensated steps, newest
    first. Sagas are recorded in a saga log, so a client's retry of an
    ``execute`` is answered from the record and runs nothing again.
    """

    MAX_CACHED_STEP_LISTS = 4096
    # Longer step lists are built for each request instead of kept: a cache
    # of a few thousand lists of any length would hold any amount of memory.
    MAX_CACHED_STEPS = 64

    def __init__(self, name: str, host: Host) -> None:
        super().__init__(name, host)
        # The log answers retries. In memory it keeps the newest max_sagas
        # finished sagas, of max_records records and steps in all (an evicted
        # saga id is new again: an execute naming it runs); a store keeps them
        # all, across restarts.
        settings = host.settings
        self.orchestrator = Orchestrator(
            settings.store
            or f"memory://?max_finished={settings.max_sagas}&max_records={settings.max_records}",
            owner=settings.owner or _owner(name),
            retry_for=settings.retry_for,
        )
        # Requests repeat the same step lists; building definitions per request
        # would cost more than running the saga.
        self._definitions: dict[tuple[str, ...], _Variants] = {}

    def _variants_of(self, body: Body) -> _Variants | tuple[str, ...]:
        """The cached variants of the request's step list, or the checked list when it
        is too long to cache."""
        steps = body.get("steps")
        if type(steps) is list:
            try:
                # A step list seen before was checked then; most requests repeat one.
                variants = self._definitions.get(tuple(steps))
            except TypeError:  # an unhashable item: the check below names it
                variants = None
            if variants is not None:
                return variants
        if steps == []:
            return ()
        key = tuple(require_str_list(body, "steps"))
        variants = self._definitions.get(key)
        if variants is None:
            if len(set(key)) != len(key):
                raise RequestError(ErrorCode.MALFORMED_REQUEST, "steps: step names must be unique")
            if len(key) > self.MAX_CACHED_STEPS:
                return key
            if len(self._definitions) >= self.MAX_CACHED_STEP_LISTS:
                self._definitions.clear()
            try:
                variants = _Variants(key)
            except DefinitionError as exc:  # a name the core refuses, such as a blank one
                raise RequestError(ErrorCode.MALFORMED_REQUEST, f"steps: {exc}") from exc
            self._definitions[key] = variants
        return variants

    @staticmethod
    def _definition(variants: _Variants | tuple[str, ...], body: Body) -> SagaDefinition | None:
        """The definition for a request the cached variants do not answer at once."""
        fail_step = optional_str(body, "fail_step")
        if type(variants) is _Variants:
            return variants.add(fail_step) if fail_step is not None else variants[None]
        steps: tuple[str, ...] = variants  # type: ignore[assignment]
        try:
            return build(steps, fail_step)
        except DefinitionError as exc:  # a name the core refuses, such as a blank one
            if not steps:
                return None  # a core that wants a step: the node completes it itself
            raise RequestError(ErrorCode.MALFORMED_REQUEST, f"steps: {exc}") from exc

    async def on_init(self, src: str, body: Body) -> Body | None:
        reply = await super().on_init(src, body)
        # Leases are taken under the node's id from now on: the same node restarted
        # is the same owner, another node on this host is not.
        if self.host.settings.owner is None and self.node_id is not None:
            owner = _owner(self.node_id)
            if valid_id(owner):
                self.orchestrator.owner = owner
        return reply

    async def on_execute(self, src: str, body: Body) -> Encoded:
        # Checked inline on the way every request takes; the helpers, which
        # name the field in the error, run only for a request that is wrong.
        msg_id = body.get("msg_id")
        if type(msg_id) is not int:
            msg_id = require_msg_id_of(body)
        saga_id = body.get("saga_id")
        if type(saga_id) is not str or not saga_id or len(saga_id) > MAX_ID:
            saga_id = require_id(body, "saga_id")
        try:  # free unless raised (3.11): the refusal of a bad step list echoes the saga id
            variants = self._variants_of(body)
        except RequestError as exc:
            exc.extra.setdefault("saga_id", saga_id)
            raise
        fail_step = body.get("fail_step")
        # type() first: an unhashable value cannot be looked up.
        definition = (
            variants.get(fail_step)
            if type(variants) is _Variants and (fail_step is None or type(fail_step) is str)
            else None
        )
        if definition is None:
            try:
                definition = self._definition(variants, body)
            except RequestError as exc:
                exc.extra.setdefault("saga_id", saga_id)
                raise
            if definition is None:
                return self._completed(msg_id, saga_id, 0)
        try:
            outcome = await self.orchestrator.run(definition, saga_id)
        except SagaIdConflict as exc:
            raise RequestError(ErrorCode.PRECONDITION_FAILED, str(exc), saga_id=saga_id) from exc
        except DefinitionError as exc:
            # An id no saga log can keep (a lone surrogate, NUL, over 1,024 bytes of
            # UTF-8): refused alike in memory and in a store.
            raise RequestError(ErrorCode.MALFORMED_REQUEST, str(exc), saga_id=saga_id) from exc
        except (BackendUnavailable, BackendBusy) as exc:
            # The store is down or busy: the saga may be recorded as started, and
            # a retry carries it on from there (or answers it from the record).
            raise RequestError(
                ErrorCode.TEMPORARILY_UNAVAILABLE, f"the saga log: {exc}", saga_id=saga_id
            ) from exc
        # The reply is written directly, in exactly the bytes json.dumps would
        # give for the seed's dict: this runs once per request, and encoding a
        # dict cost about a tenth of the node's time.
        if outcome.state is SagaStatus.COMPLETED:
            return self._completed(msg_id, saga_id, len(outcome.completed_steps))
        # A compensation cannot fail here (they are simulated), but if one did
        # the saga would be half undone, and the reply must not say otherwise.
        kind = "saga_compensated" if outcome.state is SagaStatus.COMPENSATED else "saga_failed"
        compensated = ", ".join([json_string(step) for step in outcome.compensated_steps])
        return Encoded(
            f'{{"type": "{kind}", "in_reply_to": {msg_id}, '
            f'"saga_id": {json_string(saga_id)}, "state": "{outcome.state}", '
            f'"compensated_steps": [{compensated}]}}'
        )

    async def open(self) -> None:
        # A read that reaches the store opens it (a file, a connection) and checks
        # its schema. (Not status(""): an id no log can keep is answered without it.)
        await self.orchestrator.log.list(limit=1)

    async def finish(self) -> None:
        # A store's writer is flushed and closed before the process leaves.
        await self.orchestrator.close()

    @staticmethod
    def _completed(msg_id: int, saga_id: str, steps: int) -> Encoded:
        return Encoded(
            f'{{"type": "saga_completed", "in_reply_to": {msg_id}, '
            f'"saga_id": {json_string(saga_id)}, "state": "completed", '
            f'"completed_steps": {steps}}}'
        )
