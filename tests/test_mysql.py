"""What MySQL and MariaDB get wrong for a journal, and what casty-sa does about it.

On the suite's MariaDB, whose server collation (``utf8mb4_general_ci``) compares
case-insensitively and pads trailing spaces: the key columns still compare exactly;
payloads past ``BLOB``'s 64 KB round-trip; a session without strict mode is refused;
writers in several journals and processes lose and duplicate nothing, contended
transactions are retried; a snapshot never moves back; a migration that stopped
half-way (MySQL commits each DDL statement) finishes when run again; and the rule
that reads a failed write's error.
"""

from __future__ import annotations

import asyncio
import io
import logging
import pickle
import random
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from casty import PersistedEvent, Snapshot
from sqlalchemy import URL, inspect
from sqlalchemy.ext.asyncio import create_async_engine

import casty_sa
from casty_sa import SAJournal, UnsupportedDatabase
from casty_sa.backends.failures import (
    ConnectionLost,
    Contended,
    WriteRefused,
    classify_write_failure,
)
from casty_sa.ordering import parse_offset, take_positions
from casty_sa.table_owners import FIRST_TABLES
from casty_sa.urls import to_async_url

from support import dbtools, internals, pools
from support.dbtools import mysql_connect, query
from support.processes import EVENT_WRITER

#: Seconds any one wait of these tests may take.
BOUND = 60.0

NewDb = Callable[..., Awaitable[URL]]


def ev(n: int, event: Any, ts: float = 1.0) -> PersistedEvent[Any]:
    return PersistedEvent(sequence_nr=n, event=event, timestamp=ts)


async def test_ids_differing_in_case_or_trailing_spaces_are_three_entities(
    new_mysql_db: NewDb, make_journal: Callable[..., SAJournal]
) -> None:
    journal = make_journal(await new_mysql_db())
    ids = ["alice", "Alice", "alice "]
    for n, entity_id in enumerate(ids):
        await journal.persist(entity_id, [ev(1, f"{entity_id}!")])
        await journal.save_snapshot(entity_id, Snapshot(1, f"state of {entity_id!r}", float(n)))
    for entity_id in ids:
        assert [e.event for e in await journal.load(entity_id)] == [f"{entity_id}!"]
        snapshot = await journal.load_snapshot(entity_id)
        assert snapshot is not None and snapshot.state == f"state of {entity_id!r}"
    # batched reads (one statement for many entities) tell them apart too
    loads = await asyncio.gather(*(journal.load(entity_id) for entity_id in ids))
    assert [[e.event for e in events] for events in loads] == [[f"{i}!"] for i in ids]
    snapshots = await asyncio.gather(*(journal.load_snapshot(entity_id) for entity_id in ids))
    assert [s.state for s in snapshots if s] == [f"state of {i!r}" for i in ids]
    # the read side's prefix filter compares exactly: "alice" is no prefix of "Alice"
    by_prefix = [e.entity_id async for e in journal.events(entity_prefix="alice")]
    assert sorted(by_prefix) == ["alice", "alice "]
    assert [e.entity_id async for e in journal.events(entity_prefix="alice ")] == ["alice "]
    assert sorted([i async for i in journal.entity_ids()]) == sorted(ids)
    assert sorted([i async for i in journal.entity_ids(prefix="A")]) == ["Alice"]
    assert await journal.highest_sequence_nr("ALICE") == 0


async def test_a_payload_past_64_kb_round_trips_bit_for_bit(
    new_mysql_db: NewDb, make_journal: Callable[..., SAJournal]
) -> None:
    journal = make_journal(await new_mysql_db())
    blob = random.Random(14).randbytes(5 * 2**20)  # every byte value, quotes included
    await journal.persist("big", [ev(1, blob), ev(2, b"small")])
    await journal.save_snapshot("big", Snapshot(2, blob, 2.0))
    assert [e.event for e in await journal.load("big")] == [blob, b"small"]
    snapshot = await journal.load_snapshot("big")
    assert snapshot is not None and snapshot.state == blob


