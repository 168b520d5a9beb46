"""Hostile or bad input: each case gets a typed casty-sa error, stores nothing, and the
journal stays usable afterwards.

Every journal-level case runs on both backends (``journal``/``db_url`` fixtures). URL cases
need no database. The wrong-password case lives in ``test_faults_postgres.py``, which runs
a PostgreSQL that asks for passwords.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from casty import PersistedEvent, Snapshot
from sqlalchemy import URL, make_url, text
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
from sqlalchemy.ext.asyncio import create_async_engine

import casty_sa
from casty_sa import (
    MAX_ENTITY_ID_LENGTH,
    MAX_SEQUENCE_NR,
    DatabaseAccessDenied,
    DatabaseUnavailable,
    InvalidEventError,
    JournalError,
    PayloadDecodeError,
    PayloadEncodeError,
    SAJournal,
    SchemaError,
    SequenceConflict,
    UnsupportedDatabase,
    libpq,
    urls,
)
from casty_sa.backends import backend_for

from support import dbtools
from support.processes import free_port

PASSWORD = "hunter2-Secret-PW"


def ev(seq: Any, event: Any = None, ts: Any = 1.5) -> PersistedEvent[Any]:
    return PersistedEvent(seq, event if event is not None else f"e{seq}", ts)


async def stored_rows(journal: SAJournal) -> tuple[int, int]:
    """(events, snapshots) rows in the journal's tables, read past the journal's own code."""
    async with journal.engine.connect() as conn:
        events = (await conn.execute(text("SELECT count(*) FROM casty_sa_events"))).scalar_one()
        snaps = (await conn.execute(text("SELECT count(*) FROM casty_sa_snapshots"))).scalar_one()
    return int(events), int(snaps)


async def assert_still_usable(journal: SAJournal, entity_id: str = "still-usable") -> None:
    """A normal write and read after the bad call both work."""
    before = await journal.load(entity_id)
    seq = before[-1].sequence_nr + 1 if before else 1
    await journal.persist(entity_id, [ev(seq, "ok")])
    await journal.save_snapshot(entity_id, Snapshot(seq, "state", 2.0))
    assert [e.sequence_nr for e in await journal.load(entity_id)][-1] == seq
    snapshot = await journal.load_snapshot(entity_id)
    assert snapshot is not None and snapshot.sequence_nr == seq


# -- entity ids --------------------------------------------------------------------------------

BAD_ENTITY_IDS = {
    "empty": "",
    "10k-chars": "x" * 10_000,
    "just-over-limit": "y" * (MAX_ENTITY_ID_LENGTH + 1),
    "nul": "acct\x00-1",
    "only-nul": "\x00",
    "lone-high-surrogate": "acct-\ud800",
    "lone-low-surrogate": "\udfff-acct",
    "bytes": b"acct-1",
    "int": 7,
    "none": None,
}


@pytest.mark.parametrize("entity_id", list(BAD_ENTITY_IDS.values()), ids=list(BAD_ENTITY_IDS))
async def test_bad_entity_ids_are_refused_by_every_method(
    journal: SAJournal, entity_id: Any
) -> None:
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: journal.persist(entity_id, [ev(1)]),
        lambda: journal.save_snapshot(entity_id, Snapshot(1, "s", 1.0)),
        lambda: journal.load(entity_id),
        lambda: journal.load_snapshot(entity_id),
    ]
    for call in calls:
        with pytest.raises(InvalidEventError) as info:
            await call()
        assert isinstance(info.value, JournalError)
        assert len(str(info.value)) < 1000, "the message must not echo a 10k-character id"
    assert await stored_rows(journal) == (0, 0)
    await assert_still_usable(journal)


SQL_METACHARACTERS = [
    "'; DROP TABLE casty_sa_events; --",
    '" OR 1=1 --',
    "%",
    "_",
    "%(entity_id)s",
    ":entity_id",
    "?",
    "$1",
    "\\x00",
    "\\",
    "{}",
    "a\nb\tc\r",
    "*/ SELECT 1; /*",
    "\u202eevil\u202c",
    "\U0001f4a5 emoji",
    "z" * MAX_ENTITY_ID_LENGTH,
]


async def test_sql_metacharacter_ids_round_trip_unharmed(journal: SAJournal) -> None:
    for i, entity_id in enumerate(SQL_METACHARACTERS):
        await journal.persist(entity_id, [ev(1, ("first", i)), ev(2, ("second", i))])
        await journal.save_snapshot(entity_id, Snapshot(2, ("state", i), 3.0))
    for i, entity_id in enumerate(SQL_METACHARACTERS):
        assert [e.event for e in await journal.load(entity_id)] == [("first", i), ("second", i)]
        assert await journal.load_snapshot(entity_id) == Snapshot(2, ("state", i), 3.0)
    assert await stored_rows(journal) == (2 * len(SQL_METACHARACTERS), len(SQL_METACHARACTERS))
    await assert_still_usable(journal)


# -- sequence numbers --------------------------------------------------------------------------

BAD_SEQUENCE_NRS = {
    "zero": 0,
    "negative": -1,
    "very-negative": -(2**63),
    "just-over-int64": MAX_SEQUENCE_NR + 1,
    "2**64": 2**64,
    "huge": 10**40,
    "true": True,
    "false": False,
    "float": 1.0,
    "str": "1",
    "none": None,
}


@pytest.mark.parametrize("seq", list(BAD_SEQUENCE_NRS.values()), ids=list(BAD_SEQUENCE_NRS))
async def test_bad_sequence_numbers_are_refused(journal: SAJournal, seq: Any) -> None:
    with pytest.raises(InvalidEventError, match="sequence number"):
        await journal.persist("acct", [ev(seq)])
    # a bad number after good ones: the good ones are not stored either
    with pytest.raises(InvalidEventError, match="sequence number"):
        await journal.persist("acct", [ev(1), ev(2), ev(seq)])
    with pytest.raises(InvalidEventError, match="sequence number"):
        await journal.save_snapshot("acct", Snapshot(seq, "state", 1.0))
    assert await stored_rows(journal) == (0, 0)
    await assert_still_usable(journal, "acct")


@pytest.mark.parametrize(
    "seqs", [[1, 3, 2], [2, 2], [5, 4], [1, 2, 3, 3], [MAX_SEQUENCE_NR, 1]], ids=str
)
async def test_sequence_numbers_must_increase_within_one_call(
    journal: SAJournal, seqs: list[int]
) -> None:
    with pytest.raises(InvalidEventError, match="must increase"):
        await journal.persist("acct", [ev(s) for s in seqs])
    assert await stored_rows(journal) == (0, 0)
    await assert_still_usable(journal, "acct")


async def test_from_sequence_nr_must_be_an_int(journal: SAJournal) -> None:
    await journal.persist("acct", [ev(1)])
    bad_values: tuple[Any, ...] = (1.0, "1", None, True)
    for bad in bad_values:
        with pytest.raises(InvalidEventError, match="from_sequence_nr"):
            await journal.load("acct", bad)
    assert [e.sequence_nr for e in await journal.load("acct", -(2**70))] == [1]
    assert await journal.load("acct", 2**70) == []


async def test_gap_policy_gaps_are_accepted_duplicates_are_not(journal: SAJournal) -> None:
    """The documented policy: the journal enforces uniqueness per entity and a strict
    increase within one call, nothing else. A gap after the stored highest number is
    accepted, and so is a lower number that is still free; casty itself never produces
    either (it numbers events from its own counter)."""
    await journal.persist("acct", [ev(1), ev(2)])
    await journal.persist("acct", [ev(5), ev(9)])  # gap after the highest, gap inside
    await journal.persist("acct", [ev(3)])  # a free number below the highest
    assert [e.sequence_nr for e in await journal.load("acct")] == [1, 2, 3, 5, 9]
    with pytest.raises(SequenceConflict) as info:
        await journal.persist("acct", [ev(9)])
    assert info.value.sequence_nr == 9
    with pytest.raises(SequenceConflict) as info:
        await journal.persist("acct", [ev(4), ev(5), ev(6)])  # 4 is free, 5 is not
    assert (info.value.entity_id, info.value.sequence_nr) == ("acct", 5)
    assert [e.sequence_nr for e in await journal.load("acct")] == [1, 2, 3, 5, 9]
    await journal.persist("acct", [ev(10)])
    assert [e.sequence_nr for e in await journal.load("acct", 9)] == [9, 10]


# -- timestamps --------------------------------------------------------------------------------


@pytest.mark.parametrize("timestamp", ["now", None, True, b"1", [1.0]], ids=repr)
async def test_non_numeric_timestamps_are_refused(journal: SAJournal, timestamp: Any) -> None:
    with pytest.raises(InvalidEventError, match="timestamp"):
        await journal.persist("acct", [ev(1), ev(2, ts=timestamp)])
    with pytest.raises(InvalidEventError, match="timestamp"):
        await journal.save_snapshot("acct", Snapshot(1, "s", timestamp))
    assert await stored_rows(journal) == (0, 0)
    await assert_still_usable(journal, "acct")


async def test_infinite_and_integer_timestamps_round_trip(journal: SAJournal, backend: str) -> None:
    """MySQL's and MariaDB's DOUBLE holds no infinity: there the call is refused with its
    reason and nothing of it is stored; an integer timestamp round-trips everywhere."""
    infinite = [ev(1, ts=float("inf")), ev(2, ts=-float("inf")), ev(3, ts=7)]
    if backend != "mysql":
        await journal.persist("acct", infinite)
        assert [e.timestamp for e in await journal.load("acct")] == [math.inf, -math.inf, 7.0]
        return
    for events in (infinite, infinite[1:]):
        with pytest.raises(InvalidEventError, match=r"cannot be stored on MySQL/MariaDB") as info:
            await journal.persist("acct", events)
        assert str(info.value).endswith("nothing was stored")
    with pytest.raises(InvalidEventError, match=r"timestamp -inf cannot be stored"):
        await journal.save_snapshot("acct", Snapshot(3, "s", -math.inf))
    assert await stored_rows(journal) == (0, 0)
    await journal.persist("acct", [ev(1, ts=7)])
    assert [e.timestamp for e in await journal.load("acct")] == [7.0]


@pytest.mark.parametrize("timestamp", [float("nan"), 10**400], ids=["nan", "10**400"])
async def test_unrepresentable_timestamp_is_refused_as_invalid(
    journal: SAJournal, timestamp: Any
) -> None:
    with pytest.raises(InvalidEventError, match="timestamp"):
        await journal.persist("acct", [ev(1, ts=timestamp)])
    with pytest.raises(InvalidEventError, match="timestamp"):
        await journal.save_snapshot("acct", Snapshot(1, "s", timestamp))
    assert await stored_rows(journal) == (0, 0)


# -- payloads ----------------------------------------------------------------------------------

UNPICKLABLE: dict[str, Any] = {
    "lambda": lambda: None,
    "lock": threading.Lock(),
    "generator": (i for i in range(3)),
    "nested": {"fine": 1, "bad": [1, 2, lambda: 3]},
}


@pytest.mark.parametrize("payload", list(UNPICKLABLE.values()), ids=list(UNPICKLABLE))
async def test_unpicklable_payload_fails_that_call_and_stores_nothing(
    journal: SAJournal, payload: Any
) -> None:
    with pytest.raises(PayloadEncodeError) as info:
        await journal.persist("acct", [ev(1, "fine"), ev(2, payload), ev(3, "fine")])
    assert (info.value.entity_id, info.value.sequence_nr) == ("acct", 2)
    assert "acct" in str(info.value) and "sequence number 2" in str(info.value)
    with pytest.raises(PayloadEncodeError) as info:
        await journal.save_snapshot("acct", Snapshot(4, payload, 1.0))
    assert info.value.sequence_nr == 4
    assert await stored_rows(journal) == (0, 0)
    await assert_still_usable(journal, "acct")


async def test_serializer_returning_non_bytes_is_an_encode_error(
    db_url: URL, make_journal: Callable[..., SAJournal]
) -> None:
    journal = make_journal(db_url, serialize=lambda obj: "not bytes" if obj == "bad" else b"ok")
    with pytest.raises(PayloadEncodeError, match="not bytes"):
        await journal.persist("acct", [ev(1, "good"), ev(2, "bad")])
    with pytest.raises(PayloadEncodeError, match="not bytes"):
        await journal.save_snapshot("acct", Snapshot(2, "bad", 1.0))
    assert await stored_rows(journal) == (0, 0)


async def test_tens_of_mib_payloads_round_trip(journal: SAJournal) -> None:
    blob = bytes(range(256)) * (4096 * 24)  # 24 MiB
    await journal.persist("huge", [ev(1, blob), ev(2, "small after")])
    await journal.save_snapshot("huge", Snapshot(2, blob, 1.0))
    loaded = await journal.load("huge")
    assert [len(e.event) for e in loaded] == [len(blob), len("small after")]
    assert loaded[0].event == blob
    snapshot = await journal.load_snapshot("huge")
    assert snapshot is not None and snapshot.state == blob
    await assert_still_usable(journal)


@pytest.mark.only_backends("mysql")
async def test_a_row_over_max_allowed_packet_is_refused_and_nothing_stored(
    journal: SAJournal,
) -> None:
    """MySQL takes no statement over the server's ``max_allowed_packet``, nor sends back a
    row over it: such a row is refused before anything is sent, naming the setting, and its
    neighbours in the call and in the group are not held back."""
    async with journal.engine.connect() as conn:
        limit = int((await conn.execute(text("SELECT @@max_allowed_packet"))).scalar_one())
    blob = b"x" * limit
    huge = journal.persist("huge", [ev(1, "small"), ev(2, blob)])
    neighbour = journal.persist("neighbour", [ev(1, "fine")])
    results = await asyncio.gather(huge, neighbour, return_exceptions=True)
    assert isinstance(results[0], InvalidEventError), results[0]
    assert f"over the server's max_allowed_packet ({limit:,} bytes" in str(results[0])
    assert str(results[0]).endswith("nothing was stored")
    assert results[1] is None
    with pytest.raises(InvalidEventError, match="max_allowed_packet"):
        await journal.save_snapshot("huge", Snapshot(1, blob, 1.0))
    assert await journal.load("huge") == []
    assert await journal.load_snapshot("huge") is None
    assert [e.event for e in await journal.load("neighbour")] == ["fine"]


_EVENTS_MODULE = """
from dataclasses import dataclass


