"""PostgreSQL faults: the server stops and comes back, connections are killed, the pool runs
dry, passwords are wrong, and the journal's role has only the privileges it needs.

Outage tests use a PostgreSQL of their own (``dedicated_pg``): initdb'd from the pgserver
wheel's binaries into a tmp dir, listening on a free 127.0.0.1 port with password
(SCRAM) authentication, so the tests can stop it (``pg_ctl stop -m fast`` and
``-m immediate``) and start it again without touching the suite's shared server. Pool
exhaustion needs no outage and runs on both backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
import traceback
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from casty import PersistedEvent, Snapshot
from sqlalchemy import URL, text

import casty_sa
from casty_sa import (
    CommitOutcomeUnknown,
    DatabaseAccessDenied,
    DatabaseUnavailable,
    InvalidEventError,
    JournalClosed,
    JournalError,
    SAJournal,
    SchemaError,
    SequenceConflict,
)
from casty_sa.backends import ConnectionLost, WriteRefused, classify_write_failure
from casty_sa.retention import LOCK_TIMEOUT

from support import dbtools, internals
from support.processes import free_port
from support.writers import check_outcomes, run_writers_through

ADMIN_PASSWORD = "adm1n-Pw-casty"
APP_PASSWORD = "app-Pw-9f3c-casty"
OWNER_PASSWORD = "owner-Pw-77aa-casty"
APP_NAME = "casty-sa-fault-test"
_db_counter = itertools.count()


# -- a PostgreSQL of our own -------------------------------------------------------------------


def _pg_bin() -> Path:
    import pgserver  # type: ignore[attr-defined,unused-ignore]

    return Path(pgserver.__file__).parent / "pginstall" / "bin"


class DedicatedPostgres:
    """A PostgreSQL server this module may stop and start at will.

    PostgreSQL refuses to run as root; under root the binaries run as pgserver's own
    unprivileged ``pgserver`` user, as the shared fixture does.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.bin = _pg_bin()
        self.user: str | None = None
        if os.geteuid() == 0:
            from pgserver.utils import (  # type: ignore[import-not-found,unused-ignore]
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            self.user = "pgserver"
            entry: Any = ensure_user_exists(self.user)
            ensure_prefix_permissions(root)
            ensure_prefix_permissions(self.bin)
            os.chown(root, entry.pw_uid, entry.pw_gid)

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run(
            [str(self.bin / program), *args],
            capture_output=True,
            text=True,
            timeout=60,
            user=self.user,
            cwd=self.root,
        )
        if done.returncode != 0:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise RuntimeError(f"{program} {args} failed: {done.stderr}\n{log[-3000:]}")

    def init(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(ADMIN_PASSWORD)
        if self.user is not None:
            shutil.chown(pwfile, self.user)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-E",
            "utf8",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={pwfile}",
            "--no-sync",
        )

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root}"
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-l", str(self.root / "log"),
                  "-o", options, "start")  # fmt: skip

    def stop(self, mode: str) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-m", mode, "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(
        self, user: str = "postgres", password: str = ADMIN_PASSWORD, db: str = "postgres"
    ) -> URL:
        return URL.create("postgresql+asyncpg", user, password, "127.0.0.1", self.port, db)

    async def admin(self, *statements: str, db: str = "postgres") -> list[Any]:
        """Run statements as the superuser; return the rows of the last one."""
        conn = await asyncpg.connect(
            user="postgres", password=ADMIN_PASSWORD, host="127.0.0.1", port=self.port,
            database=db,
        )  # fmt: skip
        try:
            rows: list[Any] = []
            for statement in statements:
                rows = await conn.fetch(statement)
            return rows
        finally:
            await conn.close()


@pytest.fixture(scope="module")
def dedicated_pg() -> Iterator[DedicatedPostgres]:
    root = Path(tempfile.mkdtemp(prefix="casty-sa-pgfault-"))
    server = DedicatedPostgres(root)
    server.init()
    server.start()
    try:
        yield server
    finally:
        if server.running():
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def pg(dedicated_pg: DedicatedPostgres) -> AsyncIterator[DedicatedPostgres]:
    """The dedicated server, running at the start and at the end of each test."""
    if not dedicated_pg.running():
        dedicated_pg.start()
    yield dedicated_pg
    if not dedicated_pg.running():
        dedicated_pg.start()


@pytest.fixture(params=["asyncpg", "psycopg"])
def fault_driver(request: pytest.FixtureRequest) -> str:
    """The driver the journal of a fault test runs on: every fault, both drivers."""
    driver: str = request.param
    return driver


@pytest.fixture
async def fault_db(pg: DedicatedPostgres, fault_driver: str) -> AsyncIterator[URL]:
    """A fresh database at head on the dedicated server (admin URL, the test's driver)."""
    name = f"fault_{os.getpid()}_{next(_db_counter)}"
    await pg.admin(f'CREATE DATABASE "{name}"')
    url = pg.url(db=name)
    await casty_sa.upgrade(url)
    yield url.set(drivername=f"postgresql+{fault_driver}")
    if not pg.running():
        pg.start()
    await pg.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fault_journal(make_journal: Callable[..., SAJournal], url: URL, **options: Any) -> SAJournal:
    """A journal with short timeouts and a recognisable application_name."""
    defaults: dict[str, Any] = {
        "connect_timeout": 2.0,
        "statement_timeout": 10.0,
        "read_retries": 2,
        "retry_backoff": 0.05,
        "connect_args": named(url, APP_NAME),
    }
    return make_journal(url, **{**defaults, **options})


def named(url: URL, application_name: str) -> dict[str, Any]:
    """``connect_args`` naming the connections of ``url``'s driver in ``pg_stat_activity``."""
    if url.get_driver_name() == "psycopg":
        return {"application_name": application_name}
    return {"server_settings": {"application_name": application_name}}


async def journal_backends(pg: DedicatedPostgres, db: str, *, waiting: bool = False) -> list[int]:
    """Backend pids of the journal's connections (optionally: only those waiting on a lock)."""
    condition = " AND wait_event_type = 'Lock'" if waiting else ""
    rows = await pg.admin(
        "SELECT pid FROM pg_stat_activity WHERE application_name = "
        f"'{APP_NAME}' AND datname = '{db}'{condition}"
    )
    return [int(r["pid"]) for r in rows]


async def terminate(pg: DedicatedPostgres, pids: list[int]) -> None:
    if pids:
        await pg.admin(f"SELECT pg_terminate_backend(pid) FROM unnest(ARRAY{pids}) AS pid")


# -- the server goes away and comes back -------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_calls_during_an_outage_fail_promptly_and_work_after_restart(
    pg: DedicatedPostgres,
    fault_db: URL,
    make_journal: Callable[..., SAJournal],
    mode: str,
) -> None:
    journal = fault_journal(make_journal, fault_db)
    await journal.persist("acct", [PersistedEvent(1, "before", 1.0)])
    await journal.save_snapshot("acct", Snapshot(1, "state", 1.0))
    await asyncio.gather(*(journal.load("acct") for _ in range(8)))  # several pooled conns

    await asyncio.to_thread(pg.stop, mode)
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "persist": lambda: journal.persist("acct", [PersistedEvent(2, "during", 1.0)]),
        "save_snapshot": lambda: journal.save_snapshot("acct", Snapshot(2, "during", 1.0)),
        "load": lambda: journal.load("acct"),
        "load_snapshot": lambda: journal.load_snapshot("acct"),
    }
    for name, call in calls.items():
        started = time.monotonic()  # each call: fails within connect_timeout plus retries
        with pytest.raises(DatabaseUnavailable) as info:
            await asyncio.wait_for(call(), 30)
        elapsed = time.monotonic() - started
        assert elapsed < 3.0, f"{name} took {elapsed:.1f}s to fail during the outage"
        assert not isinstance(info.value, CommitOutcomeUnknown), (name, str(info.value))
        assert "127.0.0.1" in str(info.value) and ADMIN_PASSWORD not in str(info.value)

    await asyncio.to_thread(pg.start)
    # the same journal object works again; the failed calls stored nothing
    assert [e.event for e in await journal.load("acct")] == ["before"]
    assert await journal.load_snapshot("acct") == Snapshot(1, "state", 1.0)
    await journal.persist("acct", [PersistedEvent(2, "after", 1.0)])
    await journal.save_snapshot("acct", Snapshot(2, "after", 1.0))
    assert [e.event for e in await journal.load("acct")] == ["before", "after"]


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "own-transaction"])
@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_server_stopped_mid_run_loses_nothing_acknowledged(
    pg: DedicatedPostgres,
    fault_db: URL,
    make_journal: Callable[..., SAJournal],
    mode: str,
    group_commit: bool,
) -> None:
    journal = fault_journal(make_journal, fault_db, group_commit=group_commit)
    entities = [f"w{i}" for i in range(10)]

    async def outage() -> None:
        await asyncio.to_thread(pg.stop, mode)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(pg.start)

    outcomes = await run_writers_through(journal, outage, entities)
    assert outcomes.errors, "the outage did not interrupt any write"
    assert all(isinstance(e, DatabaseUnavailable) for e in outcomes.errors), outcomes.errors[:3]
    await check_outcomes(journal, entities, outcomes)