async def test_a_value_the_driver_cannot_escape_is_refused_before_anything_is_sent(
    new_mysql_db: NewDb, make_journal: Callable[..., SAJournal]
) -> None:
    # (a lone surrogate has no UTF-8 form, whichever driver escapes it; the journal never
    # hands one over, so the backend is called directly: what matters is the verdict on
    # what reached the server)
    journal = make_journal(await new_mysql_db())
    await journal.persist("kept", [ev(1, "x")])
    backend = internals.backend(journal)
    unencodable = ("bad", 1, 1.0, b"payload", "type\ud800")
    with pytest.raises(WriteRefused) as info:
        await backend.write([("fine", 1, 1.0, b"payload", "str"), unencodable], [])
    assert not info.value.duplicate and isinstance(info.value.cause, UnicodeEncodeError)
    # nothing went out: no row, the counter untouched, and the connection writes on
    await journal.persist("after", [ev(1, "y")])
    everything = [(e.entity_id, e.offset) async for e in journal.events()]
    assert [entity_id for entity_id, _ in everything] == ["kept", "after"]
    assert [parse_offset(offset)[2] for _, offset in everything] == [1, 2]


async def test_reads_and_writes_go_back_to_the_pool_without_a_rollback(
    new_mysql_db: NewDb, make_journal: Callable[..., SAJournal]
) -> None:
    url = await new_mysql_db()
    journal, other = make_journal(url), make_journal(url)
    await journal.persist("a", [ev(1, "x")])
    await other.start()

    async def rollbacks() -> int:  # the whole server's (its tests run one at a time)
        conn = await mysql_connect(url)
        try:
            async with conn.cursor() as cursor:
                await cursor.execute("SHOW GLOBAL STATUS LIKE 'Com_rollback'")
                [(_, count)] = await cursor.fetchall()
        finally:
            conn.close()
        return int(count)

    before = await rollbacks()
    for n in range(2, 12):
        # each read and write ended with COMMIT: no transaction left open, no reset
        assert len(await journal.load("a")) == n - 1
        await other.persist("a", [ev(n, "y")])  # another pool's writes are seen at once
        assert await journal.highest_sequence_nr("a") == n
    assert [e.sequence_nr async for e in journal.events()] == list(range(1, 12))
    assert await rollbacks() == before


async def test_a_password_outside_ascii_logs_in_and_is_never_shown(
    new_mysql_db: NewDb, mysql_server_url: URL, make_journal: Callable[..., SAJournal]
) -> None:
    # the server hashes the password as the utf8mb4 session gave it (UTF-8); both drivers
    # encode a str password as latin-1: "é" is denied, "€" fails in the driver with a
    # UnicodeEncodeError that names the character
    url = await new_mysql_db()
    user = f"pw_{url.database}"
    password = "p@:/?#%&=+ é€"
    await dbtools.mysql_script(
        mysql_server_url,
        [
            f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'",
            f"GRANT ALL ON `{url.database}`.* TO '{user}'@'%'",
        ],
    )
    try:
        journal = make_journal(url.set(username=user, password=password))
        await journal.persist("a", [ev(1, "x")])
        assert [e.event for e in await journal.load("a")] == ["x"]
        wrong = make_journal(url.set(username=user, password=password + "€"))
        with pytest.raises(casty_sa.DatabaseAccessDenied) as info:
            await asyncio.wait_for(wrong.load("a"), BOUND)
        for shown in (str(info.value), repr(info.value)):
            assert "é" not in shown and "€" not in shown and "\\u20ac" not in shown, shown
    finally:
        await dbtools.mysql_script(mysql_server_url, [f"DROP USER '{user}'@'%'"])


