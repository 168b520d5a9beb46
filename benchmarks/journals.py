"""The journals under test, by name, each opened on a fresh store and warmed up.

``JOURNALS`` is the list a run, its table and the smoke test go by, in table
order; ``OPENERS`` says how each is opened. A journal is given to the
workloads through ``Journal`` (casty's ``EventJournal`` methods) inside an
``Opened`` that knows how to dispose of the journal and its store.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from casty import InMemoryJournal, PersistedEvent, Snapshot, SqliteJournal

import casty_sa
from casty_sa import SAJournal

from .data import BASE_TS, check_events, check_snapshot, event_of, state_of
from .mysql import MySQLStores, mysql_args
from .postgres import PostgresStores, asyncpg_args
from .raw import RawAiosqliteJournal, RawAsyncmyJournal, RawAsyncpgJournal


class Journal(Protocol):
    """casty's ``EventJournal`` methods, as the workloads use them."""

    async def persist(self, entity_id: str, events: Sequence[PersistedEvent[Any]]) -> None: ...

    async def load(
        self, entity_id: str, from_sequence_nr: int = 0
    ) -> list[PersistedEvent[Any]]: ...

    async def save_snapshot(self, entity_id: str, snapshot: Snapshot[Any]) -> None: ...

    async def load_snapshot(self, entity_id: str) -> Snapshot[Any] | None: ...


@dataclass
class Opened:
    """A journal on a fresh store, and how to dispose of both."""

    journal: Journal
    close: Callable[[], Awaitable[None]]
    synchronous: str | None = None


_SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


class Stores:
    """Makes a fresh store for each journal name."""

    def __init__(
        self, root: Path, postgres: PostgresStores | None, mysql: MySQLStores | None = None
    ) -> None:
        self._root = root
        self._postgres = postgres
        self._mysql = mysql
        self._counter = itertools.count()

    def _file(self) -> Path:
        return self._root / f"journal-{next(self._counter)}.db"

    def _remover(self, path: Path) -> Callable[[], None]:
        def remove() -> None:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)

        return remove

    def _pg(self) -> PostgresStores:
        if self._postgres is None:
            raise RuntimeError("PostgreSQL was not started")
        return self._postgres

    def _my(self) -> MySQLStores:
        if self._mysql is None:
            raise RuntimeError("MariaDB was not started")
        return self._mysql

    async def open(self, name: str) -> Opened:
        opener = OPENERS.get(name)
        if opener is None:
            raise ValueError(f"unknown journal {name!r}")
        opened = await opener(self)
        journal = opened.journal  # warm up: connections, caches, compiled statements
        await journal.persist("warm-up", [event_of("warm-up", 1)])
        check_events("warm-up", await journal.load("warm-up"), 1, 1)
        await journal.save_snapshot("warm-up", Snapshot(1, state_of("warm-up", 1), BASE_TS))
        check_snapshot("warm-up", await journal.load_snapshot("warm-up"), 1)
        return opened

    async def sa_sqlite(self) -> Opened:
        path = self._file()
        sa = SAJournal(f"sqlite:///{path}")
        await sa.start()
        return Opened(sa, _then(sa.close, self._remover(path)), await _sa_synchronous(sa))

    async def sa_postgresql(self) -> Opened:
        pg = self._pg()
        url = await pg.fresh()
        sa = SAJournal(url)
        await sa.start()
        return Opened(sa, _then(sa.close, lambda: pg.drop(url)))

    async def sa_pg_psycopg(self) -> Opened:
        pg = self._pg()
        url = await pg.fresh()
        sa = SAJournal(url.set(drivername="postgresql+psycopg"))
        await sa.start()
        return Opened(sa, _then(sa.close, lambda: pg.drop(url)))

    async def sa_mariadb(self) -> Opened:
        my = self._my()
        url = await my.fresh()
        sa = SAJournal(url)
        await sa.start()
        return Opened(sa, _then(sa.close, lambda: my.drop(url)))

    async def casty_memory(self) -> Opened:
        async def nothing() -> None:
            return None

        return Opened(InMemoryJournal(), nothing)

    async def casty_sqlite(self) -> Opened:
        path = self._file()
        casty = SqliteJournal(path)
        sync = _SYNCHRONOUS.get(casty._conn.execute("PRAGMA synchronous").fetchone()[0])
        remove = self._remover(path)

        async def close_casty() -> None:
            casty.close()
            remove()

        return Opened(casty, close_casty, sync)

    async def raw_aiosqlite(self) -> Opened:
        path = self._file()
        await casty_sa.upgrade(f"sqlite:///{path}")  # the same tables as sa-sqlite
        raw = RawAiosqliteJournal(path)
        await raw.open()
        return Opened(raw, _then(raw.close, self._remover(path)), "FULL")

    async def raw_asyncpg(self) -> Opened:
        pg = self._pg()
        url = await pg.fresh()
        rawpg = RawAsyncpgJournal(asyncpg_args(url))
        await rawpg.open()
        return Opened(rawpg, _then(rawpg.close, lambda: pg.drop(url)))

    async def raw_asyncmy(self) -> Opened:
        my = self._my()
        url = await my.fresh()
        rawmy = RawAsyncmyJournal(mysql_args(url))
        await rawmy.open()
        return Opened(rawmy, _then(rawmy.close, lambda: my.drop(url)))


#: every journal under test and how it is opened, in the table's order
OPENERS: dict[str, Callable[[Stores], Awaitable[Opened]]] = {
    "sa-sqlite": Stores.sa_sqlite,
    "sa-postgresql": Stores.sa_postgresql,
    "sa-pg-psycopg": Stores.sa_pg_psycopg,
    "sa-mariadb": Stores.sa_mariadb,
    "casty-memory": Stores.casty_memory,
    "casty-sqlite": Stores.casty_sqlite,
    "raw-aiosqlite": Stores.raw_aiosqlite,
    "raw-asyncpg": Stores.raw_asyncpg,
    "raw-asyncmy": Stores.raw_asyncmy,
}
JOURNALS = tuple(OPENERS)
#: the journals that need a PostgreSQL server
ON_POSTGRES = frozenset({"sa-postgresql", "sa-pg-psycopg", "raw-asyncpg"})
#: the journals that need a MySQL (MariaDB) server
ON_MYSQL = frozenset({"sa-mariadb", "raw-asyncmy"})
#: journals whose failures are findings about someone else's code, not errors of this run
THIRD_PARTY = frozenset({"casty-memory", "casty-sqlite"})
#: the journals with casty-sa's read side (``events``), which the R workloads run on
READ_SIDE = frozenset({"sa-sqlite", "sa-postgresql", "sa-pg-psycopg", "sa-mariadb"})


async def _sa_synchronous(journal: SAJournal) -> str | None:
    async with journal.engine.connect() as conn:
        value = (await conn.exec_driver_sql("PRAGMA synchronous")).scalar()
    return _SYNCHRONOUS.get(int(value)) if value is not None else None


def _then(
    first: Callable[[], Awaitable[None]], second: Callable[[], Awaitable[None] | None]
) -> Callable[[], Awaitable[None]]:
    async def both() -> None:
        try:
            await first()
        finally:
            result = second()
            if result is not None:
                await result

    return both
