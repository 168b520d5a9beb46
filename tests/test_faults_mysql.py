"""MariaDB faults: a frozen server, a crashed one, a session killed mid-COMMIT, locks held by
another session, deadlocks, refused logins and privileges; no password in any error.

The tests run on a MariaDB of this module's own (:class:`support.mariadb.MariaDBServer`:
a private data directory, a free port), so they may freeze it (SIGSTOP), kill it
(SIGKILL) and start it again without touching the suite's shared server. Its binary log
is on, so a test can hold every COMMIT for a while (MariaDB's group commit waits for
``binlog_commit_wait_count`` others, at most ``binlog_commit_wait_usec``) and kill the
session in the middle of one. The journal logs in as an account with a password, so
every message is checked for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncmy  # type: ignore[import-untyped,unused-ignore]
import pytest
from casty import PersistedEvent, Snapshot
from sqlalchemy import URL

import casty_sa
from casty_sa import (
    CommitOutcomeUnknown,
    DatabaseAccessDenied,
    DatabaseUnavailable,
    SAJournal,
    SequenceConflict,
)

from support import dbtools, pools
from support.mariadb import MariaDBServer
from support.writers import check_outcomes, run_writers_through

PASSWORD = "Maria-Pw_7c1e-casty"
READER_PASSWORD = "Reader-Pw_41d0-casty"
_databases = itertools.count()


# -- a MariaDB of this module's own ------------------------------------------------------------


@pytest.fixture(scope="module")
def private_maria() -> Iterator[MariaDBServer]:
    directory = Path(tempfile.mkdtemp(prefix="casty-sa-mariafault-"))
    server = MariaDBServer.start(directory, f"--log-bin={directory / 'binlog'}", "--server-id=1")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def maria(private_maria: MariaDBServer) -> AsyncIterator[MariaDBServer]:
    """The module's server, running and not frozen at the start and at the end of each test."""
    _running(private_maria)
    yield private_maria
    _running(private_maria)
    await admin(private_maria, "SET GLOBAL binlog_commit_wait_count = 0")


def _running(server: MariaDBServer) -> None:
    server.thaw()
    if server.process.poll() is not None:
        server.restart()


async def admin(server: MariaDBServer, *statements: str, db: str | None = None) -> list[Any]:
    """Run statements as root in autocommit; the rows of the last one."""
    return await dbtools.mysql_execute(server.url.set(database=db), *statements)


@pytest.fixture
async def fault_db(maria: MariaDBServer) -> AsyncIterator[URL]:
    """A fresh database at head, and the URL of an account (with a password) that owns it."""
    name = f"fault_{os.getpid()}_{next(_databases)}"
    await admin(
        maria,
        f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4",
        f"CREATE USER IF NOT EXISTS 'casty'@'%' IDENTIFIED BY '{PASSWORD}'",
        f"GRANT ALL ON `{name}`.* TO 'casty'@'%'",
    )
    url = URL.create("mysql+asyncmy", "casty", PASSWORD, "127.0.0.1", maria.port, name)
    await casty_sa.upgrade(url)
    yield url
    _running(maria)
    await admin(maria, f"DROP DATABASE IF EXISTS `{name}`")


def fault_journal(make_journal: Callable[..., SAJournal], url: URL, **options: Any) -> SAJournal:
    """A journal with short timeouts."""
    defaults: dict[str, Any] = {
        "connect_timeout": 2.0,
        "statement_timeout": 10.0,
        "read_retries": 2,
        "retry_backoff": 0.05,
    }
    return make_journal(url, **{**defaults, **options})


def no_password(*errors: BaseException) -> None:
    for error in errors:
        assert PASSWORD not in str(error) and READER_PASSWORD not in str(error), str(error)


async def sessions_of(server: MariaDBServer, db: str, *, state: str | None = None) -> list[int]:
    """The ids of the account ``casty``'s sessions on ``db`` (optionally: in ``state``)."""
    condition = f" AND state LIKE '{state}%'" if state else ""
    rows = await admin(
        server,
        "SELECT id FROM information_schema.processlist WHERE user = 'casty' "
        f"AND db = '{db}'{condition}",
    )
    return [int(row[0]) for row in rows]


