"""The PostgreSQL saga log: the port's conformance suite on a real server, and what is
PostgreSQL's alone (URLs, the schema and its version, group commit, two pools racing,
the server restarted under the log, errors translated).

The server is the session's private PostgreSQL (tests/servers/postgres.py) or the one
``SAGAKIT_TEST_POSTGRES_URL`` names; each test has a database of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import pytest
from conformance.saga_log import FINISHED, SagaLogConformance, opening, typed, write

from sagakit import Orchestrator, SagaDefinition, Step, StepContext
from sagakit.adapters import _postgres_group, open_saga_log, postgres_log
from sagakit.adapters.postgres_log import PostgresSagaLog
from sagakit.core.records import (
    SagaFinished,
    SagaStarted,
    SagaStatus,
    StepCompleted,
    StepStarted,
)
from sagakit.errors import (
    BackendError,
    BackendRefused,
    BackendUnavailable,
    ConfigurationError,
    DefinitionError,
    LeaseLost,
    SagaError,
    SchemaMismatch,
)
from sagakit.ports.saga_log import Journal, SagaLog
from tests.servers import free_port
from tests.servers.postgres import PrivatePostgres, database_url
from tests.servers.proxy import ReplyCutter


class TestPostgresSagaLog(SagaLogConformance):
    @pytest.fixture(autouse=True)
    def _database(self, postgres_url: str) -> None:
        self.url = postgres_url

    async def make_log(self) -> SagaLog:
        return open_saga_log(self.url)

    async def make_sibling(self, log: SagaLog) -> SagaLog | None:
        return open_saga_log(self.url)  # a second pool, as another process would have


@pytest.fixture
async def log(postgres_url: str) -> AsyncIterator[PostgresSagaLog]:
    opened = PostgresSagaLog.from_url(postgres_url)
    yield opened
    await opened.close()


async def started(log: SagaLog, saga_id: str = "o-1", owner: str = "w-1") -> Journal:
    journal = await log.create(saga_id, opening(), owner=owner, ttl=60)
    assert journal is not None
    return journal


async def sql(url: str, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


def as_role(url: str, role: str) -> str:
    """``url`` for another role (trust authentication: no password)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))


# --- URLs -----------------------------------------------------------------------------


def test_both_schemes_open_a_postgres_log() -> None:
    for url in ("postgresql://u@h:5/db", "postgres://u@h:5/db", "postgresql+asyncpg://u@h/db"):
        assert isinstance(open_saga_log(url), PostgresSagaLog)  # nothing connects yet


def test_url_options_are_taken_out_and_the_rest_left_to_asyncpg() -> None:
    log = PostgresSagaLog.from_url(
        "postgres://u@h/db?pool_size=3&command_timeout=2.5&search_path=sagas&connect_timeout=1"
    )
    assert (log._pool_size, log._command_timeout, log._connect_timeout) == (3, 2.5, 1.0)
    assert log._dsn == "postgresql://u@h/db?search_path=sagas"
    assert (
        PostgresSagaLog.from_url("postgres://h/db?statement_cache_size=0")._statement_cache_size
        == 0
    )


async def test_no_statement_cache_works_as_behind_pgbouncer(postgres_url: str) -> None:
    log = PostgresSagaLog.from_url(postgres_url + "?statement_cache_size=0")
    try:
        journal = await started(log)
        await write(journal, FINISHED)
        assert typed(await log.read("o-1")) == typed(opening() + FINISHED)
    finally:
        await log.close()


@pytest.mark.parametrize(
    "query",
    [
        "pool_size=0",
        "pool_size=2.5",
        "pool_size=x",
        "command_timeout=-1",
        "command_timeout=0",
        "pool_size=nan",
        "statement_cache_size=-1",
        "statement_cache_size=1.5",
    ],
)
def test_bad_url_options_are_refused(query: str) -> None:
    with pytest.raises(ConfigurationError, match=query.split("=")[0]):
        PostgresSagaLog.from_url(f"postgresql://u@h/db?{query}")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("pool_size", 0),
        ("pool_size", "3"),
        ("pool_size", True),
        ("connect_timeout", -1),
        ("connect_timeout", 0),
        ("command_timeout", float("nan")),
        ("command_timeout", float("inf")),
        ("statement_cache_size", -5),
        ("batches_in_flight", 0),
        ("batches_in_flight", 1.5),
    ],
)
def test_bad_keyword_options_are_refused_when_the_log_is_made(option: str, value: object) -> None:
    """As in the URL: before, pool_size="3" was a TypeError at first use, and a NaN
    command_timeout or no batch in flight were taken as they came."""
    with pytest.raises(ConfigurationError, match=option):
        PostgresSagaLog("postgresql://u@h/db", **{option: value})  # type: ignore[arg-type]


async def test_a_timeout_names_the_option_that_ran_out(postgres_url: str) -> None:
    """asyncpg's TimeoutError says nothing; a user whose timeout is set too short must see
    which one to change."""
    for option in ("connect_timeout", "command_timeout"):
        log = PostgresSagaLog.from_url(f"{postgres_url}?{option}=0.000001")
        try:
            with pytest.raises(BackendUnavailable, match=f"within {option}=1e-06 s"):
                await log.list(limit=1)
        finally:
            await log.close()


