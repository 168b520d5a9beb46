"""Observability: OpenTelemetry metrics (the real SDK's in-memory reader), the slow-call
warning, ``journal.health()`` and ``casty-sa check``.

Each journal here gets a ``MeterProvider`` of its own (``meter_provider=``), so a test
reads only its own journal's numbers and the process's global provider is never set.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from casty import PersistedEvent, Snapshot
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy import URL, make_url

import casty_sa
from casty_sa import SAJournal, SequenceConflict
from casty_sa.cli import main
from casty_sa.cli.common import ExitCode
from casty_sa.metrics import INSTRUMENTS
from casty_sa.ordering import take_positions
from casty_sa.projections import Projection

from support import dbtools
from support.held_write import HeldWrite
from support.processes import free_port

PASSWORD = "s3cret-Health-pw"
BOUND = 30.0

#: name -> (unit, data points) of what a reader collected from casty_sa's meter
Collected = dict[str, tuple[str, list[Any]]]


@dataclass
class Meter:
    """A meter provider of the test's own and its in-memory reader."""

    reader: InMemoryMetricReader
    provider: MeterProvider

    def collect(self) -> Collected:
        data = self.reader.get_metrics_data()
        found: Collected = {}
        for resource in data.resource_metrics if data is not None else []:
            for scope in resource.scope_metrics:
                if scope.scope.name == "casty_sa":
                    for metric in scope.metrics:
                        found[metric.name] = (metric.unit or "", list(metric.data.data_points))
        return found


@pytest.fixture
async def meter() -> AsyncIterator[Meter]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield Meter(reader, provider)
    provider.shutdown()


def by(points: list[Any], attribute: str) -> dict[str, Any]:
    return {point.attributes[attribute]: point for point in points}


def as_documented(collected: Collected) -> None:
    """Every instrument seen has the documented unit and exactly the documented attributes."""
    for name, (unit, points) in collected.items():
        _, documented_unit, attributes, _ = INSTRUMENTS[name]
        assert unit == documented_unit, name
        for point in points:
            assert set(point.attributes) == set(attributes), (name, point.attributes)


def events(*names: str) -> list[PersistedEvent[Any]]:
    return [PersistedEvent(n, name, 1.0) for n, name in enumerate(names, start=1)]


# -- the instruments ---------------------------------------------------------------------------


async def test_each_instrument_after_real_calls(
    new_journal: Callable[..., SAJournal], meter: Meter, backend: str
) -> None:
    """Writes, reads, a conflict and back-pressure on a real database: every documented
    instrument they touch appears with its unit, its attributes and the right counts."""
    journal = new_journal(meter_provider=meter.provider, max_pending=4, group_commit=True)
    await journal.start()
    entities = [f"acct-{i}" for i in range(40)]
    await asyncio.gather(*(journal.persist(e, events("a", "b")) for e in entities))
    await journal.save_snapshot(entities[0], Snapshot(2, "state", 1.0))
    loaded = await asyncio.gather(*(journal.load(e) for e in entities))
    assert all(len(found) == 2 for found in loaded)
    assert await journal.load_snapshot(entities[0]) == Snapshot(2, "state", 1.0)
    with pytest.raises(SequenceConflict):
        await journal.persist(entities[0], [PersistedEvent(2, "again", 1.0)])

    collected = meter.collect()
    as_documented(collected)
    for _, points in collected.values():
        assert all(p.attributes.get("db.system", backend) == backend for p in points)
    writes = by(collected["casty_sa.write.duration"][1], "operation")
    assert writes["persist"].count == 41 and writes["save_snapshot"].count == 1
    assert 0 < writes["persist"].min <= writes["persist"].max < BOUND
    reads = by(collected["casty_sa.read.duration"][1], "operation")
    assert reads["load"].count == 40 and reads["load_snapshot"].count == 1
    # each call's first transaction: 40 persists and the conflicting one, and the snapshot
    [calls] = collected["casty_sa.group_commit.calls"][1]
    [rows] = collected["casty_sa.group_commit.events"][1]
    assert (calls.sum, rows.sum) == (42, 81)
    assert calls.max > 1  # concurrent calls shared transactions
    batches = by(collected["casty_sa.read.batch_size"][1], "kind")
    assert batches["events"].sum == 40 and batches["snapshots"].sum == 1
    [waited] = collected["casty_sa.write.backpressure.duration"][1]
    assert waited.count >= 1  # 40 callers, 4 places in the queue
    [depth] = collected["casty_sa.write.queue_depth"][1]
    assert depth.value == 0  # all written
    [error] = collected["casty_sa.errors"][1]
    assert (error.attributes["operation"], error.attributes["error.type"]) == (
        "persist",
        "SequenceConflict",
    )
    assert error.value == 1
    assert "casty_sa.retries" not in collected and "casty_sa.projection.lag" not in collected