async def until(check: Callable[[], Awaitable[bool]], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"{what} did not happen within {within}s"
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def frozen(server: MariaDBServer) -> Iterator[None]:
    server.freeze()
    try:
        yield
    finally:
        server.thaw()


# -- the server hangs, crashes and comes back --------------------------------------------------


async def test_a_frozen_server_fails_each_call_within_its_budget(
    maria: MariaDBServer, fault_db: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """SIGSTOP: the server answers nothing and its connections stay open. Every call fails
    within a small multiple of connect_timeout + statement_timeout, never hangs, tells the
    truth about what was stored, and the journal works again once the server resumes."""
    connect, statement = 1.0, 2.0
    options = {"connect_timeout": connect, "statement_timeout": statement, "read_retries": 3}
    journal = fault_journal(make_journal, fault_db, **options)
    await journal.persist("acct", [PersistedEvent(1, "before", 1.0)])
    await asyncio.gather(*(journal.load("acct") for _ in range(8)))  # several pooled conns
    bound = 2 * (connect + statement) + 1.0
    newcomer = fault_journal(make_journal, fault_db, **options)
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "persist": lambda: journal.persist("acct", [PersistedEvent(2, "frozen", 1.0)]),
        "load": lambda: journal.load("acct"),
        "save_snapshot": lambda: journal.save_snapshot("acct", Snapshot(2, "frozen", 1.0)),
        "load_snapshot": lambda: journal.load_snapshot("acct"),
        "events": lambda: _first_event(journal),
        "first call of a new journal": lambda: newcomer.load("acct"),
    }
    errors: dict[str, DatabaseUnavailable] = {}
    with frozen(maria):
        for name, call in calls.items():
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable) as info:
                try:
                    await asyncio.wait_for(call(), 2 * bound)
                except TimeoutError as exc:
                    raise AssertionError(f"{name} hung against a frozen server") from exc
            elapsed = time.monotonic() - started
            assert elapsed < bound, f"{name} took {elapsed:.1f}s against a frozen server"
            errors[name] = info.value
        # and closing returns as promptly: no goodbye waits for an answer
        started = time.monotonic()
        await asyncio.wait_for(newcomer.close(), 2 * bound)
        assert time.monotonic() - started < statement, "close() waited for a frozen server"
    no_password(*errors.values())
    stored = [e.event for e in await asyncio.wait_for(journal.load("acct"), 30)]
    if isinstance(errors["persist"], CommitOutcomeUnknown):
        assert stored in (["before"], ["before", "frozen"]), stored
    else:
        assert stored == ["before"], stored
    if not isinstance(errors["save_snapshot"], CommitOutcomeUnknown):
        assert await journal.load_snapshot("acct") is None
    await journal.persist("acct", [PersistedEvent(len(stored) + 1, "after", 1.0)])
    await journal.save_snapshot("acct", Snapshot(3, "after", 1.0))
    assert [e.event for e in await journal.load("acct")] == [*stored, "after"]
    assert await journal.load_snapshot("acct") == Snapshot(3, "after", 1.0)


async def test_health_probes_of_a_frozen_server_hold_one_connection_and_end_in_budget(
    maria: MariaDBServer, fault_db: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """Readiness probes every few seconds of a frozen server: each answers within its own
    limit, not ok; together they hold at most one pooled connection (one each would take
    the whole pool and the journal's places at its gate), the check's read ends within the
    journal's call budget (a pooled connection to a stopped server never ends it on its
    own), so close() returns; thawed, the database is healthy again."""
    connect, statement = 1.0, 2.0
    options = {"connect_timeout": connect, "statement_timeout": statement}
    journal = fault_journal(make_journal, fault_db, **options)
    assert (await journal.health()).ok
    bound = 2 * (connect + statement) + 1.0
    with frozen(maria):
        for _ in range(4):
            health = await asyncio.wait_for(journal.health(within=0.2), bound)
            assert (health.ok, health.reachable) == (False, False)
            assert "no answer within 0.2s" in health.message
            no_password(Exception(repr(health)))
            assert pools.checked_out(journal.engine) <= 1
        started = time.monotonic()
        try:
            await asyncio.wait_for(journal.close(), 2 * bound)
        except TimeoutError as exc:
            raise AssertionError("close() waited for a frozen server's health check") from exc
        assert time.monotonic() - started < bound
    again = fault_journal(make_journal, fault_db, **options)
    assert (await asyncio.wait_for(again.health(), 30)).ok


async def _first_event(journal: SAJournal) -> object:
    async for envelope in journal.events():
        return envelope
    return None


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "own-transaction"])
async def test_a_server_killed_mid_run_loses_nothing_acknowledged(
    maria: MariaDBServer,
    fault_db: URL,
    make_journal: Callable[..., SAJournal],
    group_commit: bool,
) -> None:
    """SIGKILL of the server under a stream of persists, then a restart on the same data:
    every call that returned is stored (its content compared, read by a new journal), every
    call said not stored is absent, an unknown one is whole or absent, none is half there."""
    journal = fault_journal(make_journal, fault_db, group_commit=group_commit)
    entities = [f"w{i}" for i in range(10)]

    async def crash() -> None:
        await asyncio.to_thread(maria.kill)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(maria.restart)

    outcomes = await run_writers_through(journal, crash, entities)
    assert outcomes.errors, "the crash did not interrupt any write"
    assert all(isinstance(e, DatabaseUnavailable) for e in outcomes.errors), outcomes.errors[:3]
    no_password(*outcomes.errors)
    await check_outcomes(fault_journal(make_journal, fault_db), entities, outcomes)