def test_a_log_used_on_a_second_event_loop_says_so(postgres_url: str) -> None:
    """Not a hang on connections of a loop that is gone."""
    log = PostgresSagaLog.from_url(postgres_url)

    async def first() -> Journal:
        journal = await started(log)
        await log._pool.close()  # its connections cannot outlive this loop
        return journal

    journal = asyncio.run(first())
    journal.stage([StepCompleted(0, 1)])
    with pytest.raises(ConfigurationError, match="event loop"):
        asyncio.run(journal.flush())
    with pytest.raises(ConfigurationError, match="event loop"):
        asyncio.run(log.read("o-1"))


# --- schema ---------------------------------------------------------------------------


async def test_schema_is_created_on_first_use_with_its_version(
    log: PostgresSagaLog, postgres_url: str
) -> None:
    assert await sql(postgres_url, "SELECT to_regclass('sagakit_sagas')") == [(None,)]
    await started(log)
    rows = await sql(postgres_url, "SELECT version FROM sagakit_schema_version")
    assert [r["version"] for r in rows] == [1]


async def test_a_newer_schema_is_refused(postgres_url: str) -> None:
    first = PostgresSagaLog.from_url(postgres_url)
    await started(first)
    await first.close()
    await sql(postgres_url, "INSERT INTO sagakit_schema_version (version) VALUES (99)")
    newer = PostgresSagaLog.from_url(postgres_url)
    try:
        with pytest.raises(SchemaMismatch, match="version 99") as raised:
            await newer.read("o-1")
        assert not raised.value.retryable
        with pytest.raises(SchemaMismatch):  # and again: nothing was half set up
            await newer.create("o-2", opening(), owner=None, ttl=1)
    finally:
        await newer.close()


async def test_concurrent_first_use_creates_the_schema_once(postgres_url: str) -> None:
    logs = [PostgresSagaLog.from_url(postgres_url) for _ in range(6)]
    try:
        journals = await asyncio.gather(
            *(log.create(f"o-{i}", opening(), owner="w", ttl=60) for i, log in enumerate(logs))
        )
        assert all(journal is not None for journal in journals)
    finally:
        await asyncio.gather(*(log.close() for log in logs))
    rows = await sql(postgres_url, "SELECT count(*) AS n FROM sagakit_schema_version")
    assert rows[0]["n"] == 1


async def test_a_record_written_by_a_newer_sagakit_is_refused(
    log: PostgresSagaLog, postgres_url: str
) -> None:
    await started(log)
    await sql(postgres_url, "UPDATE sagakit_records SET version = 9 WHERE seq = 1")
    with pytest.raises(SchemaMismatch, match="schema version 9"):
        await log.read("o-1")


async def test_tables_follow_the_search_path(postgres_url: str) -> None:
    await sql(postgres_url, "CREATE SCHEMA sagas")
    url = postgres_url + "?search_path=sagas"
    log = PostgresSagaLog.from_url(url)
    try:
        await started(log)
    finally:
        await log.close()
    rows = await sql(postgres_url, "SELECT to_regclass('sagas.sagakit_sagas') IS NOT NULL AS x")
    assert rows[0]["x"]


# --- values -----------------------------------------------------------------------------


async def test_json_text_is_kept_as_written(log: PostgresSagaLog) -> None:
    """json, not jsonb: key order kept, NUL in a string accepted (jsonb refuses both)."""
    journal = await started(log)
    result = {"z": 1, "a": "nul\u0000byte", "m": [1.5, 10**18]}
    await write(journal, [StepCompleted(0, result)])
    records = await log.read("o-1")
    assert records[-1] == StepCompleted(0, result)
    assert list(records[-1].result) == ["z", "a", "m"]


async def test_a_result_that_is_not_json_fails_stage_and_names_the_step(
    log: PostgresSagaLog,
) -> None:
    journal = await started(log)
    with pytest.raises(SagaError, match="step 0"):
        journal.stage([StepCompleted(0, {1, 2})])
    assert journal.version == 2
    await journal.flush()
    assert len(await log.read("o-1")) == 2


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), True, "5"])
async def test_a_bad_ttl_is_refused(log: PostgresSagaLog, ttl: Any) -> None:
    with pytest.raises(DefinitionError, match="ttl"):
        await log.create("o-1", opening(), owner="w", ttl=ttl)
    assert await log.read("o-1") == []


async def test_a_huge_ttl_is_capped_not_an_overflow(log: PostgresSagaLog) -> None:
    journal = await log.create("o-1", opening(), owner="w", ttl=1e300)
    assert journal is not None
    assert journal.lease is not None
    assert journal.lease.expires_at > 1e9


# --- group commit -----------------------------------------------------------------------


async def test_64_concurrent_flushes_take_far_fewer_commits(log: PostgresSagaLog) -> None:
    journals = [await started(log, f"o-{i}") for i in range(64)]
    before = log.stats.commits

    async def step(journal: Journal) -> None:
        await write(journal, [StepCompleted(0, {"n": 1}), StepStarted(1)])

    await asyncio.gather(*(step(j) for j in journals))
    commits = log.stats.commits - before
    assert commits <= 8, commits
    for i in range(64):
        assert len(await log.read(f"o-{i}")) == 4


