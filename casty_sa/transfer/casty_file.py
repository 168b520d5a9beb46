"""casty's own ``SqliteJournal`` file as one side of a copy, read and written with ``sqlite3``.

Opening checks the tables (casty's ``events`` and ``snapshots``, nothing else when writing)
and every row's types before a copy begins; a missing file is created by casty's own
``SqliteJournal`` only when asked (an export), so its format is exactly casty's.

Examples
--------
>>> import asyncio, pathlib, tempfile
>>> async def entities(path):
...     async with CastyFile.open(path, create=True) as file:
...         return (await file.stats()).entity_count
>>> asyncio.run(entities(pathlib.Path(tempfile.mkdtemp()) / "casty.db"))
0
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, Column, Double, LargeBinary, MetaData, Table, Text
from sqlalchemy.dialects import sqlite

from casty_sa.batching import row_bytes
from casty_sa.errors import InvalidEventError, JournalError
from casty_sa.models import newer_snapshot_wins
from casty_sa.revisions import CASTY_EVENT_COLUMNS, CASTY_SNAPSHOT_COLUMNS
from casty_sa.transfer.endpoint import LOOKUP_CHUNK, chunks
from casty_sa.transfer.values import EntityStats, JournalStats, Row

__all__ = ["CastyFile", "JournalFileError"]

#: casty's ``snapshots`` table, in the column order rows are written in
_CASTY_SNAPSHOTS = Table(
    "snapshots",
    MetaData(),
    Column("entity_id", Text, primary_key=True),
    Column("sequence_nr", BigInteger),
    Column("state_data", LargeBinary),
    Column("timestamp", Double),
)
#: a snapshot the file holds is replaced only by a newer one (never at a tie: a copy
#: never rewrites what the target holds)
_UPSERT_SNAPSHOTS = str(
    newer_snapshot_wins(
        sqlite.insert(_CASTY_SNAPSHOTS), _CASTY_SNAPSHOTS, replace_equal=False
    ).compile(dialect=sqlite.dialect())
)

log = logging.getLogger(__package__)  # the package's one logger, "casty_sa.transfer"


class JournalFileError(JournalError):
    """A file that is missing, not SQLite, or not in casty's ``SqliteJournal`` format."""