async def test_an_application_engine_in_autocommit_still_writes_a_group_whole(
    new_mysql_db: NewDb, make_journal: Callable[..., SAJournal]
) -> None:
    # in autocommit each statement of the group's packets would commit on its own: the
    # counter's lock let go at once (no-gap lost) and a group over two packets torn
    url = await new_mysql_db()
    app = create_async_engine(url, isolation_level="AUTOCOMMIT")
    pools.watch(app)
    try:
        own, journal = make_journal(url), make_journal(app)
        [(limit,)] = await query(url, "SELECT @@max_allowed_packet")
        blob = b"A" * (int(limit) * 3 // 5)  # two of these go in two packets
        await own.persist("n", [ev(1, b"first")])
        await own.persist("n", [ev(3, b"third")])  # (a gap the journal allows)
        with pytest.raises(casty_sa.SequenceConflict):
            # n#2 in the first packet, n#3 (already stored) in the second: nothing stored
            await journal.persist("n", [ev(2, blob), ev(3, blob)])
        assert [e.sequence_nr for e in await own.load("n")] == [1, 3]
        await journal.persist("n", [ev(2, b"second")])
        assert [e.sequence_nr async for e in own.events()] == [1, 3, 2]
    finally:
        await app.dispose()


async def test_a_session_without_strict_mode_is_refused(
    new_mysql_db: NewDb, make_journal: Callable[..., SAJournal]
) -> None:
    url = await new_mysql_db()
    # an application's engine whose sessions would cut a value that does not fit
    lax = create_async_engine(url, connect_args={"init_command": "SET SESSION sql_mode = ''"})
    pools.watch(lax)
    try:
        journal = make_journal(lax)
        with pytest.raises(UnsupportedDatabase, match="not in strict mode"):
            await journal.persist("a", [ev(1, "x")])
        await journal.close()
    finally:
        await lax.dispose()
    # casty-sa's own engine sets it on every session, whatever the server's default
    own = make_journal(url)
    await own.persist("a", [ev(1, "x")])
    async with own.engine.connect() as conn:
        mode = (await conn.exec_driver_sql("SELECT @@SESSION.sql_mode")).scalar_one()
    assert "STRICT_ALL_TABLES" in mode.split(",")


async def test_writers_in_journals_and_processes_lose_and_duplicate_nothing(
    new_mysql_db: NewDb, make_journal: Callable[..., SAJournal]
) -> None:
    """Three journals (three pools) and two processes write at once, the journals claiming
    the same sequence numbers: each number is stored once, every event exactly once in
    the global order, and the conflicts are reported as such."""
    url = await new_mysql_db()
    journals = [make_journal(url) for _ in range(3)]
    writers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(EVENT_WRITER),
            dbtools.plain(url),
            prefix,
            "20",
            "10",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for prefix in ("p", "q")
    ]

    async def claim(journal: SAJournal, entity: int, seq: int) -> bool:
        try:
            await journal.persist(f"shared-{entity}", [ev(seq, f"{id(journal)}:{seq}")])
        except casty_sa.SequenceConflict:
            return False
        return True

    outcomes = await asyncio.wait_for(
        asyncio.gather(
            *(
                claim(journal, entity, seq)
                for seq in range(1, 11)
                for entity in range(10)
                for journal in journals
            )
        ),
        BOUND,
    )
    outputs = [await asyncio.wait_for(w.communicate(), BOUND) for w in writers]
    assert [w.returncode for w in writers] == [0, 0], outputs
    stored = await query(
        url, "SELECT entity_id, sequence_nr FROM casty_sa_events WHERE entity_id LIKE 'shared-%'"
    )
    assert sum(outcomes) == len(stored) == len(set(stored))
    assert {(e, s) for e, s in stored} <= {(f"shared-{e}", s) for e in range(10) for s in range(11)}
    everything = [(e.entity_id, e.sequence_nr) async for e in journals[0].events()]
    assert len(everything) == len(set(everything)) == len(stored) + 2 * 20 * 10
    [(count,)] = await query(url, "SELECT count(*) FROM casty_sa_events")
    [(top,)] = await query(url, "SELECT `position` FROM casty_sa_event_counter")
    assert count == len(everything) and top == count  # positions 1 … n, no gap, no reuse