# -- connections killed from the server side ---------------------------------------------------


async def test_idle_pooled_connections_killed_are_replaced_silently(
    pg: DedicatedPostgres, fault_db: URL, make_journal: Callable[..., SAJournal]
) -> None:
    journal = fault_journal(make_journal, fault_db, read_retries=0)
    await journal.persist("acct", [PersistedEvent(1, "x", 1.0)])
    await asyncio.gather(*(journal.load("acct") for _ in range(10)))
    victims = await journal_backends(pg, fault_db.database or "")
    assert len(victims) >= 2
    await terminate(pg, victims)
    # no retries allowed: the checkout's liveness check must notice and reconnect on its own
    for _ in range(3):
        assert len(await journal.load("acct")) == 1
    await journal.persist("acct", [PersistedEvent(2, "y", 1.0)])
    await journal.save_snapshot("acct", Snapshot(2, "s", 1.0))
    assert set(await journal_backends(pg, fault_db.database or "")).isdisjoint(victims)


async def test_a_psycopg_connection_ended_while_idle_is_replaced_without_a_warning(
    new_postgres_db: Callable[..., Awaitable[URL]], make_journal: Callable[..., SAJournal]
) -> None:
    """REVIEW (review-pg): psycopg finds the server's goodbye waiting in an idle connection's
    socket and the journal takes another connection; the statement it had ready was never
    awaited, and Python printed ``RuntimeWarning: coroutine 'AsyncCursor.execute' was never
    awaited`` into the application's output at each such replacement."""
    url = (await new_postgres_db()).set(drivername="postgresql+psycopg")
    journal = make_journal(url, pool_size=1)
    await journal.persist("acct", [PersistedEvent(1, "x", 1.0)])
    backend = internals.backend(journal)
    await backend.release_held()
    async with backend.connection() as conn:
        victim = conn.info.backend_pid
    admin = await psycopg.AsyncConnection.connect(
        dbtools.plain(url.set(drivername="postgresql")), autocommit=True
    )
    try:
        await admin.execute("SELECT pg_terminate_backend(%s)", (victim,))
    finally:
        await admin.close()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert len(await journal.load("acct")) == 1
        gc.collect()
    assert not [w for w in seen if "never awaited" in str(w.message)]