@pytest.mark.only_backends("mysql")
async def test_a_write_sent_again_is_counted_as_a_retry(
    new_journal: Callable[..., SAJournal], meter: Meter, db_url: URL
) -> None:
    """A write whose lock wait timed out (MariaDB rolls it back) is sent again: counted in
    casty_sa.retries as a contended write."""
    journal = new_journal(meter_provider=meter.provider, statement_timeout=3.0)
    await journal.persist("a", events("first"))
    holder = await dbtools.mysql_connect(db_url)
    try:
        async with holder.cursor() as cursor:
            await cursor.execute(f"BEGIN; {take_positions(dbtools.MYSQL_QUOTES)}", (1,))
            while await cursor.nextset():
                pass
        write = asyncio.ensure_future(journal.persist("a", [PersistedEvent(2, "second", 1.0)]))
        deadline = time.monotonic() + BOUND
        while "casty_sa.retries" not in meter.collect():  # the lock wait is 1 s
            assert time.monotonic() < deadline, "the write was never sent again"
            await asyncio.sleep(0.05)
    finally:
        async with holder.cursor() as cursor:
            await cursor.execute("ROLLBACK")
        holder.close()
    await asyncio.wait_for(write, BOUND)
    [retry] = meter.collect()["casty_sa.retries"][1]
    assert dict(retry.attributes) == {
        "db.system": "mysql",
        "operation": "write",
        "reason": "contended",
    }
    assert retry.value >= 1


@pytest.mark.only_backends("sqlite")
async def test_projection_lag_grows_while_a_slice_holds_an_old_event(
    new_journal: Callable[..., SAJournal], meter: Meter
) -> None:
    """A slice holding an event written 100 s ago reports a lag of about 100 s."""
    journal = new_journal(meter_provider=meter.provider)
    await journal.persist("acct", [PersistedEvent(1, "old", time.time() - 100)])
    inside, release = asyncio.Event(), asyncio.Event()

    async def handler(session: Any, envelope: Any) -> None:
        inside.set()
        await release.wait()

    projection = Projection("balances", journal, handler)
    catching_up = asyncio.ensure_future(projection.catch_up())
    try:
        await asyncio.wait_for(inside.wait(), BOUND)
        [lag] = meter.collect()["casty_sa.projection.lag"][1]
        assert dict(lag.attributes) == {"projection": "balances", "slice": 0}
        assert 100 <= lag.value < 100 + BOUND
        as_documented(meter.collect())
    finally:
        release.set()
        assert await asyncio.wait_for(catching_up, BOUND) == 1


@pytest.mark.only_backends("sqlite")
async def test_projection_lag_is_zero_once_a_running_slice_has_caught_up(
    new_journal: Callable[..., SAJournal], meter: Meter
) -> None:
    """A running projection that applied an event written 100 s ago (a rebuild) and now waits
    for new events is not behind: its lag is 0, not the age its last batch had."""
    journal = new_journal(meter_provider=meter.provider)
    await journal.persist("acct", [PersistedEvent(1, "old", time.time() - 100)])
    applied = asyncio.Event()

    async def handler(session: Any, envelope: Any) -> None:
        applied.set()

    projection = Projection("balances", journal, handler)
    running = asyncio.ensure_future(projection.run())
    try:
        await asyncio.wait_for(applied.wait(), BOUND)
        deadline = time.monotonic() + BOUND
        while True:
            lags = meter.collect().get("casty_sa.projection.lag", (None, []))[1]
            if lags and lags[0].value == 0.0:
                break
            assert time.monotonic() < deadline, [lag.value for lag in lags]
            await asyncio.sleep(0.02)
    finally:
        await projection.stop()
        await asyncio.wait_for(running, BOUND)


async def test_without_opentelemetry_the_journal_records_nothing(tmp_path: Path) -> None:
    """Without the API package (its import blocked) the hooks are no-ops and calls work."""
    script = f"""
import asyncio, sys
sys.modules["opentelemetry"] = None
from casty import PersistedEvent
from casty_sa import SAJournal
import casty_sa.metrics as metrics
assert metrics.otel is None
async def run():
    async with SAJournal("sqlite:///{tmp_path / "j.db"}") as journal:
        await journal.persist("a", [PersistedEvent(1, "x", 1.0)])
        assert len(await journal.load("a")) == 1
        assert journal.metrics._on is None
asyncio.run(run())
print("ok")
"""
    await _prints_ok(script)