async def test_a_snapshot_never_moves_back_under_concurrent_upserts(
    new_mysql_db: NewDb, make_journal: Callable[..., SAJournal]
) -> None:
    url = await new_mysql_db()
    journals = [make_journal(url) for _ in range(3)]
    numbers = list(range(1, 61))
    random.Random(7).shuffle(numbers)
    await asyncio.wait_for(
        asyncio.gather(
            *(
                journals[n % 3].save_snapshot(f"s{k}", Snapshot(n, f"at {n}", float(n)))
                for n in numbers
                for k in range(4)
            )
        ),
        BOUND,
    )
    for k in range(4):
        assert await journals[0].load_snapshot(f"s{k}") == Snapshot(60, "at 60", 60.0)


async def test_a_writer_holding_the_counter_makes_others_wait_then_retry(
    new_mysql_db: NewDb, make_journal: Callable[..., SAJournal]
) -> None:
    """A lock wait that times out (1205) rolls the write back: it is sent again, and goes
    through once the counter is free; nothing is stored twice."""
    url = await new_mysql_db()
    journal = make_journal(url, statement_timeout=3.0)  # the lock wait: 1 s
    await journal.persist("a", [ev(1, "first")])
    holder = await mysql_connect(url)
    try:
        async with holder.cursor() as cursor:
            await cursor.execute(f"BEGIN; {take_positions(dbtools.MYSQL_QUOTES)}", (1,))
            while await cursor.nextset():
                pass
        retried = asyncio.Event()
        seen = _Seen("rolled back a write", retried)
        logger = logging.getLogger("casty_sa")
        level = logger.level
        logger.addHandler(seen)
        logger.setLevel(logging.INFO)
        try:
            write = asyncio.ensure_future(journal.persist("a", [ev(2, "second")]))
            await asyncio.wait_for(retried.wait(), BOUND)
        finally:
            logger.removeHandler(seen)
            logger.setLevel(level)
        assert not write.done()
    finally:
        async with holder.cursor() as cursor:
            await cursor.execute("ROLLBACK")
        holder.close()
    await asyncio.wait_for(write, BOUND)
    assert [e.event for e in await journal.load("a")] == ["first", "second"]
    assert [e.sequence_nr async for e in journal.events()] == [1, 2]


class _Seen(logging.Handler):
    """Sets ``event`` once a record containing ``text`` is logged."""

    def __init__(self, text: str, event: asyncio.Event) -> None:
        super().__init__(logging.INFO)
        self.text, self.event = text, event

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


async def test_a_migration_that_stopped_half_way_finishes_when_run_again(
    new_mysql_db: NewDb,
) -> None:
    """MySQL commits each DDL statement: a 0002 that died after its first ``ALTER`` leaves
    that column behind, with the version table still at 0001. Run again, it goes on."""
    url = await new_mysql_db(migrated=False)
    await casty_sa.upgrade(url, "0001")
    await dbtools.execute(
        url,
        f"INSERT INTO casty_sa_events VALUES ('old', 1, 1.0, X'{pickle.dumps('o').hex()}')",
        "ALTER TABLE casty_sa_events ADD COLUMN event_type VARCHAR(255) "
        "CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin",
    )
    assert await casty_sa.current(url) == "0001"
    await casty_sa.upgrade(url)
    assert await casty_sa.current(url) == casty_sa.head_revision()
    rows = await query(url, "SELECT entity_id, `position` FROM casty_sa_events")
    assert rows == [("old", -1)]  # numbered below every new position
    assert await query(url, "SELECT `position` FROM casty_sa_event_counter") == [(0,)]
    async with SAJournal(url, migrate=False) as journal:
        await journal.persist("new", [ev(1, "n")])
        assert [e.entity_id async for e in journal.events()] == ["old", "new"]