async def test_a_killed_psycopg_listener_is_replaced_without_an_error_in_the_log(
    new_postgres_db: Callable[..., Awaitable[URL]],
    make_journal: Callable[..., SAJournal],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """REVIEW (review-pg): the live readers' LISTEN connection ended by the server is closed
    and replaced; closing it through SQLAlchemy's pool ran a reset (a ROLLBACK) on the dead
    psycopg connection, and the pool logged "Exception during reset or similar" at ERROR,
    with a traceback, in the application's log."""
    url = (await new_postgres_db()).set(drivername="postgresql+psycopg")
    reader_journal, writer_journal = make_journal(url), make_journal(url)
    admin = await psycopg.AsyncConnection.connect(
        dbtools.plain(url.set(drivername="postgresql")), autocommit=True
    )
    listening = "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN%%' AND datname = %s"

    async def listeners() -> list[int]:
        found = await (await admin.execute(listening, (url.database,))).fetchall()
        return [row[0] for row in found]

    async def until(check: Callable[[list[int]], bool]) -> list[int]:
        async with asyncio.timeout(10):
            while True:
                pids = await listeners()
                if check(pids):
                    return pids
                await asyncio.sleep(0.02)

    stream = reader_journal.events(live=True)
    seen: asyncio.Queue[Any] = asyncio.Queue()

    async def read() -> None:
        async for event in stream:
            seen.put_nowait(event)

    reading = asyncio.create_task(read())
    try:
        caplog.set_level(logging.ERROR)
        [first] = await until(lambda pids: len(pids) == 1)
        await admin.execute("SELECT pg_terminate_backend(%s)", (first,))
        for n in (1, 2):  # read through the poll, then on the new LISTEN connection
            await writer_journal.persist("acct", [PersistedEvent(n, "x", 1.0)])
            async with asyncio.timeout(10):
                await seen.get()
        await until(lambda pids: len(pids) == 1 and first not in pids)
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await admin.close()
    assert "Exception during reset" not in caplog.text


async def _locked_table(pg: DedicatedPostgres, db: str) -> asyncpg.Connection:
    """An admin connection holding an exclusive lock on the events table (open transaction)."""
    conn = await asyncpg.connect(
        user="postgres", password=ADMIN_PASSWORD, host="127.0.0.1", port=pg.port, database=db
    )
    await conn.execute("BEGIN; LOCK TABLE casty_sa_events IN ACCESS EXCLUSIVE MODE")
    return conn


async def _wait_for_waiters(pg: DedicatedPostgres, db: str, count: int = 1) -> list[int]:
    deadline = time.monotonic() + 10
    while len(pids := await journal_backends(pg, db, waiting=True)) < count:
        assert time.monotonic() < deadline, "the journal's statement never reached the server"
        await asyncio.sleep(0.02)
    return pids


async def test_read_killed_mid_statement_is_retried_transparently(
    pg: DedicatedPostgres,
    fault_db: URL,
    make_journal: Callable[..., SAJournal],
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = fault_db.database or ""
    journal = fault_journal(make_journal, fault_db, read_retries=3)
    await journal.persist("acct", [PersistedEvent(1, "a", 1.0), PersistedEvent(2, "b", 1.0)])
    lock = await _locked_table(pg, db)
    try:
        load = asyncio.ensure_future(journal.load("acct"))
        await terminate(pg, await _wait_for_waiters(pg, db))  # killed while running
        await _wait_for_waiters(pg, db)  # the retry is waiting on the lock again
    finally:
        await lock.execute("COMMIT")
        await lock.close()
    assert [e.event for e in await asyncio.wait_for(load, 10)] == ["a", "b"]
    assert "retry 1 of 3" in caplog.text


def server_pid(driver: Any) -> int:
    """The server process of an asyncpg or psycopg connection."""
    if hasattr(driver, "get_server_pid"):
        return int(driver.get_server_pid())
    return int(driver.info.backend_pid)


@contextlib.asynccontextmanager
async def goodbye_arrived(driver: Any) -> AsyncIterator[None]:
    """Wait, on leaving, until the server's goodbye to ``driver`` (ended in the block) has
    reached the client: asyncpg has read it (the connection is closed), or it waits in
    psycopg's socket."""
    gone = asyncio.Event()
    if hasattr(driver, "add_termination_listener"):
        driver.add_termination_listener(lambda _connection: gone.set())
        yield
        async with asyncio.timeout(5):
            await gone.wait()
        assert driver.is_closed()
        return
    loop = asyncio.get_running_loop()
    socket = driver.pgconn.socket
    yield
    loop.add_reader(socket, gone.set)
    try:
        async with asyncio.timeout(5):
            await gone.wait()
    finally:
        loop.remove_reader(socket)


async def test_a_write_on_a_connection_the_server_just_ended_is_sent_on_another(
    pg: DedicatedPostgres,
    fault_db: URL,
    make_journal: Callable[..., SAJournal],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server ends the writer's kept session between the journal's look at it and the
    write: the driver, which has the server's goodbye by then (asyncpg has read it, psycopg
    finds it waiting in the socket), refuses the statement before sending it, and the
    journal sends it on another connection instead of reporting an unknown outcome. The
    session is ended at that exact point (the backend hands the connection out, then the
    test ends it and waits until the goodbye reached the client), so the test never
    depends on how fast the goodbye travels."""
    db = fault_db.database or ""
    journal = fault_journal(make_journal, fault_db)
    await journal.persist("acct", [PersistedEvent(1, "a", 1.0)])
    admin = await asyncpg.connect(
        user="postgres", password=ADMIN_PASSWORD, host="127.0.0.1", port=pg.port, database=db
    )
    backend = internals.backend(journal)
    take_writer = backend.take_writer
    ended: list[int] = []

    async def take_then_end() -> Any:
        fairy = await take_writer()
        if not ended:
            driver = fairy.driver_connection
            ended.append(server_pid(driver))
            async with goodbye_arrived(driver):
                await admin.execute("SELECT pg_terminate_backend($1)", ended[0])
        return fairy

    backend.take_writer = take_then_end
    try:
        caplog.clear()
        await journal.persist("acct", [PersistedEvent(2, "b", 1.0)])
    finally:
        await admin.close()
    assert ended, "the write never took a connection"
    assert "a write was not sent" in caplog.text
    assert [e.event for e in await journal.load("acct")] == ["a", "b"]


async def test_writes_racing_the_end_of_their_session_are_stored_or_said_unknown(
    pg: DedicatedPostgres, fault_db: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """The server ends the writer's kept session a moment after its last use (too recent
    for a ping), again and again. Whether the next write left before the server's goodbye
    arrived (then its outcome is unknown, and says so) or after (then it is stored through
    another connection), every outcome the journal reports is the truth."""
    db = fault_db.database or ""
    journal = fault_journal(make_journal, fault_db)
    admin = await asyncpg.connect(
        user="postgres", password=ADMIN_PASSWORD, host="127.0.0.1", port=pg.port, database=db
    )
    reported: dict[int, bool] = {}
    try:
        for k in range(30):
            await journal.persist(f"acct-{k}", [PersistedEvent(1, k, 1.0)])
            held = internals.held_writer(journal)
            assert held is not None, "the flusher keeps its connection between writes"
            pid = server_pid(held.driver_connection)
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
            try:
                await journal.persist(f"acct-{k}", [PersistedEvent(2, k, 1.0)])
            except CommitOutcomeUnknown as unknown:
                # sent before the goodbye arrived: a lost connection mid-statement
                cause = unknown.__cause__
                lost = (asyncpg.ConnectionDoesNotExistError, psycopg.OperationalError)
                assert isinstance(cause, lost), repr(cause)
                reported[k] = False
            else:
                reported[k] = True
    finally:
        await admin.close()
    for k, stored_said in reported.items():
        stored = [e.sequence_nr for e in await journal.load(f"acct-{k}")]
        assert stored == [1, 2] if stored_said else stored in ([1], [1, 2]), (k, stored)


async def test_close_during_a_reads_retry_backoff_ends_that_read(
    pg: DedicatedPostgres, fault_db: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """A read waiting out its backoff when close() runs fails with JournalClosed and opens
    no connection on the disposed engine."""
    db = fault_db.database or ""
    journal = fault_journal(make_journal, fault_db, read_retries=3, retry_backoff=0.5)
    await journal.persist("acct", [PersistedEvent(1, "a", 1.0)])
    lock = await _locked_table(pg, db)
    try:
        load = asyncio.ensure_future(journal.load("acct"))
        await terminate(pg, await _wait_for_waiters(pg, db))  # the read fails, then sleeps
    finally:
        await lock.execute("COMMIT")
        await lock.close()
    await asyncio.sleep(0.1)
    await journal.close()
    with pytest.raises(JournalClosed):
        await asyncio.wait_for(load, 10)
    assert await journal_backends(pg, db) == []
    assert journal.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "own-transaction"])
async def test_write_killed_mid_statement_fails_clearly_and_stores_nothing(
    pg: DedicatedPostgres,
    fault_db: URL,
    make_journal: Callable[..., SAJournal],
    group_commit: bool,
) -> None:
    db = fault_db.database or ""
    journal = fault_journal(make_journal, fault_db, group_commit=group_commit)
    await journal.start()
    batches = {f"acct{k}": [PersistedEvent(s, (k, s), 1.0) for s in (1, 2, 3)] for k in range(4)}
    lock = await _locked_table(pg, db)
    try:
        writes = [asyncio.ensure_future(journal.persist(e, b)) for e, b in batches.items()]
        waiting = await _wait_for_waiters(pg, db, 1 if group_commit else len(batches))
        await terminate(pg, waiting)
        results = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), 10)
    finally:
        await lock.execute("COMMIT")
        await lock.close()
    for result in results:
        # a write is one autocommit statement: once it is sent, a lost connection leaves
        # its outcome unknown to the client, and the error says so
        assert isinstance(result, DatabaseUnavailable), result
        if isinstance(result, CommitOutcomeUnknown):
            assert "may or may not be stored" in str(result)
        else:
            assert "Nothing of a failed write was stored" in str(result)
    for entity_id in batches:  # killed while waiting for the lock: nothing was applied
        assert await journal.load(entity_id) == []
    # the same calls succeed once the connection problem is gone
    await asyncio.gather(*(journal.persist(e, b) for e, b in batches.items()))
    for entity_id, events in batches.items():
        assert await journal.load(entity_id) == events


async def test_connections_killed_during_a_write_storm(
    pg: DedicatedPostgres, fault_db: URL, make_journal: Callable[..., SAJournal]
) -> None:
    db = fault_db.database or ""
    journal = fault_journal(make_journal, fault_db)
    entities = [f"storm{i}" for i in range(10)]

    async def kill_repeatedly() -> None:
        for _ in range(10):
            await terminate(pg, await journal_backends(pg, db))
            await asyncio.sleep(0.05)

    outcomes = await run_writers_through(journal, kill_repeatedly, entities)
    assert all(isinstance(e, DatabaseUnavailable) for e in outcomes.errors), outcomes.errors[:3]
    await check_outcomes(journal, entities, outcomes)


async def test_statement_timeout_fails_a_blocked_call_and_leaves_a_working_pool(
    pg: DedicatedPostgres, fault_db: URL, make_journal: Callable[..., SAJournal]
) -> None:
    db = fault_db.database or ""
    journal = fault_journal(make_journal, fault_db, statement_timeout=0.5, read_retries=1)
    await journal.persist("acct", [PersistedEvent(1, "a", 1.0)])
    lock = await _locked_table(pg, db)
    try:
        for call in (
            journal.persist("acct", [PersistedEvent(2, "b", 1.0)]),
            journal.load("acct"),
        ):
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable):
                await asyncio.wait_for(call, 10)
            assert time.monotonic() - started < 2.5
    finally:
        await lock.execute("COMMIT")
        await lock.close()
    assert [e.event for e in await journal.load("acct")] == ["a"]
    await asyncio.gather(*(journal.load("acct") for _ in range(10)))
    await journal.persist("acct", [PersistedEvent(2, "b", 1.0)])
    assert len(await journal.load("acct")) == 2


# -- pool exhaustion (both backends) -----------------------------------------------------------


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "own-transaction"])
async def test_more_callers_than_connections_queue_and_complete(
    db_url: URL, make_journal: Callable[..., SAJournal], group_commit: bool
) -> None:
    journal = make_journal(db_url, group_commit=group_commit, pool_size=1, max_overflow=0)
    await journal.persist("taken", [PersistedEvent(1, "x", 1.0)])

    async def caller(i: int) -> Any:
        entity_id = f"c{i % 50}"
        if i % 10 == 0:  # conflicts take the slow path (re-write alone, then look up)
            return await journal.persist("taken", [PersistedEvent(1, i, 1.0)])
        if i % 3 == 0:
            return await journal.load(entity_id)
        if i % 7 == 0:
            return await journal.save_snapshot(entity_id, Snapshot(i, i, 1.0))
        return await journal.persist(entity_id, [PersistedEvent(1000 + i, i, 1.0)])

    results = await asyncio.wait_for(
        asyncio.gather(*(caller(i) for i in range(300)), return_exceptions=True), 60
    )
    for i, result in enumerate(results):
        if i % 10 == 0:
            assert isinstance(result, SequenceConflict), result
        else:
            assert not isinstance(result, BaseException), result
    stored = sum([len(await journal.load(f"c{k}")) for k in range(50)])
    assert stored == sum(1 for i in range(300) if i % 10 and i % 3 and i % 7)


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "own-transaction"])
async def test_pool_timeout_is_a_clear_error_not_a_hang(
    db_url: URL, make_journal: Callable[..., SAJournal], group_commit: bool
) -> None:
    journal = make_journal(
        db_url,
        group_commit=group_commit,
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.3,
        read_retries=0,
    )
    await journal.persist("acct", [PersistedEvent(1, "a", 1.0)])
    holder = await journal.engine.connect()  # someone else holds the only connection
    await holder.exec_driver_sql("SELECT 1")
    try:
        calls: list[Awaitable[Any]] = [
            journal.persist("acct", [PersistedEvent(2, "b", 1.0)]),
            journal.save_snapshot("acct", Snapshot(1, "s", 1.0)),
        ]
        if db_url.get_backend_name() == "sqlite":
            # reads go to the journal's own reader (opened after its first write), not the pool
            assert [e.event for e in await asyncio.wait_for(journal.load("acct"), 10)] == ["a"]
        else:
            calls.append(journal.load("acct"))
        for call in calls:
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable, match=r"timed out|QueuePool limit"):
                await asyncio.wait_for(call, 10)
            assert time.monotonic() - started < 2.0
    finally:
        await holder.close()
    assert [e.event for e in await journal.load("acct")] == ["a"]
    assert await journal.load_snapshot("acct") is None
    await journal.persist("acct", [PersistedEvent(2, "b", 1.0)])


# -- passwords and privileges ------------------------------------------------------------------


def _full_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


async def test_wrong_password_is_a_clear_error_that_never_shows_a_password(
    pg: DedicatedPostgres, fault_db: URL, make_journal: Callable[..., SAJournal]
) -> None:
    wrong = "Wr0ng-pass-word-xyz"
    journal = fault_journal(make_journal, fault_db.set(password=wrong))
    for call in (journal.start(), journal.persist("acct", [PersistedEvent(1, "x", 1.0)])):
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable, match="password authentication failed") as info:
            await asyncio.wait_for(call, 10)
        assert time.monotonic() - started < 3.0
        for shown in (str(info.value), _full_text(info.value), repr(journal)):
            assert wrong not in shown and ADMIN_PASSWORD not in shown
    right = fault_journal(make_journal, fault_db)
    assert ADMIN_PASSWORD not in repr(right)
    await right.persist("acct", [PersistedEvent(1, "x", 1.0)])
    assert await right.load("acct") != []
    with pytest.raises(DatabaseUnavailable, match="password authentication failed"):
        await journal.load("acct")  # the wrong one keeps failing the same clear way


async def test_a_password_in_the_query_string_is_used_and_never_shown(
    pg: DedicatedPostgres,
    fault_db: URL,
    make_journal: Callable[..., SAJournal],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="casty_sa")
    wrong = "Wr0ng-query-pass-xyz"
    bare = fault_db.set(password=None)
    journal = fault_journal(make_journal, bare.update_query_dict({"password": wrong}))
    for call in (journal.start(), journal.load("acct")):
        with pytest.raises(DatabaseUnavailable, match="password authentication failed") as info:
            await asyncio.wait_for(call, 10)
        for shown in (str(info.value), _full_text(info.value), repr(journal)):
            assert wrong not in shown and ADMIN_PASSWORD not in shown
    right = fault_journal(make_journal, bare.update_query_dict({"password": ADMIN_PASSWORD}))
    await right.persist("acct", [PersistedEvent(1, "x", 1.0)])
    assert [e.event for e in await right.load("acct")] == ["x"]
    assert ADMIN_PASSWORD not in repr(right) and "password=***" in repr(right)
    assert wrong not in caplog.text and ADMIN_PASSWORD not in caplog.text


def _refused_login(url: URL, refusal: str) -> tuple[URL, str]:
    """``url`` changed so the server refuses the login, and what its refusal says."""
    return {
        "wrong-password": (url.set(password="Wr0ng-xyz"), "password authentication failed"),
        "unknown-role": (url.set(username="no_such_role_xyz"), "no_such_role_xyz"),
        "missing-database": (url.set(database="no_such_db_xyz"), "no_such_db_xyz"),
    }[refusal]


@pytest.mark.parametrize("refusal", ["wrong-password", "unknown-role", "missing-database"])
async def test_a_refused_login_is_not_transient_and_never_retried(
    pg: DedicatedPostgres,
    fault_db: URL,
    make_journal: Callable[..., SAJournal],
    caplog: pytest.LogCaptureFixture,
    refusal: str,
) -> None:
    url, says = _refused_login(fault_db, refusal)
    caplog.set_level(logging.WARNING, logger="casty_sa")
    journal = fault_journal(make_journal, url, read_retries=5)
    for call in (
        journal.start(),
        journal.load("acct"),
        journal.load_snapshot("acct"),
        journal.persist("acct", [PersistedEvent(1, "x", 1.0)]),
    ):
        with pytest.raises(DatabaseAccessDenied, match=says) as info:
            await asyncio.wait_for(call, 20)
        message = str(info.value)
        assert "call again" not in message and "fail the same way" in message
        assert "Wr0ng-xyz" not in _full_text(info.value) and ADMIN_PASSWORD not in message
    assert "retry" not in caplog.text  # reads did not hammer the server


@pytest.mark.parametrize("refusal", ["wrong-password", "unknown-role", "missing-database"])
async def test_migrations_and_the_cli_say_a_refused_login_is_access_denied(
    pg: DedicatedPostgres, fault_db: URL, capsys: pytest.CaptureFixture[str], refusal: str
) -> None:
    from casty_sa.cli import ExitCode, main

    url, says = _refused_login(fault_db, refusal)
    for call in (casty_sa.upgrade(url), casty_sa.current(url), casty_sa.downgrade(url)):
        with pytest.raises(DatabaseAccessDenied, match=says) as info:
            await asyncio.wait_for(call, 20)
        message = str(info.value)
        assert "call again" not in message and "fail the same way" in message
        assert "Wr0ng-xyz" not in _full_text(info.value) and ADMIN_PASSWORD not in message
    for command in (["upgrade"], ["check"], ["current"]):
        argv = [*command, "--url", dbtools.plain(url), "--connect-timeout", "5"]
        code = await asyncio.wait_for(asyncio.to_thread(main, argv), 30)  # main runs a loop
        out, err = capsys.readouterr()
        assert code == ExitCode.DATABASE_ERROR, (command, err)
        assert says in err and "fail the same way" in err, (command, err)
        assert "Wr0ng-xyz" not in out + err and ADMIN_PASSWORD not in out + err, command


async def test_a_missing_privilege_is_not_transient_and_never_retried(
    pg: DedicatedPostgres,
    roles: tuple[URL, URL, str],
    make_journal: Callable[..., SAJournal],
    caplog: pytest.LogCaptureFixture,
) -> None:
    owner_url, app_url, db = roles
    await casty_sa.upgrade(owner_url)
    app = app_url.username
    await pg.admin(f"GRANT SELECT ON casty_sa_alembic_version, casty_sa_events TO {app}", db=db)
    caplog.set_level(logging.WARNING, logger="casty_sa")
    journal = fault_journal(make_journal, app_url, read_retries=5)
    assert await journal.load("acct") == []
    for call in (
        journal.persist("acct", [PersistedEvent(1, "x", 1.0)]),
        journal.load_snapshot("acct"),
    ):
        with pytest.raises(DatabaseAccessDenied, match="permission denied") as info:
            await asyncio.wait_for(call, 20)
        assert "call again" not in str(info.value) and "grant" in str(info.value)
    assert "retry" not in caplog.text
    await pg.admin(*(g.format(app=app) for g in GRANTS), db=db)  # fixed: the same journal runs
    await journal.persist("acct", [PersistedEvent(1, "x", 1.0)])
    assert await journal.load_snapshot("acct") is None


@pytest.mark.parametrize("mode", ["disable", "prefer", "allow"])
async def test_sslmode_in_the_url_is_honoured(
    pg: DedicatedPostgres, fault_db: URL, make_journal: Callable[..., SAJournal], mode: str
) -> None:
    # the dedicated server speaks no TLS: these modes connect in clear text
    url = fault_db.update_query_dict({"sslmode": mode, "connect_timeout": "3"})
    journal = fault_journal(make_journal, url)
    await journal.persist("acct", [PersistedEvent(1, "x", 1.0)])
    assert [e.event for e in await journal.load("acct")] == ["x"]


async def test_sslmode_require_against_a_server_without_tls_fails_clearly(
    pg: DedicatedPostgres, fault_db: URL, make_journal: Callable[..., SAJournal]
) -> None:
    journal = fault_journal(make_journal, fault_db.update_query_dict({"sslmode": "require"}))
    with pytest.raises(DatabaseUnavailable, match="SSL") as info:
        await asyncio.wait_for(journal.start(), 10)
    assert ADMIN_PASSWORD not in _full_text(info.value)


# -- connection settings a DBA sees ------------------------------------------------------------


async def _shown(journal: SAJournal, *settings: str) -> list[str]:
    """``SHOW setting`` on one of the journal's own pooled connections."""
    async with journal.engine.connect() as conn:
        return [(await conn.execute(text(f"SHOW {name}"))).scalar_one() for name in settings]


async def _sessions_named(url: URL) -> set[str]:
    """The application names of the sessions on ``url``'s database, as pg_stat_activity
    shows them to a DBA (read on a connection of its own)."""
    conn = await asyncpg.connect(
        user=url.username, database=url.database, host=url.query.get("host") or url.host,
        port=url.port, password=url.password,
    )  # fmt: skip
    try:
        rows = await conn.fetch(
            "SELECT application_name FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            url.database,
        )
        return {row["application_name"] for row in rows}
    finally:
        await conn.close()


async def test_journal_connections_are_named_and_bounded_on_the_server(
    new_postgres_db: Callable[..., Awaitable[URL]], make_journal: Callable[..., SAJournal]
) -> None:
    db = await new_postgres_db()
    journal = make_journal(db, statement_timeout=7.0)
    await journal.persist("acct", [PersistedEvent(1, "x", 1.0)])
    assert await _shown(journal, "application_name", "statement_timeout") == ["casty-sa", "7s"]
    assert "casty-sa" in await _sessions_named(db)


async def test_libpq_parameters_of_the_url_reach_the_server(
    new_postgres_db: Callable[..., Awaitable[URL]], make_journal: Callable[..., SAJournal]
) -> None:
    db = await new_postgres_db()
    url = db.update_query_dict(
        {
            "sslmode": "disable",
            "application_name": "billing-node-1",
            "connect_timeout": "5",
            "options": "-c statement_timeout=4s -c lock_timeout=1500",
        }
    )
    journal = make_journal(url)
    await journal.persist("acct", [PersistedEvent(1, "x", 1.0)])
    assert await journal.load("acct") != []
    shown = await _shown(journal, "application_name", "statement_timeout", "lock_timeout")
    assert shown == ["billing-node-1", "4s", "1500ms"]
    assert "billing-node-1" in await _sessions_named(db)
    # an explicit argument wins over the URL
    explicit = make_journal(url, statement_timeout=9.0)
    assert await _shown(explicit, "statement_timeout") == ["9s"]


@pytest.fixture
async def roles(pg: DedicatedPostgres) -> AsyncIterator[tuple[URL, URL, str]]:
    """A DDL-capable owner role, a least-privilege app role, and a database the owner owns.

    Yields (owner URL, app URL) of that database and its name.
    """
    suffix = f"{os.getpid()}_{next(_db_counter)}"
    owner, app, db = f"casty_owner_{suffix}", f"casty_app_{suffix}", f"priv_{suffix}"
    await pg.admin(
        f"CREATE ROLE {owner} LOGIN PASSWORD '{OWNER_PASSWORD}'",
        f"CREATE ROLE {app} LOGIN PASSWORD '{APP_PASSWORD}'",
        f"CREATE DATABASE {db} OWNER {owner}",
    )
    yield pg.url(owner, OWNER_PASSWORD, db), pg.url(app, APP_PASSWORD, db), db
    if not pg.running():
        pg.start()
    await pg.admin(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)", f"DROP ROLE {app}",
                   f"DROP ROLE {owner}")  # fmt: skip