@dataclass(frozen=True)
class Deposited:
    amount: int
"""


@pytest.fixture
def events_module(tmp_path: Path) -> Iterator[ModuleType]:
    """A real module with an event class, importable by name while the test holds it."""
    name = f"casty_sa_hostile_events_{uuid.uuid4().hex}"
    path = tmp_path / f"{name}.py"
    path.write_text(_EVENTS_MODULE)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    try:
        yield module
    finally:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("how", ["class-renamed", "module-gone"])
async def test_row_that_no_longer_unpickles_names_entity_and_sequence_nr(
    journal: SAJournal, events_module: ModuleType, how: str
) -> None:
    deposited = events_module.Deposited
    await journal.persist("acct-7", [ev(1, "opened"), ev(2, deposited(10)), ev(3, "closed")])
    await journal.save_snapshot("acct-7", Snapshot(2, deposited(10), 1.0))
    await journal.persist("other", [ev(1, "unrelated")])
    assert (await journal.load("acct-7"))[1].event == deposited(10)

    if how == "class-renamed":
        setattr(events_module, "Deposit", deposited)  # noqa: B010 - a module built at runtime
        delattr(events_module, "Deposited")
    else:
        del sys.modules[events_module.__name__]

    with pytest.raises(PayloadDecodeError) as info:
        await journal.load("acct-7")
    error = info.value
    assert (error.entity_id, error.sequence_nr) == ("acct-7", 2)
    message = str(error)
    assert "'acct-7'" in message and "sequence number 2" in message
    assert "renamed" in message and "alias" in message  # says how to fix it
    assert isinstance(error.__cause__, AttributeError | ImportError)

    with pytest.raises(PayloadDecodeError) as snap_info:
        await journal.load_snapshot("acct-7")
    assert (snap_info.value.entity_id, snap_info.value.sequence_nr) == ("acct-7", 2)
    assert "snapshot" in str(snap_info.value)

    # the rows around it and other entities still load; the journal keeps working
    assert [e.event for e in await journal.load("acct-7", 3)] == ["closed"]
    assert [e.event for e in await journal.load("other")] == ["unrelated"]
    await journal.persist("acct-7", [ev(4, "more")])
    await assert_still_usable(journal)


async def test_garbage_bytes_in_a_row_are_a_decode_error(journal: SAJournal) -> None:
    await journal.persist("acct", [ev(1)])
    async with journal.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO casty_sa_events "
                "(entity_id, sequence_nr, timestamp, payload, position) "
                "VALUES ('acct', 2, 1.0, :payload, -1000000)"
            ),
            {"payload": b"\x80\x05not a pickle at all"},
        )
    with pytest.raises(PayloadDecodeError) as info:
        await journal.load("acct")
    assert (info.value.entity_id, info.value.sequence_nr) == ("acct", 2)
    assert [e.sequence_nr for e in await journal.load("acct", 3)] == []
    await assert_still_usable(journal)


# -- URLs --------------------------------------------------------------------------------------


def assert_password_hidden(*texts: str) -> None:
    for shown in texts:
        assert PASSWORD not in shown, f"password leaked in: {shown[:300]}"


def full_text(exc: BaseException) -> str:
    """The error as a user sees it: message, chained causes, traceback."""
    return "".join(traceback.format_exception(exc))


@pytest.mark.parametrize(
    "url",
    [
        f"mssql+aioodbc://app:{PASSWORD}@127.0.0.1/bank",
        f"mysql+pymysql://app:{PASSWORD}@127.0.0.1/bank",
        f"oracle+oracledb://app:{PASSWORD}@127.0.0.1/bank",
        f"http://app:{PASSWORD}@127.0.0.1/bank",
        f"sqlite+pysqlite:///{PASSWORD}.db",
        f"postgresql+psycopg2://app:{PASSWORD}@127.0.0.1/bank",
        f"postgresql+pg8000://app:{PASSWORD}@127.0.0.1/bank",
        f"app:{PASSWORD}@127.0.0.1/bank",
        f"not a url {PASSWORD}",
        "",
    ],
    ids=[
        "mssql",
        "mysql-pymysql",
        "oracle",
        "http",
        "sqlite-pysqlite",
        "pg-psycopg2",
        "pg-pg8000",
        "no-scheme",
        "garbage",
        "empty",
    ],
)
async def test_unsupported_urls_are_refused_without_showing_the_password(url: str) -> None:
    with pytest.raises(UnsupportedDatabase) as info:
        SAJournal(url)
    assert_password_hidden(str(info.value), full_text(info.value))
    with pytest.raises(UnsupportedDatabase) as info:
        await casty_sa.upgrade(url)
    assert_password_hidden(str(info.value), full_text(info.value))


class _UnregisteredDialect(SQLiteDialect_aiosqlite):
    """An async dialect casty-sa has no backend for (aiosqlite under another name)."""

    name = "unregistered"


registry.register("unregistered.aiosqlite", __name__, "_UnregisteredDialect")


async def test_an_engine_of_a_dialect_without_a_backend_is_refused() -> None:
    """The backend registry refuses a dialect it does not know instead of guessing one."""
    engine = create_async_engine("unregistered+aiosqlite://")
    try:
        with pytest.raises(UnsupportedDatabase, match="no backend for the 'unregistered'"):
            backend_for(engine, None)
    finally:
        await engine.dispose()


def test_repr_never_shows_the_password() -> None:
    for url in (
        f"postgresql://app:{PASSWORD}@db.example/bank",
        URL.create("postgresql", "app", PASSWORD, "db.example", 5432, "bank"),
        f"postgres://app:{PASSWORD}@db.example:6543/bank?sslmode=require",
    ):
        journal = SAJournal(url)
        assert_password_hidden(repr(journal), str(journal))
        assert "app:***@db.example" in repr(journal)


SECRET_QUERY_URLS = [
    f"postgresql://app@db.example/bank?password={PASSWORD}",
    f"postgresql://app@db.example/bank?sslmode=require&sslpassword={PASSWORD}",
    f"postgres://app:{PASSWORD}@db.example:6543/bank?application_name=x&password={PASSWORD}",
    URL.create("postgresql", "app", None, "db.example", None, "bank", {"password": PASSWORD}),
    f"postgresql://app@db.example:not-a-port/bank?password={PASSWORD}",  # unparseable
    # REVIEW (review-pg): a libpq conninfo string or URI as a parameter's value (psycopg
    # passes `dbname` on to libpq): its password was shown, `=` percent-encoded past the mask
    f"postgresql+psycopg://app@db.example/bank?dbname=host%3Ddb+password%3D{PASSWORD}",
    f"postgresql+psycopg://app@db.example/bank?dbname=postgresql%3A%2F%2Fapp%3A{PASSWORD}%40db",
]


@pytest.mark.parametrize("url", SECRET_QUERY_URLS, ids=["password", "sslpassword", "both",
                                                        "URL-object", "unparseable",
                                                        "conninfo-value", "uri-value"])  # fmt: skip
def test_secrets_in_the_query_string_are_masked(url: str | URL) -> None:
    shown = urls.safe_url(url)
    assert_password_hidden(shown)
    assert shown.startswith("postgres")
    try:
        journal = SAJournal(url)
    except UnsupportedDatabase as exc:  # the unparseable one
        assert_password_hidden(str(exc), full_text(exc))
        return
    assert_password_hidden(repr(journal), str(journal))
    assert "app" in repr(journal) and "db.example" in repr(journal)


def test_free_text_is_scrubbed_of_url_shaped_secrets() -> None:
    text = (
        f"failed: postgresql://app:{PASSWORD}@db/x?sslpassword={PASSWORD}&sslmode=require "
        f"host=db password={PASSWORD} user=app"
    )
    masked = urls.mask_secrets(text)
    assert_password_hidden(masked)
    assert "sslmode=require" in masked and "user=app" in masked and "app:***@db" in masked
    # the secrets of a URL, as given and percent-encoded, wherever they appear
    odd = "p@ss w/rd&" + PASSWORD
    url = URL.create("postgresql", "app", None, "db", None, "x", {"password": odd})
    secrets = urls.url_secrets(url)
    leaked = f"{odd} {url.render_as_string(hide_password=False)}"
    assert PASSWORD not in urls.mask_secrets(leaked, secrets)


async def test_a_failing_connection_never_shows_a_query_string_password(
    make_journal: Callable[..., SAJournal], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="casty_sa")
    port = free_port()  # nothing listens there: connection refused
    journal = make_journal(
        f"postgresql://app@127.0.0.1:{port}/bank?password={PASSWORD}&application_name=t",
        connect_timeout=2.0,
        read_retries=1,
    )
    for call in (journal.start(), journal.persist("acct", [ev(1)]), journal.load("acct")):
        error = await _fails_promptly(call, limit=5.0)
        assert f"127.0.0.1:{port}" in str(error)
        assert_password_hidden(str(error), full_text(error), repr(journal))
    assert_password_hidden(caplog.text)


async def test_a_path_is_a_sqlite_file(
    tmp_path: Path, make_journal: Callable[..., SAJournal]
) -> None:
    path = tmp_path / "journal.db"
    await casty_sa.upgrade(path)
    assert await casty_sa.current(path) == casty_sa.head_revision()
    journal = make_journal(path)
    assert journal.kind.value == "local" and str(path) in repr(journal)
    await journal.persist("acct", [ev(1)])
    await journal.close()
    again = make_journal(str(path).join(["sqlite:///", ""]))
    assert [e.sequence_nr for e in await again.load("acct")] == [1]


@pytest.mark.parametrize("url", ["sqlite://j.db", f"sqlite://app:{PASSWORD}@j.db",
                                 "sqlite+aiosqlite://localhost:5/j.db"])  # fmt: skip
async def test_a_sqlite_url_with_a_host_is_refused_with_the_right_form(url: str) -> None:
    with pytest.raises(UnsupportedDatabase, match=r"sqlite:///j\.db") as info:
        SAJournal(url)
    assert_password_hidden(str(info.value), full_text(info.value))
    with pytest.raises(UnsupportedDatabase, match=r"sqlite:///j\.db"):
        await casty_sa.upgrade(url)


async def test_a_missing_sqlite_directory_is_named_and_not_retried(
    tmp_path: Path, make_journal: Callable[..., SAJournal], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="casty_sa")
    directory = tmp_path / "not" / "there"
    journal = make_journal(f"sqlite:///{directory / 'journal.db'}", read_retries=3)
    for call in (journal.start(), journal.load("acct"), journal.persist("acct", [ev(1)])):
        with pytest.raises(DatabaseAccessDenied) as info:
            await asyncio.wait_for(call, 10)
        assert str(directory) in str(info.value) and "does not exist" in str(info.value)
        assert "call again" not in str(info.value)
        assert isinstance(info.value, DatabaseUnavailable)  # existing handlers still catch it
    assert "retry" not in caplog.text
    assert not directory.exists()  # nothing created behind the user's back
    directory.mkdir(parents=True)  # fixed: the same journal works
    await assert_still_usable(journal)


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("keepalives=1&sslmode=require", "'keepalives'"),
        ("gssencmode=disable&channel_binding=require", "'channel_binding', 'gssencmode'"),
        ("sslmode=sometimes", "sslmode='sometimes'"),
        ("connect_timeout=soon", "connect_timeout='soon'"),
        ("connect_timeout=0", "connect_timeout='0'"),
        ("options=-B%20100", "'-B'"),
        ("options=-c%20statement_timeout%3D0", "statement_timeout='0'"),
        ("statement_cache_size=many", "statement_cache_size='many'"),
    ],
)
def test_libpq_options_asyncpg_cannot_honour_are_refused_by_name(query: str, named: str) -> None:
    url = f"postgresql://app:{PASSWORD}@db.example/bank?{query}&sslpassword={PASSWORD}"
    with pytest.raises(UnsupportedDatabase) as info:
        SAJournal(url)
    assert named in str(info.value)
    assert_password_hidden(str(info.value), full_text(info.value))


def test_libpq_options_are_translated_for_asyncpg() -> None:
    options = libpq.postgres_options(
        make_url(
            "postgresql://app@db/bank?sslmode=verify-full&sslrootcert=/etc/ca.pem"
            "&application_name=billing&connect_timeout=3&statement_cache_size=0"
            "&options=-c%20search_path%3Da%5C%20b%20--lock-timeout%3D5s%20-cstatement_timeout%3D2min"
            "&host=/run/pg&target_session_attrs=read-write"
        )
    )
    assert options.connect_args == {
        "dsn": "postgresql://?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        "statement_cache_size": 0,
    }
    assert options.server_settings == {
        "search_path": "a b",
        "lock_timeout": "5s",
        "application_name": "billing",
    }
    assert (options.connect_timeout, options.statement_timeout) == (3.0, 120.0)
    # what asyncpg takes as it is stays in the URL
    assert dict(options.url.query) == {"host": "/run/pg", "target_session_attrs": "read-write"}


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never says a word (a hung server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # the kernel completes the handshake; nobody ever answers
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


async def _fails_promptly(call: Awaitable[Any], limit: float) -> JournalError:
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as info:
        await asyncio.wait_for(call, timeout=limit + 10)
    assert time.monotonic() - started < limit, "the call did not fail promptly"
    return info.value


async def test_unreachable_postgres_fails_promptly_without_the_password(
    make_journal: Callable[..., SAJournal],
) -> None:
    port = free_port()  # nothing listens there: connection refused
    journal = make_journal(
        f"postgresql://app:{PASSWORD}@127.0.0.1:{port}/bank", connect_timeout=2.0
    )
    for call in (journal.start(), journal.persist("acct", [ev(1)]), journal.load("acct")):
        error = await _fails_promptly(call, limit=3.0)
        assert f"127.0.0.1:{port}" in str(error)
        assert_password_hidden(str(error), full_text(error), repr(journal))


async def test_hung_postgres_hits_the_connect_timeout(
    make_journal: Callable[..., SAJournal],
) -> None:
    async with silent_server() as port:
        journal = make_journal(
            f"postgresql://app:{PASSWORD}@127.0.0.1:{port}/bank", connect_timeout=1.0
        )
        for call in (journal.persist("acct", [ev(1)]), journal.load_snapshot("acct")):
            error = await _fails_promptly(call, limit=4.0)
            assert_password_hidden(str(error), full_text(error), repr(journal))


async def test_sqlite_file_in_a_missing_directory_is_unavailable(
    tmp_path: Path, make_journal: Callable[..., SAJournal]
) -> None:
    journal = make_journal(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'journal.db'}")
    for call in (journal.start(), journal.persist("acct", [ev(1)]), journal.load("acct")):
        await _fails_promptly(call, limit=3.0)
    assert not (tmp_path / "no").exists()
    (tmp_path / "no" / "such" / "dir").mkdir(parents=True)  # fixed: the same journal works
    await assert_still_usable(journal)


# -- schema ------------------------------------------------------------------------------------


async def _set_revision(journal: SAJournal, revision: str) -> None:
    async with journal.engine.begin() as conn:
        await conn.execute(
            text("UPDATE casty_sa_alembic_version SET version_num = :rev"), {"rev": revision}
        )


async def test_database_at_an_unknown_revision_is_a_schema_error(
    db_url: URL, make_journal: Callable[..., SAJournal]
) -> None:
    journal = make_journal(db_url)  # SQLite would migrate if it could: it must not here
    await _set_revision(journal, "9f9f_from_a_newer_casty_sa")
    for call in (
        journal.start(),
        journal.persist("acct", [ev(1)]),
        journal.save_snapshot("acct", Snapshot(1, "s", 1.0)),
        journal.load("acct"),
        journal.load_snapshot("acct"),
    ):
        with pytest.raises(SchemaError, match="9f9f_from_a_newer_casty_sa") as info:
            await call
        assert "Upgrade the casty-sa package" in str(info.value)
    assert await stored_rows(journal) == (0, 0)
    await _set_revision(journal, casty_sa.head_revision())  # fixed: the same journal works
    await assert_still_usable(journal)


async def test_database_without_tables_is_a_schema_error_until_migrated(
    empty_db_url: URL, make_journal: Callable[..., SAJournal]
) -> None:
    journal = make_journal(empty_db_url, migrate=False)
    for call in (journal.persist("acct", [ev(1)]), journal.load("acct")):
        with pytest.raises(SchemaError, match="casty-sa upgrade") as info:
            await call
        assert "has no casty-sa tables" in str(info.value)
    assert await casty_sa.current(empty_db_url) is None  # the journal created nothing
    await casty_sa.upgrade(empty_db_url)
    await assert_still_usable(journal)


@pytest.mark.parametrize("table", ["casty_sa_events", "casty_sa_snapshots"])
async def test_a_column_dropped_under_a_running_journal_is_a_schema_error(
    db_url: URL, make_journal: Callable[..., SAJournal], table: str
) -> None:
    """Not ``DatabaseUnavailable`` retried with backoff: the statement fails the same way
    until an operator restores the column."""
    journal = make_journal(db_url, retry_backoff=2.0)
    await journal.persist("acct", [ev(1), ev(2)])
    await journal.save_snapshot("acct", Snapshot(2, "s", 1.0))
    await journal.load("acct")
    await journal.load_snapshot("acct")
    async with journal.engine.begin() as conn:
        await conn.execute(text(f"ALTER TABLE {table} DROP COLUMN timestamp"))
    calls = (
        [journal.persist("acct", [ev(3)]), journal.load("acct")]
        if table == "casty_sa_events"
        else [journal.save_snapshot("acct", Snapshot(3, "s", 1.0)), journal.load_snapshot("acct")]
    )
    started = time.monotonic()
    for call in calls:
        with pytest.raises(SchemaError, match="timestamp") as info:
            await asyncio.wait_for(call, 10)
        assert "missing or altered" in str(info.value)
    assert time.monotonic() - started < 1.5, "a missing column is not worth retrying"


async def test_tables_dropped_under_a_running_journal(journal: SAJournal) -> None:
    await journal.persist("acct", [ev(1), ev(2)])
    await journal.save_snapshot("acct", Snapshot(2, "s", 1.0))
    async with journal.engine.begin() as conn:
        await conn.execute(text("DROP TABLE casty_sa_events"))
    started = time.monotonic()
    for call in (journal.persist("acct", [ev(3)]), journal.load("acct")):
        with pytest.raises(SchemaError, match="casty-sa upgrade") as info:
            await call
        assert "casty_sa_events" in str(info.value)
    assert time.monotonic() - started < 2.0, "a missing table is not worth retrying"
    # the other table still answers
    assert await journal.load_snapshot("acct") == Snapshot(2, "s", 1.0)
    async with journal.engine.begin() as conn:
        await conn.execute(text("DROP TABLE casty_sa_snapshots"))
    with pytest.raises(SchemaError):
        await journal.save_snapshot("acct", Snapshot(3, "s", 1.0))
    with pytest.raises(SchemaError):
        await journal.load_snapshot("acct")
    # an operator re-creates the schema (what is left of it dropped first: the version table,
    # the projections' offsets and the event counter): the running journal carries on
    async with journal.engine.begin() as conn:
        for table in [casty_sa.VERSION_TABLE, *casty_sa.metadata.tables]:
            await conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    await casty_sa.upgrade(journal.engine)
    assert await journal.load("acct") == []
    await assert_still_usable(journal, "acct")


# -- a password in a driver's error text, in any form --------------------------------------


def test_describe_masks_the_journals_secrets_in_any_form() -> None:
    """The one function every driver error goes through masks what no pattern can see."""
    from casty_sa.diagnosis import describe

    secrets = urls.url_secrets(f"postgresql://app:{PASSWORD}@db/bank")
    shown = describe(ValueError(f"value {PASSWORD!r} violates check"), secrets)
    assert_password_hidden(shown)
    assert "violates check" in shown


@pytest.mark.parametrize(
    ("errcode", "expected"),
    [("42703", SchemaError), ("40P01", DatabaseUnavailable)],
    ids=["schema-error", "contention"],
)
async def test_a_password_echoed_by_the_server_is_masked_in_every_message_and_log_line(
    new_postgres_db: Callable[..., Awaitable[URL]],
    make_journal: Callable[..., SAJournal],
    caplog: pytest.LogCaptureFixture,
    errcode: str,
    expected: type[Exception],
) -> None:
    """A trigger whose error text holds the URL's password verbatim (not URL-shaped, so
    only the journal's own secrets can mask it): the SchemaError, the contention error and
    the log lines of the retries all go through the same masking."""
    url = await new_postgres_db()
    await dbtools.execute(
        url,
        "CREATE FUNCTION casty_sa_test_echo() RETURNS trigger LANGUAGE plpgsql AS $$ "
        f"BEGIN RAISE EXCEPTION 'refused: %', '{PASSWORD}' USING ERRCODE = '{errcode}'; "
        "END $$",
        "CREATE TRIGGER echo BEFORE INSERT ON casty_sa_events FOR EACH ROW "
        "EXECUTE FUNCTION casty_sa_test_echo()",
    )
    journal = make_journal(url.set(password=PASSWORD))  # the test server trusts its clients
    caplog.set_level(logging.DEBUG, logger="casty_sa")
    with pytest.raises(expected) as info:
        await asyncio.wait_for(journal.persist("acct", [ev(1)]), 30)
    assert "refused" in str(info.value)
    assert_password_hidden(str(info.value), caplog.text)
    if errcode == "40P01":
        assert "sending it again" in caplog.text


def test_a_writes_byte_count_counts_utf8_bytes_of_the_entity_id() -> None:
    """The group's byte cap counts what goes on the wire: a non-ASCII id's UTF-8 bytes."""
    from casty_sa.batching import ROW_OVERHEAD, WriteRequest

    entity_id = "ü" * 10  # 10 characters, 20 bytes
    request = WriteRequest(entity_id, events=[(entity_id, 1, 1.0, b"abc")])
    assert request.nbytes == 20 + 3 + ROW_OVERHEAD