async def test_journals_made_before_and_after_the_global_provider_is_set(
    tmp_path: Path,
) -> None:
    """The global provider set between two journals (in a process of its own, as the global
    provider can be set once): the second journal's queue depth is observed too, not
    lost behind the instruments the first one made on the API's proxy."""
    script = f"""
import asyncio, sqlite3, time
from casty import PersistedEvent
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from casty_sa import SAJournal

def depth(reader):
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "casty_sa.write.queue_depth":
                    return sum(point.value for point in metric.data.data_points)
    return None

async def run():
    early = SAJournal("sqlite:///{tmp_path / "early.db"}")
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    async with early, SAJournal("sqlite:///{tmp_path / "late.db"}", busy_timeout=100) as late:
        holder = sqlite3.connect("{tmp_path / "late.db"}", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the late journal's writes queue up behind it
        calls = [
            asyncio.ensure_future(late.persist(f"e{{i}}", [PersistedEvent(1, "x", 1.0)]))
            for i in range(20)
        ]
        try:
            deadline = time.monotonic() + 20
            while not depth(reader):
                assert time.monotonic() < deadline, "the queue's depth was never observed"
                await asyncio.sleep(0.02)
        finally:
            holder.execute("ROLLBACK")
        await asyncio.gather(*calls)
        assert depth(reader) == 0
asyncio.run(run())
print("ok")
"""
    await _prints_ok(script)


# -- the slow-call warning ---------------------------------------------------------------------


def slow_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "slow call" in r.getMessage()]