GRANTS = (
    "GRANT SELECT, INSERT ON casty_sa_events TO {app}",
    "GRANT SELECT, INSERT, UPDATE ON casty_sa_snapshots TO {app}",
    "GRANT SELECT ON casty_sa_alembic_version TO {app}",
    "GRANT SELECT ON casty_sa_tombstones TO {app}",
)


async def test_least_privilege_role_runs_the_journal(
    pg: DedicatedPostgres,
    roles: tuple[URL, URL, str],
    make_journal: Callable[..., SAJournal],
) -> None:
    owner_url, app_url, db = roles
    await casty_sa.upgrade(owner_url)  # the DDL-capable role migrates
    app = app_url.username
    await pg.admin(*(g.format(app=app) for g in GRANTS), db=db)
    # the app role really has nothing more than that
    checks = await pg.admin(
        f"SELECT has_table_privilege('{app}', 'casty_sa_events', 'DELETE') AS del, "
        f"has_table_privilege('{app}', 'casty_sa_events', 'TRUNCATE') AS trunc, "
        f"has_table_privilege('{app}', 'casty_sa_alembic_version', 'INSERT') AS ver, "
        f"has_schema_privilege('{app}', 'public', 'CREATE') AS ddl",
        db=db,
    )
    assert dict(checks[0]) == {"del": False, "trunc": False, "ver": False, "ddl": False}

    journal = fault_journal(make_journal, app_url)
    await journal.persist("acct", [PersistedEvent(1, "a", 1.0), PersistedEvent(2, "b", 1.0)])
    await journal.save_snapshot("acct", Snapshot(1, "s1", 1.0))  # insert
    await journal.save_snapshot("acct", Snapshot(2, "s2", 1.0))  # update
    await journal.save_snapshot("acct", Snapshot(1, "stale", 1.0))  # ignored
    with pytest.raises(SequenceConflict):
        await journal.persist("acct", [PersistedEvent(2, "dup", 1.0)])
    await asyncio.gather(
        *(journal.persist(f"g{i}", [PersistedEvent(1, i, 1.0)]) for i in range(20))
    )
    assert [e.event for e in await journal.load("acct")] == ["a", "b"]
    assert await journal.load_snapshot("acct") == Snapshot(2, "s2", 1.0)
    assert len(await journal.load("g7")) == 1