async def _first_run_left(new_mysql_db: NewDb, *statements: str) -> URL:
    """A database as a first migration killed half-way leaves it: revision 0001's tables
    and no revision (the version row comes after the tables), then ``statements``."""
    url = await new_mysql_db(migrated=False)
    await casty_sa.upgrade(url, "0001")
    await dbtools.execute(url, "DELETE FROM casty_sa_alembic_version", *statements)
    assert await casty_sa.current(url) is None
    return url


async def test_revision_0001_makes_the_tables_a_stopped_first_run_is_recognised_by(
    new_mysql_db: NewDb,
) -> None:
    url = await new_mysql_db(migrated=False)
    await casty_sa.upgrade(url, "0001")
    engine = create_async_engine(to_async_url(url))
    try:
        async with engine.connect() as conn:

            def shapes(sync: Any) -> list[tuple[str, frozenset[str], tuple[str, ...]]]:
                inspector = inspect(sync)
                return [
                    (
                        name,
                        frozenset(c["name"] for c in inspector.get_columns(name)),
                        tuple(inspector.get_pk_constraint(name)["constrained_columns"]),
                    )
                    for name, _columns, _key in FIRST_TABLES
                ]

            assert await conn.run_sync(shapes) == list(FIRST_TABLES)
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    "left",
    [
        pytest.param((), id="both-tables"),
        pytest.param(("DROP TABLE casty_sa_snapshots",), id="events-only"),
        pytest.param(
            ("DROP TABLE casty_sa_snapshots", "DROP TABLE casty_sa_alembic_version"),
            id="no-version-table",
        ),
    ],
)
async def test_a_first_migration_stopped_half_way_is_finished_on_start_or_upgrade(
    new_mysql_db: NewDb, left: tuple[str, ...], make_journal: Callable[..., SAJournal]
) -> None:
    """What a killed first run leaves (a prefix of 0001's tables, empty, no revision): the
    journal without ``migrate`` says so and how to finish it; ``upgrade`` (or a journal's
    migration on start) finishes it."""
    url = await _first_run_left(new_mysql_db, *left)
    with pytest.raises(casty_sa.SchemaError, match="stopped half-way") as info:
        await make_journal(url, migrate=False).start()
    assert "casty-sa upgrade" in str(info.value)
    if left:
        await casty_sa.upgrade(url)
    journal = make_journal(url, migrate=True)
    await journal.persist("a", [ev(1, "x")])
    assert await casty_sa.current(url) == casty_sa.head_revision()
    assert [e.event for e in await journal.load("a")] == ["x"]


@pytest.mark.parametrize(
    "statements",
    [
        pytest.param(
            (f"INSERT INTO casty_sa_events VALUES ('a', 1, 1.0, X'{pickle.dumps(1).hex()}')",),
            id="an-event",
        ),
        pytest.param(
            (f"INSERT INTO casty_sa_snapshots VALUES ('a', 1, 1.0, X'{pickle.dumps(1).hex()}')",),
            id="a-snapshot",
        ),
        pytest.param(("DROP TABLE casty_sa_events",), id="snapshots-without-events"),
        pytest.param(("ALTER TABLE casty_sa_events ADD COLUMN note INT",), id="another-shape"),
        pytest.param(
            ("CREATE TABLE casty_sa_event_counter (id SMALLINT PRIMARY KEY)",),
            id="a-later-table",
        ),
    ],
)
async def test_tables_no_stopped_first_run_leaves_are_never_taken_over(
    new_mysql_db: NewDb, statements: tuple[str, ...], make_journal: Callable[..., SAJournal]
) -> None:
    """casty-sa's tables without a revision that hold data, or are not exactly a prefix of
    revision 0001's, stay refused by ``upgrade`` and by a journal's migration, and are
    left as they were."""
    url = await _first_run_left(new_mysql_db, *statements)
    before = await dbtools.table_names(url)
    with pytest.raises(casty_sa.SchemaError, match="without casty-sa's version table"):
        await casty_sa.upgrade(url)
    with pytest.raises(casty_sa.SchemaError):
        await make_journal(url, migrate=True).start()
    assert await dbtools.table_names(url) == before
    assert await casty_sa.current(url) is None