@pytest.mark.only_backends("sqlite")
async def test_a_call_slower_than_the_threshold_is_logged(
    new_journal: Callable[..., SAJournal], db_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    """A persist that waits for another process's write lock is logged, naming the call and
    the entity (never the payload); calls below the threshold are not."""
    caplog.set_level(logging.WARNING, "casty_sa")
    journal = new_journal(slow_call_threshold=0.2)
    await journal.persist("quick", events("fast"))
    assert slow_lines(caplog) == []
    holder = sqlite3.connect(str(db_url.database), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a real write lock: the journal's writer waits
    try:
        started = time.monotonic()
        write = asyncio.ensure_future(journal.persist("acct-slow", events("secret-payload")))
        await asyncio.sleep(0.5)  # what makes the call slow, not a synchronisation
        assert not write.done()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    await asyncio.wait_for(write, BOUND)
    assert time.monotonic() - started > 0.2
    [line] = slow_lines(caplog)
    assert "persist" in line and "'acct-slow'" in line and "secret-payload" not in line
    caplog.clear()
    quiet = new_journal(slow_call_threshold=None)
    await quiet.persist("never", events("x"))
    assert slow_lines(caplog) == []


# -- health ------------------------------------------------------------------------------------


def down_url(journal_url: URL, tmp_path: Path) -> URL:
    """A URL of the test's kind that reaches no database (with a password in it)."""
    if journal_url.get_backend_name() == "sqlite":
        return make_url(f"sqlite+aiosqlite:///{tmp_path / 'missing-dir' / 'journal.db'}")
    return journal_url.set(host="127.0.0.1", port=free_port(), password=PASSWORD, query={})


async def test_health_of_a_database_that_is_down(
    db_url: URL, make_journal: Callable[..., SAJournal], tmp_path: Path
) -> None:
    """Nothing listens (no such SQLite directory): health() answers at once, not ok, with
    no password in it, and never raises."""
    journal = make_journal(down_url(db_url, tmp_path), connect_timeout=2.0)
    started = time.monotonic()
    health = await asyncio.wait_for(journal.health(within=5.0), BOUND)
    assert time.monotonic() - started < 5.0
    assert (health.ok, health.reachable, health.revision) == (False, False, None)
    assert health.error is not None
    assert PASSWORD not in health.message and PASSWORD not in repr(health)
    assert "could not" in health.message


@pytest.mark.only_backends("postgresql", "mysql")
async def test_health_of_a_database_that_does_not_answer(
    db_url: URL, new_journal: Callable[..., SAJournal], backend: str
) -> None:
    """A database whose version table is locked by another session answers nothing:
    health() returns within its limit (not ok), then ok again once the lock goes."""
    journal = new_journal(statement_timeout=20.0)
    assert (await journal.health()).ok
    version = casty_sa.models.VERSION_TABLE
    if backend == "postgresql":
        holder = await asyncpg.connect(**dbtools.asyncpg_args(db_url))
        await holder.execute(f"BEGIN; LOCK TABLE {version} IN ACCESS EXCLUSIVE MODE")
    else:
        holder = await dbtools.mysql_connect(db_url)
        async with holder.cursor() as cursor:
            await cursor.execute(f"LOCK TABLES {version} WRITE")
    try:
        started = time.monotonic()
        health = await asyncio.wait_for(journal.health(within=0.5), BOUND)
        assert time.monotonic() - started < 2.0
        assert (health.ok, health.reachable, health.latency) == (False, False, None)
        assert "no answer within 0.5s" in health.message
    finally:
        if backend == "postgresql":
            await holder.execute("COMMIT")
            await holder.close()
        else:
            async with holder.cursor() as cursor:
                await cursor.execute("UNLOCK TABLES")
            holder.close()
    assert (await asyncio.wait_for(journal.health(), BOUND)).ok


@pytest.mark.only_backends("sqlite")
async def test_health_and_check_of_a_database_behind_head(
    tmp_path: Path, make_journal: Callable[..., SAJournal], capsys: pytest.CaptureFixture[str]
) -> None:
    """A database at an older revision: health() is not ok and says where it is and what
    to run, and ``casty-sa check`` prints the same line and exits 1; at head both agree."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    await casty_sa.upgrade(url, "0002")
    journal = make_journal(url, migrate=False)
    health = await journal.health()
    assert (health.ok, health.reachable, health.revision) == (False, True, "0002")
    assert health.head == casty_sa.head_revision() != "0002"
    assert f"at 0002, head is {health.head}. Run: casty-sa upgrade" in health.message
    assert health.latency is not None and 0 < health.latency < BOUND
    code = await asyncio.to_thread(main, ["check", "--url", url])
    assert code == ExitCode.NOT_AT_HEAD
    assert capsys.readouterr().out.strip() == health.message
    await casty_sa.upgrade(url)
    health = await journal.health()
    assert health.ok and health.message.endswith(f": at head ({health.head})")
    assert await asyncio.to_thread(main, ["check", "--url", url]) == ExitCode.OK
    assert capsys.readouterr().out.strip() == health.message
    await journal.close()
    assert not (await journal.health()).ok  # a closed journal is not ready


@pytest.mark.only_backends("postgresql")
async def test_check_of_a_database_that_is_down(
    db_url: URL, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``casty-sa check`` on a database nobody answers for: exit 2, no password printed."""
    url = down_url(db_url, tmp_path).render_as_string(hide_password=False)
    code = await asyncio.to_thread(main, ["check", "--url", url, "--connect-timeout", "2"])
    out, err = capsys.readouterr()
    assert code == ExitCode.DATABASE_ERROR
    assert "could not" in err and PASSWORD not in out + err


def test_the_docs_table_lists_each_instrument_as_the_code_records_it() -> None:
    """docs/observability.md's table: one row per instrument, as casty_sa.metrics has it."""
    page = Path(__file__).resolve().parent.parent / "docs" / "observability.md"
    rows = {}
    for line in page.read_text().splitlines():
        if line.startswith("| `casty_sa."):
            name, kind, unit, attributes, meaning = (c.strip() for c in line.strip("|").split("|"))
            rows[name.strip("`")] = (
                kind,
                unit.strip("`"),
                tuple(a.strip(" `") for a in attributes.split(",")),
                meaning.replace("`", ""),
            )
    assert rows == INSTRUMENTS


async def _prints_ok(script: str) -> None:
    """Run ``script`` in a fresh interpreter (its process-wide OpenTelemetry state its own);
    it must print ``ok``."""
    command = [sys.executable, "-c", script]
    done = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "ok", done.stderr


@pytest.mark.only_backends("postgresql")
@pytest.mark.only_drivers("asyncpg")
async def test_projection_lag_is_not_zero_while_a_running_transaction_holds_events_back(
    new_journal: Callable[..., SAJournal], db_url: URL, meter: Meter
) -> None:
    """A transaction still running below a committed event 100 s old holds that event back
    from the live stream: the slice is behind, not caught up (its lag was 0)."""

    journal = new_journal(meter_provider=meter.provider)
    held = HeldWrite(db_url, "late")
    await held.begin()
    try:
        await journal.persist("acct", [PersistedEvent(1, "old", time.time() - 100)])

        async def handler(session: Any, envelope: Any) -> None:
            pass

        projection = Projection("balances", journal, handler)
        running = asyncio.ensure_future(projection.run())
        try:
            deadline = time.monotonic() + BOUND
            while True:  # until the worker's stream waits at a page the transaction holds
                workers = [worker for worker, _ in projection._workers.values()]
                stream = workers[0].lag._stream if workers else None
                if stream is not None and getattr(stream, "_blocked", 0) > 0:
                    break
                assert time.monotonic() < deadline, "the stream never met the held page"
                await asyncio.sleep(0.02)
            lags = meter.collect().get("casty_sa.projection.lag", (None, []))[1]
            assert all(lag.value != 0.0 for lag in lags), [lag.value for lag in lags]
        finally:
            await projection.stop()
            await asyncio.wait_for(running, BOUND)
    finally:
        await held.end(commit=False)