async def test_least_privilege_role_cannot_migrate(
    pg: DedicatedPostgres,
    roles: tuple[URL, URL, str],
    make_journal: Callable[..., SAJournal],
) -> None:
    owner_url, app_url, db = roles
    journal = fault_journal(make_journal, app_url, migrate=True)
    with pytest.raises(JournalError, match="permission denied") as info:
        await journal.start()
    assert APP_PASSWORD not in _full_text(info.value)
    assert await casty_sa.current(owner_url) is None  # nothing was created
    await casty_sa.upgrade(owner_url)  # the owner can
    await pg.admin(*(g.format(app=app_url.username) for g in GRANTS), db=db)
    await journal.persist("acct", [PersistedEvent(1, "a", 1.0)])  # and now the journal runs


async def test_least_privilege_migration_error_points_at_the_ddl_role(
    roles: tuple[URL, URL, str], make_journal: Callable[..., SAJournal]
) -> None:
    _owner_url, app_url, _db = roles
    journal = fault_journal(make_journal, app_url, migrate=True)
    with pytest.raises(SchemaError, match=r"privilege|permission") as info:
        await journal.start()
    assert "reachable" not in str(info.value)


async def test_least_privilege_upgrade_raises_a_casty_sa_error(
    roles: tuple[URL, URL, str],
) -> None:
    owner_url, app_url, _db = roles
    with pytest.raises(SchemaError, match="permission denied"):
        await casty_sa.upgrade(app_url)
    await casty_sa.upgrade(owner_url)
    with pytest.raises(SchemaError, match="owner"):
        await casty_sa.downgrade(app_url)