# -- a session killed, locks held, deadlocks ---------------------------------------------------


async def test_a_session_killed_mid_commit_is_commit_outcome_unknown(
    maria: MariaDBServer, fault_db: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """Every COMMIT waits in the binary log's group commit (4 s); the journal's session is
    killed (``KILL CONNECTION``) meanwhile: the journal cannot know whether the commit
    landed and says so. What it says afterwards is true: the events are whole or absent,
    and the retry of the same write is stored or refused as a conflict accordingly."""
    db = fault_db.database or ""
    journal = fault_journal(make_journal, fault_db)
    await journal.persist("bystander", [PersistedEvent(1, "first", 1.0)])
    await admin(
        maria, "SET GLOBAL binlog_commit_wait_count = 1000, binlog_commit_wait_usec = 4000000"
    )
    events = [PersistedEvent(1, "a", 1.0), PersistedEvent(2, "b", 1.0)]
    write = asyncio.ensure_future(journal.persist("acct", events))
    try:

        async def committing() -> bool:
            return bool(await sessions_of(maria, db, state="Commit"))

        await until(committing, "a COMMIT of the journal")
        for session in await sessions_of(maria, db, state="Commit"):
            await admin(maria, f"KILL CONNECTION {session}")
        with pytest.raises(CommitOutcomeUnknown) as info:
            await asyncio.wait_for(write, 30)
    finally:
        write.cancel()
    no_password(info.value)
    await admin(maria, "SET GLOBAL binlog_commit_wait_count = 0")
    stored = [e.event for e in await journal.load("acct")]
    assert stored in ([], ["a", "b"]), stored
    # sent again, as casty's entity would after reloading: stored once. The killed commit
    # may still land after the load above (its session's commit goes on without it), so
    # the retry either stores the events or says another write has them
    try:
        await journal.persist("acct", events)
        retried = "stored"
    except SequenceConflict:
        retried = "conflict"
    assert stored == [] or retried == "conflict", (stored, retried)
    assert [e.event for e in await journal.load("acct")] == ["a", "b"]
    await journal.persist("acct", [PersistedEvent(3, "c", 1.0)])
    assert [e.event for e in await journal.load("acct")] == ["a", "b", "c"]
    assert [e.event for e in await journal.load("bystander")] == ["first"]
    # the read side sees every event once, in the order of their positions
    seen = [(e.entity_id, e.sequence_nr) async for e in journal.events()]
    assert sorted(seen) == [("acct", 1), ("acct", 2), ("acct", 3), ("bystander", 1)]


@pytest.mark.parametrize(
    "hold",
    [
        "LOCK TABLES casty_sa_events WRITE",
        "START TRANSACTION; UPDATE casty_sa_event_counter SET position = position",
    ],
    ids=["table-lock", "counter-row-lock"],
)
async def test_a_lock_another_session_holds_fails_a_write_within_its_bound(
    maria: MariaDBServer, fault_db: URL, make_journal: Callable[..., SAJournal], hold: str
) -> None:
    """Another session holds the events table (``LOCK TABLES``) or the position counter's
    row: the journal's write waits at most its statement timeout, then fails with an error
    that says what was stored; once the lock is gone the journal writes again."""
    statement = 2.0
    journal = fault_journal(make_journal, fault_db, statement_timeout=statement)
    await journal.persist("acct", [PersistedEvent(1, "before", 1.0)])
    holder = await asyncmy.connect(
        host="127.0.0.1",
        port=maria.port,
        user="root",
        db=fault_db.database,
        autocommit=True,
    )
    try:
        async with holder.cursor() as cursor:
            for part in hold.split("; "):
                await cursor.execute(part)
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable) as info:
            await asyncio.wait_for(journal.persist("acct", [PersistedEvent(2, "blocked", 1.0)]), 60)
        elapsed = time.monotonic() - started
    finally:
        holder.close()
    assert elapsed < 3 * statement + 2.0, f"the write waited {elapsed:.1f}s"
    no_password(info.value)
    stored = [e.event for e in await journal.load("acct")]
    if isinstance(info.value, CommitOutcomeUnknown):
        assert stored in (["before"], ["before", "blocked"]), stored
    else:
        assert stored == ["before"], (stored, str(info.value))
    await journal.persist("acct", [PersistedEvent(len(stored) + 1, "after", 1.0)])
    assert [e.event for e in await journal.load("acct")][-1] == "after"


