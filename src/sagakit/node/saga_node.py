"""The ``saga`` node: runs orchestrated sagas of simulated steps (seed 002)."""

from __future__ import annotations

from sagakit.core.machine import SagaStatus
from sagakit.core.saga import SagaDefinition, Step, StepContext
from sagakit.errors import DefinitionError, SagaIdConflict
from sagakit.node.host import Body, Host, Node
from sagakit.node.protocol import (
    Encoded,
    ErrorCode,
    RequestError,
    json_string,
    optional_str,
    require_msg_id,
    require_str,
    require_str_list,
)
from sagakit.orchestration import Orchestrator

__all__ = ["SagaNode"]


class StepRefused(Exception):
    """The simulated failure that ``fail_step`` asks for."""

    def __str__(self) -> str:
        # Formatted only when read: a third of the benchmark's sagas raise this.
        return f"{self.args[0]} failed as the request asked"


def _simulated_action(ctx: StepContext) -> None:
    if ctx.data.get("fail_step") == ctx.step:
        raise StepRefused(ctx.step)


def _simulated_compensation(ctx: StepContext) -> None:
    return None


class SagaNode(Node):
    """``execute`` runs the listed steps; ``fail_step`` makes that step fail.

    Replies are exactly the seed's: ``saga_completed`` with the number of
    completed steps, or ``saga_compensated`` with the compensated steps, newest
    first. Sagas are recorded in a saga log, so a client's retry of an
    ``execute`` is answered from the record and runs nothing again.
    """

    MAX_CACHED_DEFINITIONS = 4096

    def __init__(self, name: str, host: Host) -> None:
        super().__init__(name, host)
        self.orchestrator = Orchestrator("memory://")
        # Requests repeat the same step lists; building a definition per request
        # would cost more than running the saga.
        self._definitions: dict[tuple[str, ...], SagaDefinition] = {}

    def _definition(self, body: Body) -> SagaDefinition:
        steps = body.get("steps")
        if type(steps) is list:
            key = tuple(steps)
            try:
                # A step list seen before was checked then; most requests repeat one.
                definition = self._definitions.get(key)
            except TypeError:  # an unhashable item: the check below names it
                definition = None
            if definition is not None:
                return definition
        key = tuple(require_str_list(body, "steps"))
        definition = self._definitions.get(key)
        if definition is None:
            if len(set(key)) != len(key):
                raise RequestError(ErrorCode.MALFORMED_REQUEST, "steps: step names must be unique")
            if len(self._definitions) >= self.MAX_CACHED_DEFINITIONS:
                self._definitions.clear()
            try:
                definition = SagaDefinition(
                    "execute", [Step(s, _simulated_action, _simulated_compensation) for s in key]
                )
            except DefinitionError as exc:  # a name the core refuses, such as a blank one
                raise RequestError(ErrorCode.MALFORMED_REQUEST, f"steps: {exc}") from exc
            self._definitions[key] = definition
        return definition

    async def on_execute(self, src: str, body: Body) -> Encoded:
        # Checked inline on the way every request takes; the helpers, which
        # name the field in the error, run only for a request that is wrong.
        msg_id = body.get("msg_id")
        if type(msg_id) is not int:
            msg_id = require_msg_id(body)
        saga_id = body.get("saga_id")
        if type(saga_id) is not str or not saga_id:
            saga_id = require_str(body, "saga_id")
        definition = self._definition(body)
        fail_step = body.get("fail_step")
        if fail_step is not None and type(fail_step) is not str:
            optional_str(body, "fail_step")
        if fail_step is not None and fail_step not in definition.step_names:
            raise RequestError(
                ErrorCode.MALFORMED_REQUEST,
                f"fail_step: {fail_step!r} is not one of steps",
                saga_id=saga_id,
            )
        # The log keeps every saga's input for as long as the node lives: a
        # saga that is not told to fail has none.
        data = None if fail_step is None else {"fail_step": fail_step}
        try:
            outcome = await self.orchestrator.run(definition, saga_id, data)
        except SagaIdConflict as exc:
            raise RequestError(ErrorCode.PRECONDITION_FAILED, str(exc), saga_id=saga_id) from exc
        # The reply is written directly, in exactly the bytes json.dumps would
        # give for the seed's dict: this runs once per request, and encoding a
        # dict cost about a tenth of the node's time.
        if outcome.state is SagaStatus.COMPLETED:
            return Encoded(
                f'{{"type": "saga_completed", "in_reply_to": {msg_id}, '
                f'"saga_id": {json_string(saga_id)}, "state": "completed", '
                f'"completed_steps": {len(outcome.completed_steps)}}}'
            )
        # A compensation cannot fail here (they are simulated), but if one did
        # the saga would be half undone, and the reply must not say otherwise.
        kind = "saga_compensated" if outcome.state is SagaStatus.COMPENSATED else "saga_failed"
        compensated = ", ".join([json_string(step) for step in outcome.compensated_steps])
        return Encoded(
            f'{{"type": "{kind}", "in_reply_to": {msg_id}, '
            f'"saga_id": {json_string(saga_id)}, "state": "{outcome.state.value}", '
            f'"compensated_steps": [{compensated}]}}'
        )