# -- deadlocks: the transaction rolled back whole goes again; bystanders never fail ----------


async def _connect(pg: DedicatedPostgres, db: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        user="postgres", password=ADMIN_PASSWORD, host="127.0.0.1", port=pg.port, database=db
    )


_INSERT = "INSERT INTO casty_sa_events (entity_id, sequence_nr, timestamp, payload) "


@pytest.mark.parametrize("path", ["statement", "transaction"])
async def test_a_deadlocked_group_is_sent_again_and_no_bystander_fails(
    pg: DedicatedPostgres,
    fault_db: URL,
    make_journal: Callable[..., SAJournal],
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    """Another writer takes ``dl-y`` then ``dl-x`` while the journal's group takes ``dl-x``
    then ``dl-y``: the server aborts the journal's transaction (the other sets a long
    ``deadlock_timeout``, so the journal's check runs first). Its bystanders are stored,
    and the calls that lost the race get ``SequenceConflict``. ``statement``: the group is
    one autocommit INSERT; ``transaction``: it carries a snapshot too, so it is an explicit
    transaction."""
    caplog.set_level(logging.INFO, logger="casty_sa")
    db = fault_db.database or ""
    journal = fault_journal(make_journal, fault_db)
    await journal.start()
    other, watcher = await _connect(pg, db), await _connect(pg, db)
    tasks: list[asyncio.Future[None]] = []
    try:
        await other.execute("SET deadlock_timeout = '30s'")
        await other.execute("BEGIN")
        await other.execute(_INSERT + "VALUES ('dl-y', 1, 1.0, $1)", pickle.dumps("other"))
        calls = [journal.persist(f"b-{k}", [PersistedEvent(1, k, 1.0)]) for k in range(10)]
        if path == "transaction":
            calls.append(journal.save_snapshot("b-snap", Snapshot(1, "s", 1.0)))
        calls += [journal.persist(e, [PersistedEvent(1, "journal", 1.0)]) for e in ("dl-x", "dl-y")]
        tasks = [asyncio.ensure_future(call) for call in calls]
        deadline = time.monotonic() + 10
        while not await watcher.fetch(
            "SELECT 1 FROM pg_stat_activity WHERE datname = $1 AND pid <> $2 "
            "AND wait_event_type = 'Lock'",
            db,
            other.get_server_pid(),
        ):
            assert time.monotonic() < deadline, "the journal's group never waited for dl-y"
            await asyncio.sleep(0.01)
        # closes the cycle; returns once the server has aborted the journal's transaction
        await asyncio.wait_for(
            other.execute(_INSERT + "VALUES ('dl-x', 1, 1.0, $1)", pickle.dumps("other")), 20
        )
        await other.execute("COMMIT")
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    finally:
        for task in tasks:
            task.cancel()
        await other.close()
        await watcher.close()
    *bystanders, on_x, on_y = results
    assert bystanders == [None] * len(bystanders), bystanders
    assert "deadlock detected" in caplog.text, "the journal's transaction was not the victim"
    for lost in (on_x, on_y):
        assert isinstance(lost, SequenceConflict) and lost.sequence_nr == 1, repr(lost)
    for k in range(10):
        assert [e.event for e in await journal.load(f"b-{k}")] == [k]
    for e in ("dl-x", "dl-y"):
        assert [x.event for x in await journal.load(e)] == ["other"]
    if path == "transaction":
        assert await journal.load_snapshot("b-snap") == Snapshot(1, "s", 1.0)


async def test_two_nodes_writing_the_same_entities_in_opposite_order_fail_no_bystander(
    pg: DedicatedPostgres, fault_db: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """Two journals (two nodes after a split brain) each write ``dl-x`` and ``dl-y``, called
    in opposite orders, beside bystanders of their own, while a trigger slows every insert
    of those two entities. Rows go in one order on every node, so the second node waits for
    the first instead of deadlocking: each contested call is stored by one node and gets
    ``SequenceConflict`` on the other, and every bystander is stored."""
    db = fault_db.database or ""
    await pg.admin(
        "CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.entity_id LIKE 'dl-%' THEN PERFORM pg_sleep(0.3); END IF; RETURN NEW; END $$",
        "CREATE TRIGGER slow_insert BEFORE INSERT ON casty_sa_events FOR EACH ROW "
        "EXECUTE FUNCTION slow_insert()",
        db=db,
    )
    a, b = fault_journal(make_journal, fault_db), fault_journal(make_journal, fault_db)
    await asyncio.gather(a.start(), b.start())

    def calls(journal: SAJournal, name: str, contested: list[str]) -> list[Awaitable[None]]:
        made: list[Awaitable[None]] = [
            journal.persist(f"{name}-{k}", [PersistedEvent(1, k, 1.0)]) for k in range(5)
        ]
        return made + [journal.persist(e, [PersistedEvent(1, name, 1.0)]) for e in contested]

    results = await asyncio.wait_for(
        asyncio.gather(
            *calls(a, "a", ["dl-x", "dl-y"]),
            *calls(b, "b", ["dl-y", "dl-x"]),
            return_exceptions=True,
        ),
        30,
    )
    outcome_a, outcome_b = results[:7], results[7:]
    assert outcome_a[:5] == [None] * 5 and outcome_b[:5] == [None] * 5, results
    contested = {"a": dict(zip(["dl-x", "dl-y"], outcome_a[5:], strict=True)),
                 "b": dict(zip(["dl-y", "dl-x"], outcome_b[5:], strict=True))}  # fmt: skip
    for entity_id in ("dl-x", "dl-y"):
        stored = [e.event for e in await a.load(entity_id)]
        assert stored in (["a"], ["b"]), stored
        winner, loser = stored[0], "b" if stored[0] == "a" else "a"
        assert contested[winner][entity_id] is None
        lost = contested[loser][entity_id]
        assert isinstance(lost, SequenceConflict) and lost.sequence_nr == 1, repr(lost)
    for name, journal in (("a", a), ("b", b)):
        for k in range(5):
            assert [e.event for e in await journal.load(f"{name}-{k}")] == [k]


# -- start-up and hung servers: every call bounded by its own budget -------------------------


async def test_concurrent_first_calls_share_one_start_attempt(
    make_journal: Callable[..., SAJournal],
) -> None:
    """16 first calls against a server that accepts connections and never answers share
    the one schema check in flight: all fail after about one connect timeout, not one
    after another. A call made after that attempt failed tries again."""
    peers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer)
        await reader.read()  # never answers; returns when the client gives up

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    timeout = 0.5
    try:
        url = f"postgresql://app:pw@127.0.0.1:{port}/db"
        journal = make_journal(url, connect_timeout=timeout, read_retries=0)
        calls: list[Awaitable[Any]] = [
            journal.start() if k % 3 == 0
            else journal.load(f"e{k}") if k % 3 == 1
            else journal.persist(f"e{k}", [PersistedEvent(1, k, 1.0)])
            for k in range(16)
        ]  # fmt: skip
        started = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 30)
        elapsed = time.monotonic() - started
        assert all(isinstance(r, DatabaseUnavailable) for r in results), results
        assert not any(isinstance(r, CommitOutcomeUnknown) for r in results)
        assert len({id(r) for r in results}) == len(results), "callers share one exception"
        assert elapsed < 2 * timeout + 0.5, f"16 first calls took {elapsed:.1f}s to fail"
        # the failed attempt is not remembered: the next call tries again
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            await asyncio.wait_for(journal.load("again"), 10)
        assert time.monotonic() - started >= 0.8 * timeout, "the next call did not try again"
    finally:
        server.close()
        for writer in peers:
            writer.close()
        await server.wait_closed()