class CastyFile:
    """A file in casty's ``SqliteJournal`` format, read or written with ``sqlite3``.

    Every call runs in a worker thread, so the event loop stays free.

    Parameters
    ----------
    connection : sqlite3.Connection
        An open connection to a file with casty's ``events`` and ``snapshots``
        tables; use :meth:`open` to get one.
    path : Path
        The file, for messages.
    """

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._conn = connection
        self._path = path

    @classmethod
    @asynccontextmanager
    async def open(cls, path: str | Path, *, create: bool = False) -> AsyncIterator[CastyFile]:
        """Open a casty journal file (an async context manager yielding a ``CastyFile``).

        Parameters
        ----------
        path : str | Path
            The file.
        create : bool
            Create the file (with casty's own ``SqliteJournal``, so the format
            is exactly casty's) when it is missing or holds no tables.

        Raises
        ------
        JournalFileError
            The file is missing (and ``create`` is false), is not SQLite, or
            holds other tables than casty's.
        """
        file = Path(path)
        connection = await asyncio.to_thread(_open_casty_file, file, create)
        try:
            opened = cls(connection, file)
            await asyncio.to_thread(opened.check_shapes)  # before any copy begins
            yield opened
        finally:
            await asyncio.to_thread(connection.close)

    @property
    def name(self) -> str:
        """The file's path."""
        return str(self._path)

    @property
    def keeps_zero_sign(self) -> bool:
        """False: casty's ``REAL`` timestamp column reads ``-0.0`` back as ``0.0``."""
        return False

    async def stats(self) -> JournalStats:
        """Per-entity event statistics and snapshot positions of the file."""
        return await asyncio.to_thread(self._stats)

    def _stats(self) -> JournalStats:
        """Per-entity statistics, in the worker thread."""
        with self._errors("read statistics"):
            events = {
                entity: EntityStats(count, first, last)
                for entity, count, first, last in self._conn.execute(
                    "SELECT entity_id, count(*), min(sequence_nr), max(sequence_nr) "
                    "FROM events GROUP BY entity_id"
                )
            }
            snapshots = dict(self._conn.execute("SELECT entity_id, sequence_nr FROM snapshots"))
        return JournalStats(events, snapshots)

    async def read_events(
        self, after: tuple[str, int] | None, limit: int, max_bytes: int
    ) -> list[Row]:
        """Up to ``limit`` events (and ``max_bytes``) in key order, after the key ``after``."""
        columns = "SELECT entity_id, sequence_nr, timestamp, event_data FROM events "
        order = " ORDER BY entity_id, sequence_nr LIMIT ?"
        if after is None:
            return await asyncio.to_thread(self._rows, columns + order, (limit,), max_bytes)
        where = "WHERE (entity_id, sequence_nr) > (?, ?)"
        return await asyncio.to_thread(
            self._rows, columns + where + order, (*after, limit), max_bytes
        )

    async def read_snapshots(self, after: str | None, limit: int, max_bytes: int) -> list[Row]:
        """Up to ``limit`` snapshots (and ``max_bytes``) in entity order, after entity ``after``."""
        columns = "SELECT entity_id, sequence_nr, timestamp, state_data FROM snapshots "
        order = " ORDER BY entity_id LIMIT ?"
        if after is None:
            return await asyncio.to_thread(self._rows, columns + order, (limit,), max_bytes)
        return await asyncio.to_thread(
            self._rows, columns + "WHERE entity_id > ?" + order, (after, limit), max_bytes
        )

    def check_shapes(self) -> None:
        """Refuse a file holding a row casty's ``SqliteJournal`` never writes (on opening).

        One scan per table, before anything is copied: an entity id that is not
        text (a BLOB, a number, NULL), a sequence number that is not an integer,
        a payload that is not a BLOB, or a timestamp that is not a number.

        Raises
        ------
        JournalFileError
            Naming the first such row (its rowid, entity id and sequence number).
        """
        for table, payload in (("events", "event_data"), ("snapshots", "state_data")):
            with self._errors("check rows"):
                bad = self._conn.execute(
                    "SELECT rowid, entity_id, sequence_nr, typeof(entity_id), "
                    f"typeof(sequence_nr), typeof({payload}), typeof(timestamp) FROM {table} "
                    "WHERE typeof(entity_id) != 'text' OR typeof(sequence_nr) != 'integer' "
                    f"OR typeof({payload}) != 'blob' "
                    "OR typeof(timestamp) NOT IN ('real', 'integer') LIMIT 1"
                ).fetchone()
            if bad is None:
                continue
            rowid, entity_id, sequence_nr, *types = bad  # (the first bad row: the scan stops)
            wanted = ("text", "integer", "blob", "real")
            names = ("entity id", "sequence number", "payload", "timestamp")
            problems = ", ".join(
                f"a {name} that is {found.upper()}, not {want.upper()}"
                for name, found, want in zip(names, types, wanted, strict=True)
                if found != want and not (name == "timestamp" and found == "integer")
            )
            raise JournalFileError(
                f"{self._path} is not a well-formed casty SqliteJournal file: row {rowid} of "
                f"table {table!r} (entity id {str(entity_id)[:60]!r}, sequence number "
                f"{str(sequence_nr)[:30]}) has {problems}; casty's SqliteJournal never writes "
                "such rows. Nothing was copied."
            )

    def _rows(self, sql: str, params: tuple[Any, ...], max_bytes: int | None = None) -> list[Row]:
        """Run a read query and check every row it returns, up to ``max_bytes`` of rows.

        The cursor steps row by row, so rows past the cap are never read.
        """
        rows: list[Row] = []
        total = 0
        with self._errors("read rows"):
            for raw in self._conn.execute(sql, params):
                row = _checked_row(*raw)
                total += row_bytes(row.entity_id, row.payload)
                if rows and max_bytes is not None and total > max_bytes:
                    break
                rows.append(row)
        return rows

    async def fetch_events(self, keys: Sequence[tuple[str, int]]) -> list[Row]:
        """The events stored under ``keys``, looked up by primary key."""
        sql = (
            "SELECT entity_id, sequence_nr, timestamp, event_data FROM events "
            "WHERE (entity_id, sequence_nr) IN (VALUES {})"
        )
        return await asyncio.to_thread(self._lookup, sql, "(?, ?)", keys)

    async def fetch_snapshots(self, entities: Sequence[str]) -> list[Row]:
        """The snapshots of ``entities``."""
        sql = (
            "SELECT entity_id, sequence_nr, timestamp, state_data FROM snapshots "
            "WHERE entity_id IN ({})"
        )
        return await asyncio.to_thread(self._lookup, sql, "?", [(entity,) for entity in entities])

    def _lookup(self, sql: str, mark: str, keys: Sequence[tuple[str | int, ...]]) -> list[Row]:
        """The rows ``sql`` finds for ``keys``, a chunk of keys per query.

        ``sql`` has ``{}`` where the chunk's ``mark``s go, one per key.
        """
        found: list[Row] = []
        for chunk in chunks(keys, LOOKUP_CHUNK):
            marks = ", ".join([mark] * len(chunk))
            found += self._rows(sql.format(marks), tuple(part for key in chunk for part in key))
        return found

    async def count_events(self, bounds: Sequence[tuple[str, int]]) -> list[int]:
        """Per ``(entity id, bound)``, how many events of the entity are at or below ``bound``."""
        return await asyncio.to_thread(self._count_events, bounds)

    def _count_events(self, bounds: Sequence[tuple[str, int]]) -> list[int]:
        sql = "SELECT count(*) FROM events WHERE entity_id = ? AND sequence_nr <= ?"
        with self._errors("count events"):
            return [int(self._conn.execute(sql, key).fetchone()[0]) for key in bounds]

    async def write_events(self, rows: Sequence[Row]) -> int:
        """Insert the events the file lacks, in one transaction; return how many."""
        return await asyncio.to_thread(
            self._write,
            "INSERT OR IGNORE INTO events (entity_id, sequence_nr, event_data, timestamp) "
            "VALUES (?, ?, ?, ?)",
            rows,
        )

    async def write_snapshots(self, rows: Sequence[Row]) -> int:
        """Insert snapshots, or advance those with a lower sequence number; return how many."""
        return await asyncio.to_thread(self._write, _UPSERT_SNAPSHOTS, rows)

    def _write(self, sql: str, rows: Sequence[Row]) -> int:
        """Run an insert over ``rows`` in one transaction; return the rows it changed."""
        before = self._conn.total_changes
        with self._errors("write rows"), self._conn:
            self._conn.executemany(
                sql, [(r.entity_id, r.sequence_nr, r.payload, r.timestamp) for r in rows]
            )
        return self._conn.total_changes - before

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn ``sqlite3`` errors into :class:`JournalFileError` naming the file."""
        try:
            yield
        except sqlite3.Error as exc:
            raise JournalFileError(
                f"could not {what} in {self._path}: {type(exc).__name__}: {exc}"
            ) from exc


def _open_casty_file(path: Path, create: bool) -> sqlite3.Connection:
    """Connect to a casty journal file, creating it when allowed; check its tables."""
    if not path.exists() and not create:
        raise JournalFileError(f"{path}: no such file")
    if path.is_dir():
        raise JournalFileError(f"{path} is a directory, not a casty journal file")
    try:
        if create:
            tables = _tables(path) if path.exists() else {}
            if not tables:
                _create_with_casty(path)
        connection = _connect_existing(path)
        tables = _table_columns(connection)
    except sqlite3.Error as exc:
        raise JournalFileError(
            f"{path} is not a casty SqliteJournal file ({type(exc).__name__}: {exc})"
        ) from exc
    expected = {"events": CASTY_EVENT_COLUMNS, "snapshots": CASTY_SNAPSHOT_COLUMNS}
    if any(tables.get(name) != columns for name, columns in expected.items()) or (
        create and set(tables) - set(expected)
    ):
        connection.close()
        found = ", ".join(sorted(tables)) or "no tables"
        raise JournalFileError(
            f"{path} is not a casty SqliteJournal file: it has {found}; expected tables "
            "'events' (entity_id, sequence_nr, event_data, timestamp) and 'snapshots' "
            "(entity_id, sequence_nr, state_data, timestamp)"
            + ("; export writes only to a new file or a casty journal file" if create else "")
        )
    return connection


def _create_with_casty(path: Path) -> None:
    """Create an empty journal with casty's own ``SqliteJournal``: the format is casty's."""
    from casty import SqliteJournal

    SqliteJournal(path).close()
    log.debug("created casty journal file %s", path)


def _connect_existing(path: Path) -> sqlite3.Connection:
    """Open an existing file without ever creating one; read-only when writing is denied."""
    uri = path.resolve().as_uri()
    try:
        connection = sqlite3.connect(f"{uri}?mode=rw", uri=True, check_same_thread=False)
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError:
        connection = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False)
    return connection


def _tables(path: Path) -> dict[str, frozenset[str]]:
    """The tables (with their columns) of a SQLite file, opened and closed again."""
    connection = _connect_existing(path)
    try:
        return _table_columns(connection)
    finally:
        connection.close()


def _table_columns(connection: sqlite3.Connection) -> dict[str, frozenset[str]]:
    """Table name to column names, for every non-internal table of a connection."""
    names = [
        name
        for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    return {
        name: frozenset(row[1] for row in connection.execute(f'PRAGMA table_info("{name}")'))
        for name in names
    }


def _checked_row(entity_id: object, sequence_nr: object, timestamp: object, payload: object) -> Row:
    """A row from the file, refusing values casty-sa's tables cannot hold."""
    if not isinstance(entity_id, str) or not isinstance(sequence_nr, int):
        raise InvalidEventError(
            f"row ({entity_id!r}, {sequence_nr!r}) has an entity id that is not text or a "
            "sequence number that is not an integer; casty never writes such rows"
        )
    if not isinstance(payload, bytes):
        raise InvalidEventError(
            f"the payload of entity {entity_id!r} at sequence number {sequence_nr} is "
            f"{type(payload).__name__}, not bytes: the source was written by a serializer "
            "that does not return bytes, which casty-sa's binary columns cannot hold"
        )
    if not isinstance(timestamp, int | float):
        raise InvalidEventError(
            f"the timestamp of entity {entity_id!r} at sequence number {sequence_nr} is "
            f"{timestamp!r}, not a number"
        )
    return Row(entity_id, sequence_nr, float(timestamp), payload)