@pytest.mark.parametrize("url", ["mysql://", "mariadb://"])
def test_the_script_is_mysql_ddl(url: str) -> None:
    out = io.StringIO()
    casty_sa.migrate.write_sql(url, "head", out)
    script = out.getvalue()
    collation = "utf8mb4_nopad_bin" if url.startswith("mariadb") else "utf8mb4_0900_bin"
    key = f"entity_id VARCHAR(512) CHARACTER SET utf8mb4 COLLATE {collation} NOT NULL"
    assert script.count(key) == 3  # events, snapshots and tombstones
    assert "payload LONGBLOB NOT NULL" in script and "BLOB," not in script
    assert script.count(")ENGINE=InnoDB CHARSET=utf8mb4") == 5  # (not Alembic's version table)
    assert "CREATE TABLE casty_sa_event_counter" in script
    assert "INSERT INTO casty_sa_event_counter" in script
    assert "GENERATED" not in script and "IDENTITY" not in script


def _error(code: int, text: str) -> Exception:
    import asyncmy.errors  # type: ignore[import-untyped,unused-ignore]

    kind = asyncmy.errors.IntegrityError if code == 1062 else asyncmy.errors.OperationalError
    error: Exception = kind(code, text)
    return error


@pytest.mark.parametrize(
    ("code", "text", "committing", "verdict"),
    [
        (1062, "Duplicate entry 'a-1' for key 'PRIMARY'", True, "sequence taken"),
        (1062, "Duplicate entry 'a-1' for key 'casty_sa_events.PRIMARY'", True, "sequence taken"),
        (
            1062,
            "Duplicate entry '0-0-7' for key 'ix_casty_sa_events_global_order'",
            True,
            "refused",
        ),
        (1213, "Deadlock found when trying to get lock", True, "contended"),
        (1205, "Lock wait timeout exceeded", False, "contended"),
        (1406, "Data too long for column 'entity_id'", True, "refused"),
        (2013, "Lost connection to MySQL server during query", True, "unknown"),
        (2006, "MySQL server has gone away", False, "nothing stored"),
        (
            1969,
            "Query execution was interrupted (max_statement_time exceeded)",
            True,
            "nothing stored",
        ),
    ],
)
def test_what_a_failed_write_means(code: int, text: str, committing: bool, verdict: str) -> None:
    failure = classify_write_failure(_error(code, text), committing=committing, dialect="mysql")
    assert _verdict(failure) == verdict


def _verdict(failure: BaseException) -> str:
    if isinstance(failure, WriteRefused):
        return "sequence taken" if failure.duplicate else "refused"
    if isinstance(failure, Contended):
        return "contended"
    if isinstance(failure, ConnectionLost):
        return "unknown" if failure.during_commit else "not sent"
    return "nothing stored"  # the error itself: the server answered, the packet stopped


def test_urls_name_the_drivers() -> None:
    assert str(to_async_url("mysql://u@h/db")) == "mysql+asyncmy://u@h/db"
    assert str(to_async_url("mariadb://u@h/db")) == "mariadb+asyncmy://u@h/db"
    assert str(to_async_url("mariadb+aiomysql://u@h/db")) == "mariadb+aiomysql://u@h/db"
    with pytest.raises(UnsupportedDatabase, match="asyncmy"):
        to_async_url("mysql+pymysql://u@h/db")
