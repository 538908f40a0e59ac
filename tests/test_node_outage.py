"""``python3 main.py --store postgresql://...`` while its database goes down and comes back.

What docs/node.md promises: an ``execute`` that cannot reach the store retries it for
``--retry-for`` seconds, then is answered code 11 (temporarily unavailable); the node keeps
serving, and once the database is back the same request, retried, runs (or is answered from
the log) and later ones are served as usual.
"""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import threading
import time
from typing import Any

import pytest

from sagakit.adapters.postgres_log import PostgresSagaLog
from sagakit.core.records import SagaFinished, SagaStatus, StepStarted
from sagakit.node.runner import UsageError, parse_settings
from tests.servers.postgres import PrivatePostgres
from tests.test_node import MAIN, REPO, execute


class _Node:
    """A node process fed one request at a time, its replies read as they come."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            text=True,
        )
        self.replies: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.replies.put(line)

    def ask(self, request: str, timeout: float = 60.0) -> tuple[dict[str, Any], float]:
        """Send one request; its reply's body and how long it took."""
        assert self.proc.stdin is not None
        began = time.monotonic()
        self.proc.stdin.write(request)
        self.proc.stdin.flush()
        body = json.loads(self.replies.get(timeout=timeout))["body"]
        return body, time.monotonic() - began

    def close(self) -> tuple[int, str]:
        """End the node's input; its exit status and what it wrote on stderr."""
        assert self.proc.stdin is not None
        assert self.proc.stderr is not None
        self.proc.stdin.close()
        code = self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        return code, self.proc.stderr.read()

    def __enter__(self) -> _Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _history(url: str, saga_id: str) -> list[Any]:
    async def read() -> list[Any]:
        log = PostgresSagaLog.from_url(url)
        try:
            return [logged.record for logged in await log.history(saga_id)]
        finally:
            await log.close()

    return asyncio.run(read())


def test_a_store_that_goes_down_is_answered_code_11_and_served_again_once_back(
    private_postgres: PrivatePostgres, private_postgres_url: str
) -> None:
    with _Node([*MAIN, "--store", private_postgres_url, "--retry-for", "1"]) as node:
        body, _ = node.ask(execute(1, "s1", ["a", "b"]))
        assert body["type"] == "saga_completed", body

        with private_postgres.stopped():
            for msg_id, saga_id in ((2, "s2"), (3, "s3")):
                body, took = node.ask(execute(msg_id, saga_id, ["a", "b"], fail_step="b"))
                assert (body["type"], body["code"]) == ("error", 11), body
                assert body["in_reply_to"] == msg_id
                assert body["saga_id"] == saga_id
                assert body["text"].startswith("the saga log: ")
                # Retried for --retry-for (1 s), not for the default 30 s.
                assert took < 15, took
            assert node.proc.poll() is None, "the node stopped while its store was down"

        # The client's retry of a refused request runs it; the next ones are served.
        body, _ = node.ask(execute(4, "s2", ["a", "b"], fail_step="b"))
        assert body == {
            "type": "saga_compensated",
            "in_reply_to": 4,
            "saga_id": "s2",
            "state": "compensated",
            "compensated_steps": ["a"],
        }
        body, _ = node.ask(execute(5, "s5", ["a"]))
        assert body["type"] == "saga_completed", body
        code, stderr = node.close()
    assert code == 0, stderr
    assert "Traceback" not in stderr
    # Nothing recorded twice: s2 ran whole once, its first step started once.
    s2 = _history(private_postgres_url, "s2")
    assert s2[-1] == SagaFinished(SagaStatus.COMPENSATED)
    assert sum(type(r) is StepStarted and r.step == 0 for r in s2) == 1
    # s3 was refused while the database was down: nothing of it was recorded.
    assert _history(private_postgres_url, "s3") == []


@pytest.mark.parametrize("raw", ["nan", "-1", "abc", "inf", "86401"])
def test_a_retry_window_that_is_not_seconds_is_refused_at_start(raw: str) -> None:
    with pytest.raises(UsageError, match="retry-for must be seconds from 0 to 86400"):
        parse_settings(["--retry-for", raw], {})
    with pytest.raises(UsageError, match="SAGAKIT_RETRY_FOR must be seconds from 0 to 86400"):
        parse_settings([], {"SAGAKIT_RETRY_FOR": raw})


def test_the_retry_window_defaults_to_the_orchestrators() -> None:
    assert parse_settings([], {}).retry_for == 30.0
    assert parse_settings(["--retry-for", "0"], {}).retry_for == 0.0
    assert parse_settings([], {"SAGAKIT_RETRY_FOR": "2.5"}).retry_for == 2.5