def _postgres_processes(pg: DedicatedPostgres) -> list[int]:
    """The postmaster and its children (the backends and background workers)."""
    postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        if int(stat.rpartition(")")[2].split()[1]) == postmaster:
            children.append(int(entry.name))
    return [postmaster, *children]


@contextlib.contextmanager
def frozen(pg: DedicatedPostgres) -> Iterator[None]:
    """The whole server stopped with SIGSTOP (it keeps its sockets; nothing answers)."""
    processes = _postgres_processes(pg)
    try:
        for pid in processes:
            os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in reversed(processes):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def test_a_frozen_server_fails_each_call_within_its_budget(
    pg: DedicatedPostgres, fault_db: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """A server frozen with SIGSTOP answers nothing, but its connections stay open. Every
    call fails within a small multiple of connect_timeout + statement_timeout (a ping gets
    a short timeout of its own, a ping timeout does not lead to pinging the rest of the
    pool, and read retries stop when the budget is spent), each error tells the truth
    about what was stored, and the journal works again once the server is resumed."""
    connect, statement = 1.0, 2.0
    options = {"connect_timeout": connect, "statement_timeout": statement, "read_retries": 3}
    journal = fault_journal(make_journal, fault_db, **options)
    await journal.persist("acct", [PersistedEvent(1, "before", 1.0)])
    await asyncio.gather(*(journal.load("acct") for _ in range(8)))  # several pooled conns
    await asyncio.sleep(0.1)  # idle long enough to be pinged on checkout
    bound = 2 * (connect + statement) + 1.0
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "persist": lambda: journal.persist("acct", [PersistedEvent(2, "frozen", 1.0)]),
        "load": lambda: journal.load("acct"),
        "save_snapshot": lambda: journal.save_snapshot("acct", Snapshot(2, "frozen", 1.0)),
        "load_snapshot": lambda: journal.load_snapshot("acct"),
        "first call of a new journal": lambda: fault_journal(
            make_journal, fault_db, **options
        ).load("acct"),
    }
    errors: dict[str, DatabaseUnavailable] = {}
    with frozen(pg):
        for name, call in calls.items():
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable) as info:
                await asyncio.wait_for(call(), 60)
            elapsed = time.monotonic() - started
            assert elapsed < bound, f"{name} took {elapsed:.1f}s against a frozen server"
            errors[name] = info.value
    # a write reported as not stored was not stored; an unknown outcome says so
    stored = [e.event for e in await asyncio.wait_for(journal.load("acct"), 30)]
    if isinstance(errors["persist"], CommitOutcomeUnknown):
        assert stored in (["before"], ["before", "frozen"]), stored
    else:
        assert stored == ["before"], stored
    snapshot = await journal.load_snapshot("acct")
    if not isinstance(errors["save_snapshot"], CommitOutcomeUnknown):
        assert snapshot is None, snapshot
    # the same journal works again
    await journal.persist("acct", [PersistedEvent(len(stored) + 1, "after", 1.0)])
    await journal.save_snapshot("acct", Snapshot(3, "after", 1.0))
    assert [e.event for e in await journal.load("acct")] == [*stored, "after"]
    assert await journal.load_snapshot("acct") == Snapshot(3, "after", 1.0)