async def test_a_deadlock_with_another_session_is_retried_and_nothing_is_lost(
    maria: MariaDBServer,
    fault_db: URL,
    make_journal: Callable[..., SAJournal],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another session (heavier: it has changed 200 rows, so InnoDB picks the journal's
    transaction as the victim) locks the gap where ``dl`` goes, the journal's group takes
    the position counter and waits for that gap, then the other session asks for the
    counter: a deadlock. The journal's transaction is rolled back whole (1213), sent again
    once the other session is done, and every call of the group returns stored."""
    caplog.set_level(logging.INFO, logger="casty_sa")
    db = fault_db.database or ""
    journal = fault_journal(make_journal, fault_db)
    for edge in ("a-edge", "z-edge"):  # the gap around "dl" is between these two
        await journal.persist(edge, [PersistedEvent(1, edge, 1.0)])
    before = await _deadlocks(maria)
    other = await asyncmy.connect(
        host="127.0.0.1", port=maria.port, user="root", db=db, autocommit=False
    )
    tasks: list[asyncio.Future[None]] = []
    try:
        async with other.cursor() as cursor:
            await cursor.execute("CREATE TABLE ballast (n INT PRIMARY KEY)")
            await cursor.execute("START TRANSACTION")
            await cursor.execute(
                "INSERT INTO ballast SELECT seq FROM seq_1_to_200"  # MariaDB's sequence engine
            )
            await cursor.execute("SELECT * FROM casty_sa_events WHERE entity_id = 'dl' FOR UPDATE")
            calls = [journal.persist(f"b-{k}", [PersistedEvent(1, k, 1.0)]) for k in range(5)]
            calls.append(journal.persist("dl", [PersistedEvent(1, "journal", 1.0)]))
            tasks = [asyncio.ensure_future(call) for call in calls]

            async def waiting() -> bool:
                # the journal's INSERT stuck at the gap: InnoDB does not always report such a
                # wait as LOCK WAIT (a first attempt showed RUNNING for seconds), so a
                # statement still running after 300 ms counts too
                rows = await admin(
                    maria,
                    "SELECT count(*) FROM information_schema.processlist p "
                    "LEFT JOIN information_schema.innodb_trx t ON t.trx_mysql_thread_id = p.id "
                    "WHERE p.user = 'casty' AND p.info LIKE 'INSERT INTO casty_sa_events%' "
                    "AND (t.trx_state = 'LOCK WAIT' OR p.time_ms > 300)",
                )
                return bool(rows[0][0])

            await until(waiting, "the journal's wait for the gap lock")
            # closes the cycle: the server rolls the journal's transaction back
            await asyncio.wait_for(
                cursor.execute("UPDATE casty_sa_event_counter SET position = position"), 20
            )
            await other.commit()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    finally:
        for task in tasks:
            task.cancel()
        other.close()
    assert results == [None] * len(results), results
    assert await _deadlocks(maria) > before, "no deadlock happened"
    for k in range(5):
        assert [e.event for e in await journal.load(f"b-{k}")] == [k]
    assert [e.event for e in await journal.load("dl")] == ["journal"]
    seen = [e.entity_id async for e in journal.events()]
    assert sorted(seen) == sorted(["a-edge", "z-edge", "dl", *(f"b-{k}" for k in range(5))])


async def _deadlocks(server: MariaDBServer) -> int:
    [(_, value)] = await admin(server, "SHOW GLOBAL STATUS LIKE 'Innodb_deadlocks'")
    return int(value)


# -- logins and privileges ---------------------------------------------------------------------


async def test_a_wrong_password_is_access_denied_and_never_shown(
    maria: MariaDBServer, fault_db: URL, make_journal: Callable[..., SAJournal]
) -> None:
    journal = fault_journal(make_journal, fault_db.set(password=READER_PASSWORD))
    started = time.monotonic()
    for call in (
        lambda: journal.load("acct"),
        lambda: journal.persist("acct", [PersistedEvent(1, "x", 1.0)]),
    ):
        with pytest.raises(DatabaseAccessDenied) as info:
            await asyncio.wait_for(call(), 30)
        no_password(info.value)
        assert "check the user name and password" in str(info.value)
        assert "casty:***@127.0.0.1" in str(info.value)
    assert time.monotonic() - started < 5.0  # not retried: calling again fails the same way


async def test_a_missing_privilege_is_access_denied_and_nothing_is_stored(
    maria: MariaDBServer, fault_db: URL, make_journal: Callable[..., SAJournal]
) -> None:
    db = fault_db.database or ""
    await admin(
        maria,
        f"CREATE USER IF NOT EXISTS 'reader'@'%' IDENTIFIED BY '{READER_PASSWORD}'",
        f"GRANT SELECT ON `{db}`.* TO 'reader'@'%'",
    )
    reader = fault_journal(make_journal, fault_db.set(username="reader", password=READER_PASSWORD))
    assert await reader.load("acct") == []
    with pytest.raises(DatabaseAccessDenied) as info:
        await asyncio.wait_for(reader.persist("acct", [PersistedEvent(1, "x", 1.0)]), 30)
    no_password(info.value)
    assert "grant the account the privileges" in str(info.value), str(info.value)
    assert "Nothing was stored" in str(info.value)
    assert await reader.load("acct") == []


async def test_a_server_frozen_during_a_deletion_fails_it_within_its_budget(
    maria: MariaDBServer, fault_db: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """SIGSTOP while ``delete_events`` waits for the counter's lock (another session holds
    it): the deletion fails within a small multiple of its budget, never hangs, and says
    truly what was deleted; so does a ``forget`` sent to the frozen server."""
    connect, statement = 1.0, 2.0
    journal = fault_journal(
        make_journal, fault_db, connect_timeout=connect, statement_timeout=statement
    )
    await journal.persist("acct", [PersistedEvent(n, f"e{n}", 1.0) for n in (1, 2, 3)])
    await journal.save_snapshot("acct", Snapshot(2, "s", 1.0))
    holder = await asyncmy.connect(
        host="127.0.0.1", port=maria.port, user="root", db=fault_db.database
    )
    bound = 2 * (connect + statement) + 1.0
    errors: list[BaseException] = []
    try:
        async with holder.cursor() as cursor:
            await cursor.execute("BEGIN")
            await cursor.execute("SELECT position FROM casty_sa_event_counter FOR UPDATE")
        deletion = asyncio.ensure_future(journal.delete_events("acct", 2))
        await until(lambda: _waits_for_a_lock(maria, fault_db.database), "the deletion waiting")
        with frozen(maria):
            started = time.monotonic()
            for call in (lambda: deletion, lambda: journal.forget("acct")):
                with pytest.raises(DatabaseUnavailable) as info:
                    try:
                        await asyncio.wait_for(call(), 4 * bound)
                    except TimeoutError as exc:
                        raise AssertionError("a deletion hung against a frozen server") from exc
                assert time.monotonic() - started < bound
                errors.append(info.value)
                started = time.monotonic()
    finally:
        holder.close()
    no_password(*errors)
    stored = [e.sequence_nr for e in await asyncio.wait_for(journal.load("acct"), 30)]
    assert stored == [1, 2, 3]  # neither call got the lock: nothing was deleted


async def _waits_for_a_lock(server: MariaDBServer, db: str | None) -> bool:
    rows = await admin(
        server,
        "SELECT COUNT(*) FROM information_schema.processlist WHERE user = 'casty' "
        f"AND db = '{db}' AND info LIKE '%FOR UPDATE%'",
    )
    return int(rows[0][0]) > 0
