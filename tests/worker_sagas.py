"""Saga definitions for the tests that run ``sagakit worker`` in a process of its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable
from pathlib import Path

from sagakit import SagaDefinition, Step, StepContext


async def _forever() -> None:
    while True:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)


def _ignore_cancellation(ctx: StepContext) -> Awaitable[None]:
    """A step that never returns and swallows every cancellation (a stuck client call);
    it says it started in the file ``SAGAKIT_TEST_MARK`` names."""
    Path(os.environ["SAGAKIT_TEST_MARK"]).write_text(ctx.saga_id)
    return _forever()


STUBBORN = SagaDefinition("stubborn", [Step("wait", _ignore_cancellation)])