async def test_a_frozen_server_bounds_calls_on_an_applications_engine_too(
    pg: DedicatedPostgres, fault_db: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """``SAJournal(app_engine, connect_timeout=, statement_timeout=)``: the journal's own
    budget (an application's engine does not tell its timeouts). Its statements carry the
    statement timeout, so the engine needs no ``command_timeout`` of its own."""
    from sqlalchemy.ext.asyncio import create_async_engine

    connect, statement = 1.0, 2.0
    bounded = (
        {"connect_timeout": str(round(connect))}  # libpq waits 2 seconds at least
        if fault_db.get_driver_name() == "psycopg"
        else {"timeout": connect}
    )
    engine = create_async_engine(fault_db, connect_args=bounded, pool_size=10, max_overflow=0)
    try:
        journal = make_journal(
            engine, read_retries=3, connect_timeout=connect, statement_timeout=statement
        )
        await journal.persist("acct", [PersistedEvent(1, "before", 1.0)])
        await asyncio.gather(*(journal.load("acct") for _ in range(8)))
        await asyncio.sleep(0.1)  # idle long enough to be pinged on checkout
        bound = 2 * (connect + statement) + 1.0
        with frozen(pg):
            for call in (
                lambda: journal.load("acct"),
                lambda: journal.persist("acct", [PersistedEvent(2, "frozen", 1.0)]),
            ):
                started = time.monotonic()
                with pytest.raises(DatabaseUnavailable):
                    await asyncio.wait_for(call(), 60)
                elapsed = time.monotonic() - started
                assert elapsed < bound, f"a call took {elapsed:.1f}s against a frozen server"
        await journal.close()
    finally:
        await engine.dispose()


# -- what a failed write stored: between "statement sent" and "commit acknowledged" ------------

_SLOW = """
CREATE FUNCTION casty_sa_test_slow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(1.5); RETURN NEW; END $$
"""


async def _slow_inserts(url: URL, table: str) -> None:
    """Every insert into ``table`` sleeps 1.5 s in a trigger (``DROP TRIGGER slow`` ends it)."""
    await dbtools.execute(
        url,
        _SLOW,
        f"CREATE TRIGGER slow BEFORE INSERT ON {table} FOR EACH ROW "
        "EXECUTE FUNCTION casty_sa_test_slow()",
    )


async def _events_and_snapshot(journal: SAJournal, entity_id: str) -> None:
    """One write group holding events and a snapshot: an explicit transaction. (On PostgreSQL
    every call goes through the flusher, which takes what was queued in the same turn of the
    loop as one group; were they written apart, the event would be stored and the tests
    that use this would fail, not pass by chance.)"""
    await journal.start()
    await asyncio.gather(
        journal.persist(entity_id, [PersistedEvent(1, (entity_id, 1), 1.0)]),
        journal.save_snapshot(entity_id, Snapshot(1, (entity_id, 1), 1.0)),
    )


async def test_a_client_timeout_before_commit_of_a_transaction_stores_nothing(
    new_postgres_db: Callable[..., Awaitable[URL]], make_journal: Callable[..., SAJournal]
) -> None:
    """The snapshot upsert inside the explicit transaction times out on the client: COMMIT
    was never sent, so the truth is "nothing stored", not "outcome unknown"."""
    url = await new_postgres_db()
    await _slow_inserts(url, "casty_sa_snapshots")
    journal = make_journal(url, connect_args={"command_timeout": 0.3})
    with pytest.raises(DatabaseUnavailable) as info:
        await asyncio.wait_for(_events_and_snapshot(journal, "acct"), 10)
    assert not isinstance(info.value, CommitOutcomeUnknown), info.value
    assert "Nothing of a failed write was stored" in str(info.value)
    await dbtools.execute(url, "DROP TRIGGER slow ON casty_sa_snapshots")
    assert await journal.load("acct") == []
    assert await journal.load_snapshot("acct") is None


async def test_a_client_timeout_on_an_autocommit_write_is_commit_outcome_unknown(
    new_postgres_db: Callable[..., Awaitable[URL]], make_journal: Callable[..., SAJournal]
) -> None:
    """One autocommit statement: once sent, the server may commit it after the client gave up."""
    url = await new_postgres_db()
    await _slow_inserts(url, "casty_sa_events")
    journal = make_journal(url, connect_args={"command_timeout": 0.3})
    events = [PersistedEvent(1, "a", 1.0), PersistedEvent(2, "b", 1.0)]
    with pytest.raises(CommitOutcomeUnknown, match="may or may not be stored"):
        await asyncio.wait_for(journal.persist("acct", events), 10)
    await dbtools.execute(url, "DROP TRIGGER slow ON casty_sa_events")
    assert [e.sequence_nr for e in await journal.load("acct")] in ([], [1, 2])


_AT_COMMIT = {
    # a deferred check that fails when the transaction commits
    "check-fails": "BEGIN RAISE EXCEPTION 'deferred check failed'; END",
    # a deferred trigger that is still running when another session cancels the statement
    "cancelled": "BEGIN PERFORM pg_sleep(30); RETURN NEW; END",
}


async def _cancel_the_sleeper(url: URL) -> None:
    """Cancel the statement sleeping in the deferred trigger (``pg_cancel_backend``)."""
    for _ in range(500):
        rows = await dbtools.query(
            url,
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
            "WHERE wait_event = 'PgSleep' AND datname = current_database()",
        )
        if rows:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the write never reached the deferred trigger")


@pytest.mark.parametrize("shape", ["autocommit", "transaction"])
@pytest.mark.parametrize("cause", sorted(_AT_COMMIT))
async def test_an_error_the_server_answers_the_commit_with_stores_nothing(
    new_postgres_db: Callable[..., Awaitable[URL]],
    make_journal: Callable[..., SAJournal],
    shape: str,
    cause: str,
) -> None:
    """A deferred trigger runs while the transaction commits (at COMMIT, or at the end of
    the autocommit statement) and fails or is cancelled: the server answered the commit
    with an error, so it rolled the transaction back and nothing is stored. (PostgreSQL
    disarms statement_timeout before committing, so only a cancel can cut a commit short.)"""
    url = await new_postgres_db()
    await dbtools.execute(
        url,
        "CREATE FUNCTION casty_sa_test_at_commit() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ {_AT_COMMIT[cause]} $$",
        "CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT ON casty_sa_events DEFERRABLE "
        "INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION casty_sa_test_at_commit()",
    )
    journal = make_journal(url)
    if shape == "transaction":
        write = asyncio.ensure_future(_events_and_snapshot(journal, "acct"))
    else:
        write = asyncio.ensure_future(journal.persist("acct", [PersistedEvent(1, "a", 1.0)]))
    if cause == "cancelled":
        await _cancel_the_sleeper(url)
    # a check that fails refuses the events' rows: their caller alone is told so (the
    # snapshot's caller, a neighbour in the group, is written apart and stored); a cancel is
    # the database's trouble, not the rows'
    refused = cause == "check-fails"
    expected = InvalidEventError if refused else DatabaseUnavailable
    with pytest.raises(expected, match=r"deferred check|canceling") as info:
        await asyncio.wait_for(write, 10)
    assert not isinstance(info.value, CommitOutcomeUnknown | SequenceConflict), info.value
    said = "nothing was stored" if refused else "Nothing of a failed write was stored"
    assert said in str(info.value)
    await dbtools.execute(url, "DROP TRIGGER at_commit ON casty_sa_events")
    assert await journal.load("acct") == []
    snapshot = await journal.load_snapshot("acct")
    assert snapshot == (
        Snapshot(1, ("acct", 1), 1.0) if refused and shape == "transaction" else None
    )


def _sqlite_error(code: int, text: str) -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError(text)
    exc.sqlite_errorcode = code
    return exc


@pytest.mark.parametrize(
    ("dialect", "error", "committing", "expected"),
    [
        # SQLite: an I/O error once the commit started may leave the commit in the WAL
        ("sqlite", _sqlite_error(1034, "disk I/O error"), True, "unknown"),
        ("sqlite", _sqlite_error(1034, "disk I/O error"), False, "nothing"),
        ("sqlite", _sqlite_error(13, "database or disk is full"), True, "nothing"),
        ("sqlite", _sqlite_error(5, "database is locked"), True, "nothing"),
        ("sqlite", sqlite3.DataError("string or blob too big"), True, "refused"),
        ("sqlite", ValueError("no active connection"), True, "unknown"),
        # PostgreSQL: an error the server answered with rolled the transaction back
        ("postgresql", asyncpg.QueryCanceledError("statement timeout"), True, "nothing"),
        ("postgresql", asyncpg.UniqueViolationError("duplicate key"), True, "refused"),
        ("postgresql", TimeoutError(), True, "unknown"),
        ("postgresql", TimeoutError(), False, "nothing"),
        ("postgresql", ConnectionResetError(), True, "unknown"),
        ("postgresql", asyncpg.AdminShutdownError("terminating connection"), True, "unknown"),
        ("postgresql", asyncpg.ProtocolError("unexpected message"), True, "unknown"),
        ("postgresql", RuntimeError("a driver bug after sending"), True, "unknown"),
        ("postgresql", asyncpg.InterfaceError("connection is closed"), True, "resend"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_a_write_failure_is_classified_by_what_reached_the_database(
    dialect: str, error: Exception, committing: bool, expected: str
) -> None:
    failure = classify_write_failure(error, committing=committing, dialect=dialect)
    if expected == "unknown":
        assert isinstance(failure, ConnectionLost) and failure.during_commit
    elif expected == "resend":
        assert isinstance(failure, ConnectionLost) and not failure.during_commit
    elif expected == "refused":
        assert isinstance(failure, WriteRefused)
    else:
        assert failure is error


async def test_a_server_frozen_during_a_deletion_fails_it_within_its_budget(
    pg: DedicatedPostgres, fault_db: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """SIGSTOP while ``delete_events`` waits for its lock (another session holds the events
    table against it): the deletion fails within its budget on either driver, never hangs,
    and nothing was deleted."""
    # the server's own bound must not end the wait first; a connect may be slow on a busy machine
    connect, statement = 3.0, 8.0
    journal = fault_journal(
        make_journal, fault_db, connect_timeout=connect, statement_timeout=statement
    )
    await journal.persist("acct", [PersistedEvent(n, f"e{n}", 1.0) for n in (1, 2, 3)])
    await journal.save_snapshot("acct", Snapshot(2, "s", 1.0))
    holder = await _connect(pg, fault_db.database or "")
    holding = holder.transaction()
    await holding.start()
    await holder.execute("LOCK TABLE casty_sa_events IN ROW EXCLUSIVE MODE")
    try:
        deletion = asyncio.ensure_future(journal.delete_events("acct", 2))

        async def waiting() -> bool:
            # (the holder is in a transaction, where pg_stat_activity is read once and kept:
            # a first look before the deletion waited would be all it ever sees)
            await holder.execute("SELECT pg_stat_clear_snapshot()")
            rows = await holder.fetch(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE 'LOCK TABLE%' AND datname = current_database()"
            )
            return bool(rows)

        deadline = time.monotonic() + 10
        while not await waiting():
            if deletion.done():  # (it ended without waiting: say how)
                raise AssertionError(f"the deletion ended before waiting: {deletion.result()!r}")
            assert time.monotonic() < deadline, "the deletion never waited for its lock"
            await asyncio.sleep(0.01)
        # the lock's wait (10 s) is PostgreSQL's; the frozen server answers nothing after
        bound = LOCK_TIMEOUT + statement + 2.0
        with frozen(pg):
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable) as info:
                try:
                    await asyncio.wait_for(deletion, 3 * bound)
                except TimeoutError as exc:
                    raise AssertionError("a deletion hung against a frozen server") from exc
            assert time.monotonic() - started < bound
            said = str(info.value)
            assert "Nothing was deleted" in said or "may or may not be deleted" in said, said
            assert "write" not in said, said
    finally:
        holder.terminate()
    stored = [e.sequence_nr for e in await asyncio.wait_for(journal.load("acct"), 30)]
    assert stored == [1, 2, 3]