async def test_two_batches_in_flight_keep_every_saga_in_order(postgres_url: str) -> None:
    log = PostgresSagaLog.from_url(postgres_url + "?batches_in_flight=2")
    try:
        journals = [await started(log, f"o-{i}") for i in range(40)]

        async def steps(i: int, journal: Journal) -> None:
            for n in range(10):
                await asyncio.sleep(0.001 * (i % 3))  # arrivals spread out
                await write(journal, [StepCompleted(0, n)])

        await asyncio.gather(*(steps(i, j) for i, j in enumerate(journals)))
        for i in range(40):
            expected = [*opening(), *(StepCompleted(0, n) for n in range(10))]
            assert typed(await log.read(f"o-{i}")) == typed(expected)
    finally:
        await log.close()


async def test_creates_share_commits_too(log: PostgresSagaLog) -> None:
    await started(log, "warm-up")
    before = log.stats.commits
    journals = await asyncio.gather(
        *(log.create(f"o-{i}", opening(), owner="w", ttl=60) for i in range(64))
    )
    assert all(j is not None for j in journals)
    assert log.stats.commits - before <= 8


async def test_large_flushes_go_in_batches_of_bounded_size(
    log: PostgresSagaLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL takes at most 1 GB in one statement: four sagas flushing 300 MB results
    at once, in one batch, each had its connection cut ("invalid message length") and
    failed as unavailable, again on every retry that batched them together."""
    monkeypatch.setattr(_postgres_group, "MAX_BATCH_BYTES", 25_000)
    journals = [await started(log, f"o-{i}") for i in range(8)]
    before = log.stats.batches
    await asyncio.gather(*(write(j, [StepCompleted(0, "x" * 10_000)]) for j in journals))
    assert log.stats.batches - before == 4  # two 10 KB flushes a batch
    small = [await started(log, f"s-{i}") for i in range(8)]
    before = log.stats.batches
    await asyncio.gather(*(write(j, [StepCompleted(0, "x")]) for j in small))
    assert log.stats.batches - before == 1
    for i in range(8):
        assert len(await log.read(f"o-{i}")) == 3


async def test_a_record_over_the_size_limit_fails_stage(
    log: PostgresSagaLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over 1 GB: no statement could carry it (the server cuts the connection, which
    looks retryable), so it is refused at once, as a value that is not JSON is."""
    monkeypatch.setattr(_postgres_group, "MAX_RECORD_BYTES", 1_000)
    journal = await started(log)
    with pytest.raises(SagaError, match=r"step 0 is 1,222 bytes.*at most 1,000"):
        journal.stage([StepCompleted(0, "\u00e9" * 600)])  # 1,200 bytes in UTF-8, 1,222 as JSON
    assert journal.version == 2
    with pytest.raises(SagaError, match="input"):
        await log.create("o-2", opening(data={"x": "x" * 1_000}), owner=None, ttl=60)
    await write(journal, [StepCompleted(0, "x" * 900)])


async def test_a_lost_lease_fails_only_its_own_flush_in_a_batch(
    log: PostgresSagaLog, postgres_url: str
) -> None:
    journals = [await started(log, f"o-{i}") for i in range(10)]
    other = PostgresSagaLog.from_url(postgres_url)
    try:
        await sql(postgres_url, "UPDATE sagakit_sagas SET lease_expires_at = now() - interval '1s'")
        assert await other.claim("o-3", owner="w-2", ttl=60) is not None
    finally:
        await other.close()
    results = await asyncio.gather(
        *(write(j, [StepCompleted(0, 1)]) for j in journals), return_exceptions=True
    )
    assert isinstance(results[3], LeaseLost)
    assert "epoch 2" in str(results[3])
    assert [r for i, r in enumerate(results) if i != 3] == [None] * 9
    assert len(await log.read("o-3")) == 2


async def test_bad_data_in_one_operation_does_not_fail_the_batch(log: PostgresSagaLog) -> None:
    """Past the checks at the boundary (here: by hand), the batch is split up."""
    from sagakit.adapters._postgres_group import Create, encode

    journals = [await started(log, f"o-{i}") for i in range(5)]
    rows = [encode("bad", record) for record in opening()]
    bad = Create("bad\x00id", "order", rows, SagaStatus.RUNNING, "w", 60.0)
    writes = [write(j, [StepCompleted(0, i)]) for i, j in enumerate(journals)]
    results = await asyncio.gather(
        *writes, asyncio.shield(log._committer.create(bad)), return_exceptions=True
    )
    assert results[:5] == [None] * 5
    assert isinstance(results[5], BackendError)
    assert not results[5].retryable
    for i in range(5):
        assert (await log.read(f"o-{i}"))[-1] == StepCompleted(0, i)


async def test_a_commit_whose_reply_was_lost_is_not_written_twice(
    log: PostgresSagaLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch commits, then the connection drops before the reply: the flush fails
    as unavailable, and the next flush finds its own records in place."""
    journal = await started(log)
    execute = PostgresSagaLog._execute_batch

    async def reply_lost(self: PostgresSagaLog, args: list[Any], n: int) -> list[Any]:
        await execute(self, args, n)
        raise BackendUnavailable("postgresql", "connection lost after COMMIT")

    monkeypatch.setattr(PostgresSagaLog, "_execute_batch", reply_lost)
    journal.stage([StepCompleted(0, "once")])
    with pytest.raises(BackendUnavailable):
        await journal.flush()
    monkeypatch.undo()
    journal.stage([StepStarted(1)])  # more staged meanwhile, as a driver may
    await journal.flush()
    assert typed(await log.read("o-1")) == typed(
        [*opening(), StepCompleted(0, "once"), StepStarted(1)]
    )
    assert journal.version == 4
    await write(journal, [StepCompleted(1, 2)])
    assert len(await log.read("o-1")) == 5


async def test_a_cancelled_flush_still_lands_and_the_journal_knows(log: PostgresSagaLog) -> None:
    journal = await started(log)
    journal.stage([StepCompleted(0, "x")])
    task = asyncio.create_task(journal.flush())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await log._committer.drain()
    assert (await log.read("o-1"))[-1] == StepCompleted(0, "x")
    await write(journal, [StepStarted(1)])  # the journal's count is still right
    assert len(await log.read("o-1")) == 4


async def test_claim_next_passes_over_a_saga_it_cannot_read(
    log: PostgresSagaLog, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(3):
        await log.create(f"o-{i}", opening(), owner=None, ttl=60)
    await sql(postgres_url, "UPDATE sagakit_records SET version = 9 WHERE saga_id = 'o-0'")
    claims = await log.claim_next(owner="w", ttl=60, limit=2)
    assert [c.journal.saga_id for c in claims] == ["o-1", "o-2"]
    assert "o-0" in caplog.text
    # Its lease was given back at once, for a worker that can read it.
    summary = await log.status("o-0")
    assert summary is not None
    assert summary.owner is None
    assert await log.claim_next(owner="w", ttl=60, limit=5) == []
    with pytest.raises(SchemaMismatch):
        await log.claim("o-0", owner="w", ttl=60)


async def test_claim_next_ends_with_more_unreadable_sagas_than_it_remembers(
    log: PostgresSagaLog, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the 1,000 it remembers (a rolling upgrade leaves that many to newer workers),
    claim_next took the same unreadable sagas and gave them back for ever: 9,000
    commits in 5 seconds, and no return."""
    monkeypatch.setattr(postgres_log, "_MAX_UNREADABLE", 2)
    for i in range(5):
        await log.create(f"new-{i}", opening(), owner=None, ttl=60)
    await log.create("old", opening(), owner=None, ttl=60)
    await sql(postgres_url, "UPDATE sagakit_records SET version = 9 WHERE saga_id LIKE 'new-%'")
    claims = await asyncio.wait_for(log.claim_next(owner="w", ttl=60, limit=3), 10)
    assert [c.journal.saga_id for c in claims] == ["old"]
    assert await asyncio.wait_for(log.claim_next(owner="w", ttl=60, limit=3), 10) == []


@pytest.mark.parametrize("payload", ['{"saga": "order"}', "[1, 2]", '{"step": 0, "x": 2}'])
async def test_a_damaged_record_is_refused_and_its_lease_given_back(
    log: PostgresSagaLog, postgres_url: str, payload: str
) -> None:
    """Edited by hand: a SchemaMismatch, never the decoder's KeyError, and no lease kept."""
    for saga_id in ("bad", "ok"):
        await log.create(saga_id, opening(), owner=None, ttl=60)
    await sql(
        postgres_url,
        "UPDATE sagakit_records SET payload = $1::json WHERE saga_id = 'bad' AND seq = 1",
        payload,
    )
    with pytest.raises(SchemaMismatch, match="damaged"):
        await log.read("bad")
    with pytest.raises(SchemaMismatch):
        await log.claim("bad", owner="w", ttl=60)
    claims = await log.claim_next(owner="w-2", ttl=60, limit=2)
    assert [c.journal.saga_id for c in claims] == ["ok"]
    summary = await log.status("bad")
    assert summary is not None
    assert summary.owner is None


async def test_a_status_written_by_a_newer_sagakit_is_refused_and_left_out_of_lists(
    log: PostgresSagaLog, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """As on SQLite: a SchemaMismatch naming the saga, not the enum's ValueError; and the
    listing shows the other sagas (it failed whole, hiding them all)."""
    await started(log, "o-1")
    await started(log, "o-2")
    await sql(postgres_url, "UPDATE sagakit_sagas SET status = 'paused' WHERE saga_id = 'o-1'")
    with pytest.raises(SchemaMismatch, match="paused") as raised:
        await log.status("o-1")
    assert raised.value.saga_id == "o-1"
    assert not raised.value.retryable
    with caplog.at_level(logging.WARNING):
        assert [s.saga_id for s in await log.list()] == ["o-2"]
    assert "'o-1'" in caplog.text
    assert "paused" in caplog.text
    assert [s.saga_id for s in await log.list(status="running")] == ["o-2"]


# --- two pools ---------------------------------------------------------------------------


async def test_two_logs_racing_claim_next_never_share_a_saga(postgres_url: str) -> None:
    first, second = (PostgresSagaLog.from_url(postgres_url) for _ in range(2))
    try:
        for i in range(200):
            await first.create(f"o-{i:03}", opening(), owner=None, ttl=60)

        async def worker(log: PostgresSagaLog, owner: str) -> list[str]:
            taken: list[str] = []
            while True:
                claims = await log.claim_next(owner=owner, ttl=60, limit=7)
                if not claims:
                    return taken
                taken += [claim.journal.saga_id for claim in claims]

        results = await asyncio.gather(
            *(worker(log, f"w-{n}-{i}") for n, log in enumerate((first, second)) for i in range(3))
        )
    finally:
        await first.close()
        await second.close()
    every = [saga_id for taken in results for saga_id in taken]
    assert sorted(every) == [f"o-{i:03}" for i in range(200)]  # each once, none lost
    assert sum(1 for taken in results if taken) >= 2  # the work was shared


# --- the server restarted ------------------------------------------------------------------


async def test_the_log_rides_out_a_server_restart(
    private_postgres: PrivatePostgres, private_postgres_url: str
) -> None:
    log = PostgresSagaLog.from_url(private_postgres_url + "?connect_timeout=2")
    try:
        journal = await started(log)
        await write(journal, [StepCompleted(0, "before")])
        with private_postgres.stopped():
            with pytest.raises(BackendUnavailable) as raised:
                await log.read("o-1")
            assert raised.value.retryable
            journal.stage([StepStarted(1)])
            with pytest.raises(BackendUnavailable):
                await journal.flush()
            assert journal.version == 4  # the staged record is kept for the next flush
            with pytest.raises(BackendUnavailable):
                await log.create("o-2", opening(), owner="w-1", ttl=60)
        # Up again: the same log object, no reopening.
        await journal.flush()
        await write(journal, [StepCompleted(1, "after"), *FINISHED[-1:]])
        expected = [*opening(), StepCompleted(0, "before"), StepStarted(1)]
        expected += [StepCompleted(1, "after"), *FINISHED[-1:]]
        assert typed(await log.read("o-1")) == typed(expected)
        assert (await log.status("o-1")).status is SagaStatus.COMPLETED  # type: ignore[union-attr]
    finally:
        await log.close()


async def test_writers_ride_out_restarts_mid_flush_without_gaps_or_doubles(
    private_postgres: PrivatePostgres, private_postgres_url: str
) -> None:
    """Flushes in flight when the server goes down: whatever their fate, retrying them
    leaves each saga's log exactly the records staged, once each, in order."""
    log = PostgresSagaLog.from_url(private_postgres_url + "?connect_timeout=2")
    try:
        journals = [await started(log, f"o-{i}") for i in range(16)]
        written = [0] * 16
        failures = 0

        async def restarts() -> None:
            for mode in ("immediate", "fast"):
                await asyncio.sleep(0.1)
                await asyncio.to_thread(private_postgres.restart, mode)

        restarting = asyncio.create_task(restarts())

        async def writer(i: int, journal: Journal) -> None:
            nonlocal failures
            while not restarting.done() or written[i] < 25:
                journal.stage([StepCompleted(0, written[i])])
                written[i] += 1
                while True:
                    try:
                        await journal.flush()
                        break
                    except BackendUnavailable:
                        failures += 1
                        await asyncio.sleep(0.05)
                await asyncio.sleep(0.005)

        await asyncio.gather(restarting, *(writer(i, j) for i, j in enumerate(journals)))
        assert failures > 0  # the restarts did hit flushes
        for i in range(16):
            expected = [*opening(), *(StepCompleted(0, n) for n in range(written[i]))]
            assert typed(await log.read(f"o-{i}")) == typed(expected)
    finally:
        await log.close()


async def test_an_orchestrator_rides_out_a_restart_mid_saga(
    private_postgres: PrivatePostgres, private_postgres_url: str
) -> None:
    """End to end: the server goes down while a step runs; the step's result waits in
    the journal, the orchestrator retries its flush, and the saga ends once the server
    is back, each step run once."""
    log = PostgresSagaLog.from_url(private_postgres_url + "?connect_timeout=1")
    charging, charged = asyncio.Event(), asyncio.Event()
    runs: list[str] = []

    async def reserve(ctx: StepContext) -> dict[str, int]:
        runs.append(ctx.step)
        return {"id": 7}

    async def charge(ctx: StepContext) -> int:
        runs.append(ctx.step)
        charging.set()
        await charged.wait()
        return 42

    async def ship(ctx: StepContext) -> str:
        runs.append(ctx.step)
        return "shipped"

    saga = SagaDefinition(
        "order", [Step("reserve", reserve), Step("charge", charge), Step("ship", ship)]
    )
    orchestrator = Orchestrator(log, sagas=[saga], retry_for=60)
    try:
        running = asyncio.create_task(orchestrator.run(saga, "o-1", {"n": 1}))
        await charging.wait()
        await asyncio.to_thread(private_postgres.stop, "immediate")
        charged.set()  # the result cannot be written now
        await asyncio.sleep(0.5)
        assert not running.done()
        await asyncio.to_thread(private_postgres.start)
        outcome = await asyncio.wait_for(running, 60)
        assert outcome.state is SagaStatus.COMPLETED
        assert runs == ["reserve", "charge", "ship"]
        records = await log.read("o-1")
        assert records[-1] == SagaFinished(SagaStatus.COMPLETED)
        assert StepCompleted(1, 42) in records
    finally:
        await orchestrator.close()
        await log.close()


async def test_an_immediate_shutdown_loses_nothing_committed(
    private_postgres: PrivatePostgres, private_postgres_url: str
) -> None:
    log = PostgresSagaLog.from_url(private_postgres_url)
    try:
        journals = [await started(log, f"o-{i}") for i in range(20)]
        await asyncio.gather(*(write(j, [StepCompleted(0, i)]) for i, j in enumerate(journals)))
        private_postgres.restart(mode="immediate")  # no checkpoint: recovery from the WAL
        for i in range(20):
            assert (await log.read(f"o-{i}"))[-1] == StepCompleted(0, i)
    finally:
        await log.close()


async def test_close_lands_what_was_flushing_then_refuses_for_good(postgres_url: str) -> None:
    log = PostgresSagaLog.from_url(postgres_url)
    journals = [await started(log, f"o-{i}") for i in range(8)]
    for i, journal in enumerate(journals):
        journal.stage([StepCompleted(0, i)])
    flushing = [asyncio.ensure_future(j.flush()) for j in journals]
    await asyncio.sleep(0)
    await log.close()
    assert await asyncio.gather(*flushing) == [None] * 8
    with pytest.raises(BackendError, match="closed") as raised:
        await log.read("o-1")
    assert not raised.value.retryable
    journals[0].stage([StepStarted(1)])
    with pytest.raises(BackendError, match="closed"):
        await journals[0].flush()
    await log.close()  # twice is fine
    reopened = PostgresSagaLog.from_url(postgres_url)
    try:
        assert [(await reopened.read(f"o-{i}"))[-1] for i in range(8)] == [
            StepCompleted(0, i) for i in range(8)
        ]
    finally:
        await reopened.close()


# --- errors ---


def test_a_missing_driver_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # import asyncpg now fails
    with pytest.raises(ConfigurationError, match=r"pip install 'sagakit\[postgres\]'"):
        open_saga_log("postgresql://u@h/db")


async def test_nothing_listening_is_unavailable() -> None:
    log = PostgresSagaLog.from_url(f"postgresql://u@127.0.0.1:{free_port()}/db?connect_timeout=2")
    with pytest.raises(BackendUnavailable) as raised:
        await log.status("o-1")
    assert raised.value.retryable
    assert isinstance(raised.value.__cause__, OSError)


async def test_an_unknown_database_or_role_is_refused(postgres_url: str) -> None:
    for url in (database_url(postgres_url, "no_such_database"), as_role(postgres_url, "nobody_")):
        log = PostgresSagaLog.from_url(url)
        with pytest.raises(BackendRefused) as raised:
            await log.read("o-1")
        assert not raised.value.retryable


async def test_a_read_only_server_is_unavailable_for_writes_not_refused(
    log: PostgresSagaLog, postgres_url: str
) -> None:
    """A standby (or a primary mid-failover) refuses writes: a retry may find a primary."""
    journal = await started(log)
    read_only = PostgresSagaLog.from_url(postgres_url + "?default_transaction_read_only=on")
    try:
        assert len(await read_only.read("o-1")) == 2
        with pytest.raises(BackendUnavailable, match="read-only") as raised:
            await read_only.create("o-2", opening(), owner="w", ttl=60)
        assert raised.value.retryable
        with pytest.raises(BackendUnavailable):
            await read_only.claim("o-1", owner="w-2", ttl=60)
    finally:
        await read_only.close()
    await write(journal, FINISHED)  # the writable log is unaffected


async def test_many_more_flushes_than_a_batch_holds_all_land(log: PostgresSagaLog) -> None:
    journals = await asyncio.gather(
        *(log.create(f"o-{i}", opening(), owner="w", ttl=60) for i in range(1100))
    )
    assert all(journal is not None for journal in journals)
    held = [j for j in journals if j is not None]
    await asyncio.gather(*(write(j, [StepCompleted(0, i)]) for i, j in enumerate(held)))
    summaries = await log.list(limit=2000)
    assert len(summaries) == 1100
    assert {s.records for s in summaries} == {3}


async def test_missing_privileges_are_refused(postgres_url: str) -> None:
    role = "sagakit_reader"
    await sql(postgres_url, f"DROP ROLE IF EXISTS {role}")
    await sql(postgres_url, f"CREATE ROLE {role} LOGIN")
    try:
        owner = PostgresSagaLog.from_url(postgres_url)
        await started(owner)
        await owner.close()
        await sql(postgres_url, f"REVOKE ALL ON SCHEMA public FROM {role}")
        log = PostgresSagaLog.from_url(as_role(postgres_url, role))
        try:
            with pytest.raises(BackendRefused, match="permission denied"):
                await log.read("o-1")
        finally:
            await log.close()
    finally:
        await sql(postgres_url, f"DROP OWNED BY {role}")
        await sql(postgres_url, f"DROP ROLE {role}")


async def test_a_worker_restarted_under_its_name_takes_its_sagas_over_at_once(
    log: PostgresSagaLog,
) -> None:
    # What tests/test_workers.py shows in memory, on the database's clock and claims.
    calls: list[tuple[str, int]] = []

    def step(ctx: StepContext) -> None:
        calls.append((ctx.step, ctx.attempt))

    saga = SagaDefinition("trip", [Step("a", step), Step("b", step)])
    first = [SagaStarted("trip", ("a", "b"), {}), StepStarted(0)]
    journal = await log.create("t-1", first, owner="w1", ttl=60)
    assert journal is not None
    await journal.flush()
    assert await Orchestrator(log, sagas=[saga], owner="w2").recover() == []
    recovered = await Orchestrator(log, sagas=[saga], owner="w1").recover()
    assert [o.saga_id for o in recovered] == ["t-1"]
    assert calls == [("a", 2), ("b", 1)]
    summary = await log.status("t-1")
    assert summary is not None
    assert (summary.status, summary.owner) == (SagaStatus.COMPLETED, None)


async def test_a_create_whose_caller_was_cancelled_gives_its_lease_back(
    log: PostgresSagaLog,
) -> None:
    """The group commit writes the saga all the same; leased to a caller gone, it
    blocked every worker until the lease expired (60 s here)."""
    await log.list(limit=1)  # the schema, made before the race below
    task = asyncio.create_task(log.create("o-new", opening(), owner="w-1", ttl=60))
    await asyncio.sleep(0)  # queued for the next group commit
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    summary = None
    for _ in range(200):
        summary = await log.status("o-new")
        if summary is not None and summary.owner is None:
            break
        await asyncio.sleep(0.01)
    assert summary is not None  # written: the commit was under way
    assert summary.owner is None
    [claim] = await log.claim_next(owner="w-2", ttl=60, limit=10)
    assert claim.journal.saga_id == "o-new"


async def _cancelled_mid_claim(postgres_url: str, call: Any, meanwhile: Any = None) -> None:
    """Run ``call`` with the records table locked by another session: the claim's UPDATE
    commits, then its read of the sagas' records waits inside the server. Cancel the
    caller there (the lease is taken by then, whatever asyncpg's cancel request does
    to the read), then start ``meanwhile()`` if given, then let the read through."""
    blocker = await asyncpg.connect(postgres_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE sagakit_records IN ACCESS EXCLUSIVE MODE")
        task = asyncio.create_task(call())
        waiting = 0
        for _ in range(500):  # until the claim waits for the table, in the server
            waiting = await blocker.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            )
            if waiting:
                break
            await asyncio.sleep(0.01)
        assert waiting, "the claim never reached the server"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        after = None if meanwhile is None else asyncio.create_task(meanwhile())
        await asyncio.sleep(0.1)
        await tx.commit()
        if after is not None:
            await asyncio.wait_for(after, 30)
    finally:
        await blocker.close()


async def _owner_after(log: PostgresSagaLog, saga_id: str) -> str | None:
    summary = None
    for _ in range(200):  # a lease given back is given back soon, not at once
        summary = await log.status(saga_id)
        if summary is not None and summary.owner is None:
            break
        await asyncio.sleep(0.01)
    assert summary is not None
    return summary.owner


async def test_a_claim_whose_caller_was_cancelled_gives_its_lease_back(
    log: PostgresSagaLog, postgres_url: str
) -> None:
    """Cancelled once its UPDATE had committed, the claim kept the lease, and nobody
    could run the saga until it expired (60 s here)."""
    await log.create("o-1", opening(), owner=None, ttl=60)
    await _cancelled_mid_claim(postgres_url, lambda: log.claim("o-1", owner="w-1", ttl=60))
    assert await _owner_after(log, "o-1") is None
    claim = await log.claim("o-1", owner="w-2", ttl=60)
    assert claim is not None


async def test_a_claim_next_whose_caller_was_cancelled_gives_its_leases_back(
    log: PostgresSagaLog, postgres_url: str
) -> None:
    await log.create("o-1", opening(), owner=None, ttl=60)
    await _cancelled_mid_claim(postgres_url, lambda: log.claim_next(owner="w-1", ttl=60, limit=5))
    assert await _owner_after(log, "o-1") is None
    [claim] = await log.claim_next(owner="w-2", ttl=60, limit=5)
    assert claim.journal.saga_id == "o-1"


# --- a reply lost on the wire ------------------------------------------------------------


@contextlib.asynccontextmanager
async def cut_once(postgres_url: str, marker: bytes) -> AsyncIterator[tuple[str, ReplyCutter]]:
    """A URL to the same database through a proxy that loses the reply to the next
    statement holding ``marker`` (after the server committed it)."""
    parts = urlsplit(postgres_url)
    async with ReplyCutter(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        proxy.cut_reply_to(marker)
        netloc = f"{parts.username}@127.0.0.1:{proxy.port}"
        yield urlunsplit(parts._replace(netloc=netloc)), proxy


async def test_a_start_whose_reply_was_lost_knows_it_recorded_the_saga(
    postgres_url: str,
) -> None:
    """The retry found the saga in the log and took it for someone else's: start() said
    False, as for a duplicate."""
    saga = SagaDefinition("trip", [Step("a", lambda ctx: None)])
    async with cut_once(postgres_url, b"WITH created AS") as (url, proxy):
        orchestrator = Orchestrator(url, sagas=[saga])
        try:
            assert await orchestrator.start(saga, "t-1", {"n": 1}) is True
            assert proxy.cuts == 1  # the reply was lost...
            assert await orchestrator.start(saga, "t-1", {"n": 1}) is False  # a duplicate
        finally:
            await orchestrator.close()
    rows = await sql(postgres_url, "SELECT count(*) AS n FROM sagakit_records")
    assert rows[0]["n"] == 1  # ...after the commit, and nothing was written twice


async def test_a_run_whose_create_reply_was_lost_drives_its_own_saga(postgres_url: str) -> None:
    """The retry found the saga in the log; run() claimed it back (a new epoch) and ran
    its first step as a second attempt, with a second intent recorded."""
    calls: list[tuple[str, int]] = []

    def step(ctx: StepContext) -> None:
        calls.append((ctx.step, ctx.attempt))

    saga = SagaDefinition("trip", [Step("a", step), Step("b", step)])
    async with cut_once(postgres_url, b"WITH created AS") as (url, proxy):
        orchestrator = Orchestrator(url, sagas=[saga], owner="w-1")
        try:
            outcome = await orchestrator.run(saga, "t-1")
            assert proxy.cuts == 1
        finally:
            await orchestrator.close()
    assert outcome.ok
    assert calls == [("a", 1), ("b", 1)]
    log = PostgresSagaLog.from_url(postgres_url)
    try:
        kinds = [type(r).__name__ for r in await log.read("t-1")]
    finally:
        await log.close()
    assert kinds == [
        "SagaStarted",
        "StepStarted",
        "StepCompleted",
        "StepStarted",
        "StepCompleted",
        "SagaFinished",
    ]


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("sslmode=bogus", "sslmode"),
        ("target_session_attrs=bogus", "target_session_attrs"),
        ("work_mem=bogus", "work_mem"),  # a server setting, refused by the server
        ("no_such_setting=1", "no_such_setting"),
        ("ssl=on", '"ssl"'),  # a server setting that cannot be set by a client
        ("sslmode=verify-full&sslrootcert=/no/such/ca.pem", "sslrootcert"),
        ("search_path=no_such_schema", "search_path"),
    ],
)
async def test_a_bad_url_option_is_a_configuration_error_naming_it(
    postgres_url: str, query: str, named: str
) -> None:
    """They were a plain BackendError (or, for a missing certificate file, a retryable
    BackendUnavailable: a worker retried it for ever)."""
    log = PostgresSagaLog.from_url(f"{postgres_url}?{query}&connect_timeout=5")
    try:
        with pytest.raises(ConfigurationError, match=named):
            await log.list()
    finally:
        await log.close()


async def test_a_port_out_of_range_is_a_configuration_error() -> None:
    log = PostgresSagaLog.from_url("postgresql://u@127.0.0.1:99999/db")
    with pytest.raises(ConfigurationError, match="port"):
        await log.status("o-1")


async def test_an_orchestrator_stops_at_once_on_a_bad_url_option(postgres_url: str) -> None:
    """Not retried for retry_for seconds: no retry can help."""
    saga = SagaDefinition("trip", [Step("a", lambda ctx: None)])
    orchestrator = Orchestrator(postgres_url + "?sslmode=bogus", retry_for=60)
    try:
        with pytest.raises(ConfigurationError, match="sslmode"):
            await asyncio.wait_for(orchestrator.run(saga, "t-1"), 10)
        with pytest.raises(ConfigurationError, match="sslmode"):
            await asyncio.wait_for(orchestrator.serve(), 10)
    finally:
        await orchestrator.close()


async def test_sagas_claimed_by_a_claim_next_cut_off_are_handed_out_by_the_next(
    private_postgres: PrivatePostgres, private_postgres_url: str
) -> None:
    """The server goes down after the claim committed, while it reads the sagas'
    records: the call fails (unavailable), and once the server was back the next
    claim_next found nothing, the sagas leased to this worker until the lease expired
    (60 s here)."""
    log = PostgresSagaLog.from_url(private_postgres_url)
    try:
        assert await log.claim_next(owner="w-1", ttl=60, limit=5) == []  # the statements
        await log.create("o-1", opening(), owner=None, ttl=60)
        blocker = await asyncpg.connect(private_postgres_url)
        await blocker.execute("BEGIN")
        await blocker.execute("LOCK TABLE sagakit_records IN ACCESS EXCLUSIVE MODE")
        task = asyncio.create_task(log.claim_next(owner="w-1", ttl=60, limit=5))
        for _ in range(500):  # until the claim, committed, waits to read the records
            waiting = await blocker.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            )
            if waiting:
                break
            await asyncio.sleep(0.01)
        assert waiting
        with private_postgres.stopped(), pytest.raises(BackendUnavailable):
            await task
        blocker.terminate()
        summary = await log.status("o-1")
        assert summary is not None
        assert summary.owner == "w-1"  # the claim had committed
        [claim] = await asyncio.wait_for(log.claim_next(owner="w-1", ttl=60, limit=5), 10)
        assert claim.journal.saga_id == "o-1"
        await write(claim.journal, FINISHED)
    finally:
        await log.close()


async def test_close_waits_for_a_cancelled_claim_to_give_its_leases_back(
    postgres_url: str,
) -> None:
    """A worker stopping (SIGTERM) cancels its claim_next and closes the log: the claim
    went on, but its give-back found the log closed, and the saga stayed leased to a
    worker gone until the lease expired (60 s here)."""
    log = PostgresSagaLog.from_url(postgres_url)
    assert await log.claim_next(owner="w-1", ttl=60, limit=5) == []  # the statements
    await log.create("o-1", opening(), owner=None, ttl=60)
    await _cancelled_mid_claim(
        postgres_url, lambda: log.claim_next(owner="w-1", ttl=60, limit=5), log.close
    )
    other = PostgresSagaLog.from_url(postgres_url)
    try:
        summary = await other.status("o-1")
        assert summary is not None
        assert summary.owner is None
    finally:
        await other.close()
