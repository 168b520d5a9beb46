"""Copy journals between casty's own ``SqliteJournal`` file and a casty-sa database.

``casty-sa import`` and ``casty-sa export`` run on these functions. A copy
reads the source in key order (entity id, then sequence number), writes it to
the target in batches (one transaction per batch, Core inserts), and then
verifies by content: every source event and snapshot is looked up in the
target by its key, and its payload bytes and timestamp (bit for bit) must be
equal.

A copy never mixes two histories. An entity both sides hold must be proven,
before anything is written, to be one history; the proof is by content only
(payloads are never decoded), so the copy is refused, leaving the target
untouched, unless all of these hold for the entity:

1. every key both sides hold has the same content: an event's payload bytes
   and timestamp, a snapshot's at the same position (another history under
   the same keys: the application ran on the new tables already, or the files
   of two ``local`` nodes were imported one after the other);
2. every event the target holds at or below the source's highest position
   (its last event or its snapshot, whichever is higher) is one of the
   source's events: one the source lacks there cannot be compared (a source
   that starts from a snapshot cannot vouch for the events before it). The
   target's events above that position are its own later history;
3. a target snapshot is the source's own (same position, same content), or
   the target holds every event up to it (from its first, at 1 or below),
   which rule 2 ties to the source: otherwise it may summarize another
   history, and recovery would apply the source's events on top of it;
4. at least one row was compared and found equal: two sides with nothing in
   common are not proven one history.

A source snapshot needs no such proof: it summarizes the source's own events,
and rule 2 makes the target's events below it the source's. So a rerun of the
same copy (also after a crash half-way, when the target holds a prefix of the
source's events), a target that ran on (more events, a newer snapshot), and a
source that ran on since an earlier copy are all accepted.

casty's file format stores timestamps in a ``REAL`` column, which cannot hold
the sign of zero: when a casty file is one side, timestamps are compared as
the file can hold them (``-0.0`` equals ``0.0``, every other bit is compared),
and the report counts those timestamps (``zero_signs_lost``).

A copy is idempotent and resumable: an event whose key the target already
holds (with the same content) is left alone, a snapshot replaces the target's only
when its sequence number is higher, and an entity whose events the target
holds as an unbroken run is skipped up to that run's end without being sent.
A rerun after a crash or Ctrl-C therefore copies only what is missing.

Payloads are copied as the bytes the serializer produced; nothing is decoded.
Both journals default to pickle; a source written with a custom serializer
needs an ``SAJournal`` configured with the same ``deserialize``.

Examples
--------
>>> import asyncio, pathlib, tempfile
>>> from casty import PersistedEvent, SqliteJournal
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> old = SqliteJournal(folder / "casty.db")
>>> asyncio.run(old.persist("acct-1", [PersistedEvent(1, "opened", 1.5)]))
>>> old.close()
>>> report = asyncio.run(import_casty_file(folder / "casty.db", f"sqlite:///{folder}/sa.db"))
>>> (report.events_copied, report.verified)
(1, True)
>>> asyncio.run(import_casty_file(folder / "casty.db", f"sqlite:///{folder}/sa.db")).events_copied
0
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from sqlalchemy import ColumnElement, Select, Table, and_, func, or_, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from casty_sa.batching import DEFAULT_MAX_BATCH_BYTES, ROW_OVERHEAD, row_bytes
from casty_sa.engine import bind_schema, read_only
from casty_sa.errors import DatabaseUnavailable, InvalidEventError, JournalError
from casty_sa.migrate import CASTY_EVENT_COLUMNS, CASTY_SNAPSHOT_COLUMNS, checked_engine
from casty_sa.models import MAX_ENTITY_ID_LENGTH, journal_tables
from casty_sa.urls import UrlLike, is_memory_sqlite, safe_url, to_async_url

__all__ = [
    "CastyFile",
    "EntityStats",
    "JournalDatabase",
    "JournalFileError",
    "JournalStats",
    "Mismatch",
    "Progress",
    "Row",
    "TransferReport",
    "copy_journal",
    "export_casty_file",
    "import_casty_file",
    "missing_sqlite_file",
    "require_existing_database",
]

log = logging.getLogger("casty_sa.transfer")

#: Rows per batch (and per target transaction) unless told otherwise.
DEFAULT_BATCH_SIZE = 1000


_events, _snapshots = journal_tables()


class JournalFileError(JournalError):
    """A file that is missing, not SQLite, or not in casty's ``SqliteJournal`` format."""


# -- values ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One event or snapshot row, with its payload as stored (serializer bytes).

    Parameters
    ----------
    entity_id : str
        The entity the row belongs to.
    sequence_nr : int
        The event's sequence number, or the one a snapshot covers.
    timestamp : float
        casty's ``time.time()`` of the event or snapshot.
    payload : bytes
        The serializer's bytes, never decoded by a copy.
    """

    entity_id: str
    sequence_nr: int
    timestamp: float
    payload: bytes


@dataclass(frozen=True, slots=True)
class EntityStats:
    """How many events one entity has, and its lowest and highest sequence numbers.

    Parameters
    ----------
    events : int
        Number of stored events.
    first, last : int
        Lowest and highest stored sequence number.

    Examples
    --------
    >>> EntityStats(events=3, first=1, last=3).contiguous
    True
    >>> EntityStats(events=2, first=1, last=3).contiguous
    False
    """

    events: int
    first: int
    last: int

    @property
    def contiguous(self) -> bool:
        """True when every sequence number from ``first`` to ``last`` is stored."""
        return self.events == self.last - self.first + 1


@dataclass(frozen=True, slots=True)
class JournalStats:
    """Per-entity event statistics and snapshot positions of one side of a copy.

    Parameters
    ----------
    events : dict[str, EntityStats]
        Entity id to its event statistics (entities with events only).
    snapshots : dict[str, int]
        Entity id to the sequence number its snapshot covers.
    """

    events: dict[str, EntityStats]
    snapshots: dict[str, int]

    @property
    def event_count(self) -> int:
        """Total number of events."""
        return sum(stats.events for stats in self.events.values())

    @property
    def entity_count(self) -> int:
        """Number of distinct entities having events or a snapshot."""
        return len(self.events.keys() | self.snapshots.keys())


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a copy is, handed to the ``on_progress`` callback after every batch.

    Parameters
    ----------
    events_done, events_total : int
        Source events handled so far (copied or already present), and in all.
    snapshots_done, snapshots_total : int
        The same for snapshots.
    """

    events_done: int
    events_total: int
    snapshots_done: int
    snapshots_total: int

    @property
    def fraction(self) -> float:
        """Share of all rows handled, from 0.0 to 1.0."""
        total = self.events_total + self.snapshots_total
        return 1.0 if total == 0 else (self.events_done + self.snapshots_done) / total


@dataclass(frozen=True, slots=True)
class Mismatch:
    """An entity whose target does not hold what its source holds.

    Parameters
    ----------
    entity_id : str
        The entity.
    what : str
        ``"events"`` or ``"snapshot"`` (content differs under a key), or
        ``"history"`` (the two sides cannot be proven one history: see the
        module's rules 2 to 4).
    expected : str
        What the source holds (e.g. ``"event 3 (41 bytes, timestamp 1.5)"``).
    found : str
        What the target holds under the same key.
    sequence_nr : int | None
        The first sequence number at which the two sides differ (for
        ``"events"``), or the source snapshot's (for ``"snapshot"``).

    Examples
    --------
    >>> print(Mismatch("acct-1", "events", "event 2 (5 bytes)", "none", 2))
    'acct-1': events: first differs at sequence number 2: source has event 2 (5 bytes), target none
    """

    entity_id: str
    what: str
    expected: str
    found: str
    sequence_nr: int | None = None

    def __str__(self) -> str:
        at = (
            ""
            if self.sequence_nr is None
            else f"first differs at sequence number {self.sequence_nr}: "
        )
        return (
            f"{self.entity_id!r}: {self.what}: {at}source has {self.expected}, target {self.found}"
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return asdict(self)


@dataclass(frozen=True)
class TransferReport:
    """The outcome of a copy, with the verification by content at its end.

    Parameters
    ----------
    source, target : str
        Where the copy read and wrote (passwords masked).
    entities, events, snapshots : int
        What the source holds at the end of the copy.
    events_copied : int
        Events written to the target by this run.
    events_present : int
        Source events the target already held (an earlier run, or skipped).
    snapshots_copied : int
        Snapshots written (new, or replacing an older one).
    snapshots_present : int
        Source snapshots the target held at the same or a higher sequence number.
    mismatches : tuple[Mismatch, ...]
        Entities failing the verification (empty when verified); at most
        :data:`MAX_REPORTED_MISMATCHES` are kept, ``mismatch_count`` has them all.
    mismatch_count : int
        Number of entities failing the verification.
    target_ahead : int
        Entities for which the target holds more events than the source (the
        target was in use already); not an error.
    source_changed : bool
        The source was written to during the copy: rerun to pick up the rest.
    seconds : float
        Wall-clock duration.
    forks : tuple[Mismatch, ...]
        Entities for which the target already held other content under the
        source's keys (another history): the copy was refused and nothing
        written. At most :data:`MAX_REPORTED_MISMATCHES`; ``fork_count`` has them all.
    fork_count : int
        Number of such entities.
    events_compared, snapshots_compared : int
        Source events and snapshots whose content the final verification
        compared with the target's (every one of the source, unless refused).
    snapshots_newer : int
        Source snapshots for which the target holds a newer one (a higher
        sequence number), kept because a snapshot never moves backwards; its
        content has nothing to be compared with, and it is not a fork.
    zero_signs_lost : int
        Timestamps compared equal although one side holds ``-0.0`` and the
        other, a casty file, ``0.0``: casty's file format cannot hold the sign
        of zero (an export writes ``-0.0`` as ``0.0``).
    """

    source: str
    target: str
    entities: int
    events: int
    snapshots: int
    events_copied: int
    events_present: int
    snapshots_copied: int
    snapshots_present: int
    mismatches: tuple[Mismatch, ...] = ()
    mismatch_count: int = 0
    target_ahead: int = 0
    source_changed: bool = False
    seconds: float = field(default=0.0, compare=False)
    forks: tuple[Mismatch, ...] = ()
    fork_count: int = 0
    events_compared: int = 0
    snapshots_compared: int = 0
    snapshots_newer: int = 0
    zero_signs_lost: int = 0

    @property
    def refused(self) -> bool:
        """True when the target held another history and nothing was copied."""
        return self.fork_count > 0

    @property
    def verified(self) -> bool:
        """True when content was compared and the target holds every event and snapshot.

        Every source event is in the target with the same payload bytes and
        timestamp; every source snapshot is there the same, or the target's
        is newer (``snapshots_newer``).
        """
        return (
            not self.refused
            and self.mismatch_count == 0
            and self.events_compared == self.events
            and self.snapshots_compared + self.snapshots_newer == self.snapshots
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the report (for ``--json``): its fields and verdicts."""
        fields = asdict(self)  # nested Mismatch values become dicts too
        return {
            **fields,
            "forks": list(fields["forks"]),
            "mismatches": list(fields["mismatches"]),
            "refused": self.refused,
            "verified": self.verified,
            "seconds": round(self.seconds, 3),
        }


#: Mismatching entities kept in a :class:`TransferReport` (the count covers all).
MAX_REPORTED_MISMATCHES = 20

ProgressCallback = Callable[[Progress], None]


class Endpoint(Protocol):
    """One side of a copy: a casty file or a casty-sa database."""

    @property
    def name(self) -> str:
        """Where the side is, for messages (passwords masked)."""
        ...

    @property
    def keeps_zero_sign(self) -> bool:
        """Whether a ``-0.0`` timestamp written to the side is read back as ``-0.0``."""
        ...

    async def stats(self) -> JournalStats:
        """Per-entity event statistics and snapshot positions."""
        ...

    async def read_events(
        self, after: tuple[str, int] | None, limit: int, max_bytes: int
    ) -> list[Row]:
        """Up to ``limit`` events in key order, starting after the key ``after``.

        The rows stop before ``max_bytes`` (:func:`casty_sa.batching.row_bytes`)
        would be passed, though never before the first row.
        """
        ...

    async def read_snapshots(self, after: str | None, limit: int, max_bytes: int) -> list[Row]:
        """Up to ``limit`` snapshots (and ``max_bytes``) in entity order, after entity ``after``."""
        ...

    async def fetch_events(self, keys: Sequence[tuple[str, int]]) -> list[Row]:
        """The events stored under ``keys`` (``(entity id, sequence number)``), any order."""
        ...

    async def fetch_snapshots(self, entities: Sequence[str]) -> list[Row]:
        """The snapshots of ``entities``, any order."""
        ...

    async def count_events(self, bounds: Sequence[tuple[str, int]]) -> list[int]:
        """Per ``(entity id, bound)``, how many events of the entity are at or below ``bound``."""
        ...

    async def write_events(self, rows: Sequence[Row]) -> int:
        """Insert the rows the side lacks, in one transaction; return how many were new."""
        ...

    async def write_snapshots(self, rows: Sequence[Row]) -> int:
        """Insert or advance snapshots in one transaction; return how many changed."""
        ...


# -- casty's SqliteJournal file ----------------------------------------------------------------


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
        return await asyncio.to_thread(self._fetch_events, keys)

    def _fetch_events(self, keys: Sequence[tuple[str, int]]) -> list[Row]:
        found: list[Row] = []
        for chunk in _chunks(keys, _LOOKUP_CHUNK):
            values = ", ".join(["(?, ?)"] * len(chunk))
            found += self._rows(
                "SELECT entity_id, sequence_nr, timestamp, event_data FROM events "
                f"WHERE (entity_id, sequence_nr) IN (VALUES {values})",
                tuple(part for key in chunk for part in key),
            )
        return found

    async def fetch_snapshots(self, entities: Sequence[str]) -> list[Row]:
        """The snapshots of ``entities``."""
        return await asyncio.to_thread(self._fetch_snapshots, entities)

    def _fetch_snapshots(self, entities: Sequence[str]) -> list[Row]:
        found: list[Row] = []
        for chunk in _chunks(entities, _LOOKUP_CHUNK):
            marks = ", ".join(["?"] * len(chunk))
            found += self._rows(
                "SELECT entity_id, sequence_nr, timestamp, state_data FROM snapshots "
                f"WHERE entity_id IN ({marks})",
                tuple(chunk),
            )
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
        return await asyncio.to_thread(
            self._write,
            "INSERT INTO snapshots (entity_id, sequence_nr, state_data, timestamp) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (entity_id) DO UPDATE SET "
            "sequence_nr = excluded.sequence_nr, state_data = excluded.state_data, "
            "timestamp = excluded.timestamp WHERE excluded.sequence_nr > snapshots.sequence_nr",
            rows,
        )

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


# -- a casty-sa database -----------------------------------------------------------------------


class JournalDatabase:
    """casty-sa's tables in a database, read and written with Core statements.

    Parameters
    ----------
    engine : AsyncEngine
        An engine whose database is at casty-sa's head revision; use
        :meth:`open` to get one checked (and, for SQLite, migrated).
    schema : str | None
        PostgreSQL schema holding the tables.
    """

    def __init__(self, engine: AsyncEngine, *, schema: str | None = None) -> None:
        self._engine = bind_schema(engine, schema)
        # reads (stats, the source side of a copy, the verification) take no write lock on
        # SQLite: an export never waits for, nor holds up, the application's writer
        self._reader = read_only(self._engine)
        self._name = safe_url(engine.url)
        insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        events = insert(_events)
        self._insert_events = events.on_conflict_do_nothing(
            index_elements=[_events.c.entity_id, _events.c.sequence_nr]
        ).returning(_events.c.sequence_nr)
        snapshots = insert(_snapshots)
        self._upsert_snapshots = snapshots.on_conflict_do_update(
            index_elements=[_snapshots.c.entity_id],
            set_={
                "sequence_nr": snapshots.excluded.sequence_nr,
                "timestamp": snapshots.excluded.timestamp,
                "payload": snapshots.excluded.payload,
            },
            where=snapshots.excluded.sequence_nr > _snapshots.c.sequence_nr,
        ).returning(_snapshots.c.entity_id)

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        target: UrlLike | AsyncEngine,
        *,
        migrate: bool | None = None,
        schema: str | None = None,
        must_exist: bool = False,
        **engine_options: Any,
    ) -> AsyncIterator[JournalDatabase]:
        """Open a database, checking its schema as ``SAJournal`` does (async context manager).

        Parameters
        ----------
        target : str | URL | AsyncEngine
            The database (an engine passed in is left open).
        migrate : bool | None
            As for :class:`~casty_sa.SAJournal`: ``None`` migrates a SQLite
            database and requires a server database to be at head.
        schema : str | None
            PostgreSQL schema holding the tables.
        must_exist : bool
            Refuse a SQLite file that does not exist instead of creating it.
        **engine_options
            Passed on to :class:`~casty_sa.SAJournal` (``connect_timeout``, …).

        Raises
        ------
        SchemaError
            The database is not at head and may not be migrated.
        DatabaseUnavailable
            The database cannot be reached, or (``must_exist``) is a missing file.
        """
        if must_exist:
            require_existing_database(target)
        async with checked_engine(
            target, migrate=migrate, schema=schema, **engine_options
        ) as engine:
            yield cls(engine, schema=schema)

    @property
    def name(self) -> str:
        """The database URL, password masked."""
        return self._name

    @property
    def keeps_zero_sign(self) -> bool:
        """True: casty-sa's timestamp columns keep ``-0.0`` on every backend."""
        return True

    async def stats(self) -> JournalStats:
        """Per-entity event statistics and snapshot positions of the database."""
        c = _events.c
        events_query = select(
            c.entity_id, func.count(), func.min(c.sequence_nr), func.max(c.sequence_nr)
        ).group_by(c.entity_id)
        snapshot_query = select(_snapshots.c.entity_id, _snapshots.c.sequence_nr)
        async with self._reader.connect() as connection:
            events = {
                entity: EntityStats(count, first, last)
                for entity, count, first, last in await connection.execute(events_query)
            }
            snapshots = {entity: seq for entity, seq in await connection.execute(snapshot_query)}
        return JournalStats(events, snapshots)

    async def read_events(
        self, after: tuple[str, int] | None, limit: int, max_bytes: int
    ) -> list[Row]:
        """Up to ``limit`` events (and ``max_bytes``) in key order, after the key ``after``."""
        c = _events.c
        keys = (c.entity_id, c.sequence_nr)
        where = None if after is None else tuple_(*keys) > tuple_(*after)
        query = _within_bytes(_events, keys, where, limit, max_bytes)
        async with self._reader.connect() as connection:
            return [Row(*row) for row in await connection.execute(query)]

    async def read_snapshots(self, after: str | None, limit: int, max_bytes: int) -> list[Row]:
        """Up to ``limit`` snapshots (and ``max_bytes``) in entity order, after entity ``after``."""
        c = _snapshots.c
        where = None if after is None else c.entity_id > after
        query = _within_bytes(_snapshots, (c.entity_id,), where, limit, max_bytes)
        async with self._reader.connect() as connection:
            return [Row(*row) for row in await connection.execute(query)]

    async def fetch_events(self, keys: Sequence[tuple[str, int]]) -> list[Row]:
        """The events stored under ``keys``, looked up by primary key."""
        c = _events.c
        found: list[Row] = []
        async with self._reader.connect() as connection:
            for chunk in _chunks(keys, _LOOKUP_CHUNK):
                query = select(c.entity_id, c.sequence_nr, c.timestamp, c.payload).where(
                    tuple_(c.entity_id, c.sequence_nr).in_(chunk)
                )
                found += [Row(*row) for row in await connection.execute(query)]
        return found

    async def fetch_snapshots(self, entities: Sequence[str]) -> list[Row]:
        """The snapshots of ``entities``."""
        c = _snapshots.c
        found: list[Row] = []
        async with self._reader.connect() as connection:
            for chunk in _chunks(entities, _LOOKUP_CHUNK):
                query = select(c.entity_id, c.sequence_nr, c.timestamp, c.payload).where(
                    c.entity_id.in_(chunk)
                )
                found += [Row(*row) for row in await connection.execute(query)]
        return found

    async def count_events(self, bounds: Sequence[tuple[str, int]]) -> list[int]:
        """Per ``(entity id, bound)``, how many events of the entity are at or below ``bound``."""
        c = _events.c
        counts: list[int] = []
        async with self._reader.connect() as connection:
            for entity, bound in bounds:
                query = select(func.count()).where(c.entity_id == entity, c.sequence_nr <= bound)
                counts.append(int((await connection.execute(query)).scalar_one()))
        return counts

    async def write_events(self, rows: Sequence[Row]) -> int:
        """Insert the events the database lacks, in one transaction; return how many."""
        async with self._engine.begin() as connection:
            result = await connection.execute(self._insert_events, [_params(r) for r in rows])
            return len(result.all())

    async def write_snapshots(self, rows: Sequence[Row]) -> int:
        """Insert snapshots, or advance those with a lower sequence number; return how many."""
        async with self._engine.begin() as connection:
            result = await connection.execute(self._upsert_snapshots, [_params(r) for r in rows])
            return len(result.all())


def _within_bytes(
    table: Table,
    keys: tuple[ColumnElement[Any], ...],
    where: ColumnElement[bool] | None,
    limit: int,
    max_bytes: int,
) -> Select[Any]:
    """The first ``limit`` rows of ``table`` in ``keys`` order, stopping at ``max_bytes``.

    The sizes (:func:`casty_sa.batching.row_bytes`) are summed in key order
    before any payload is read, so rows past the cap are never sent; the
    first row always comes, whatever its size.
    """
    c = table.c
    size = func.length(c.entity_id) + func.length(c.payload) + ROW_OVERHEAD
    first = select(*keys, size.label("size"))
    if where is not None:
        first = first.where(where)
    page = first.order_by(*keys).limit(limit).subquery()
    page_keys = [page.c[key.name] for key in keys]
    running = select(
        *page_keys,
        page.c.size,
        func.sum(page.c.size).over(order_by=page_keys).label("total"),
    ).subquery()
    return (
        select(c.entity_id, c.sequence_nr, c.timestamp, c.payload)
        .join(running, and_(*(c[key.name] == running.c[key.name] for key in keys)))
        .where(or_(running.c.total <= max_bytes, running.c.total == running.c.size))
        .order_by(*keys)
    )


def missing_sqlite_file(target: UrlLike | AsyncEngine) -> Path | None:
    """The file of a SQLite URL when that file does not exist, else ``None``.

    Connecting to a missing SQLite file creates an empty one; commands that
    only read check this first, so a typo in a path does not leave a file behind.

    Examples
    --------
    >>> missing_sqlite_file("sqlite:///no/such/dir/journal.db")
    PosixPath('no/such/dir/journal.db')
    >>> missing_sqlite_file("postgresql://db/bank") is None
    True
    """
    if isinstance(target, AsyncEngine):
        return None
    url = to_async_url(target)
    if url.get_backend_name() != "sqlite" or is_memory_sqlite(url) or not url.database:
        return None
    database = url.database
    if database.startswith("file:"):
        return None  # a URI filename: SQLite's own options decide
    path = Path(database)
    return None if path.exists() else path


def require_existing_database(target: UrlLike | AsyncEngine) -> None:
    """Raise ``DatabaseUnavailable`` for a SQLite URL naming a file that does not exist.

    Raises
    ------
    DatabaseUnavailable
        The SQLite file is missing.
    """
    missing = missing_sqlite_file(target)
    if missing is not None:
        raise DatabaseUnavailable(
            f"{safe_url(to_async_url(cast(UrlLike, target)))}: no such SQLite file {missing}"
        )


def _params(row: Row) -> dict[str, Any]:
    """A row as the bind parameters of casty-sa's insert statements."""
    return {
        "entity_id": row.entity_id,
        "sequence_nr": row.sequence_nr,
        "timestamp": row.timestamp,
        "payload": row.payload,
    }


# -- the copy ----------------------------------------------------------------------------------


async def copy_journal(
    source: Endpoint,
    target: Endpoint,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    on_progress: ProgressCallback | None = None,
) -> TransferReport:
    """Copy every event and snapshot of ``source`` that ``target`` lacks, then verify.

    Events go first, in key order, one target transaction per batch;
    snapshots follow, so a snapshot never gets ahead of the events it
    summarizes. An exception (Ctrl-C, a lost connection) leaves whole batches
    behind; calling again copies the rest.

    Parameters
    ----------
    source, target : Endpoint
        A :class:`CastyFile` or a :class:`JournalDatabase`, either way round.
    batch_size : int
        Rows read and written per batch.
    batch_bytes : int
        Most bytes of rows per batch (as the journal's group commit counts
        them); a single larger row goes alone. Large events thus never add up
        to a statement the database refuses (PostgreSQL's 1 GiB per message),
        nor to a batch that does not fit in memory.
    on_progress : Callable[[Progress], None] | None
        Called after every batch.

    Returns
    -------
    TransferReport
        Counts of the run and the verification: ``report.verified`` is true
        when every source event is in the target with the same payload bytes
        and timestamp, and every source snapshot is there the same or newer.
        ``report.refused`` is true when the target already held another
        history, or rows of the source's entities the source cannot vouch
        for by content (see the module's rules): then nothing was written.

    Raises
    ------
    InvalidEventError
        The source holds an entity id casty-sa cannot store; nothing is copied.
    """
    if batch_size < 1 or batch_bytes < 1:
        raise ValueError(
            f"batch_size and batch_bytes must be at least 1, not {batch_size}, {batch_bytes}"
        )
    batch = _Batch(batch_size, batch_bytes)
    started = time.perf_counter()
    before = await source.stats()
    _check_entity_ids(before)
    already = await target.stats()
    log.debug(
        "copy %s -> %s: source has %d events of %d entities and %d snapshots; target has %d "
        "events of %d entities",
        source.name,
        target.name,
        before.event_count,
        len(before.events),
        len(before.snapshots),
        already.event_count,
        len(already.events),
    )
    shared = (before.events.keys() | before.snapshots.keys()) & (
        already.events.keys() | already.snapshots.keys()
    )
    if shared:
        # Before writing anything: what the target holds of the source's entities must be the
        # source's own history, or the copy would leave a history mixing both.
        forks = await _compare(source, target, batch, only=shared, missing_ok=True)
        await _check_one_history(target, before, already, shared, forks)
        if forks.count:
            log.debug(
                "copy %s -> %s refused: %d entities differ", source.name, target.name, forks.count
            )
            return TransferReport(
                source=source.name,
                target=target.name,
                entities=before.entity_count,
                events=before.event_count,
                snapshots=len(before.snapshots),
                events_copied=0,
                events_present=0,
                snapshots_copied=0,
                snapshots_present=0,
                forks=tuple(forks.differences),
                fork_count=forks.count,
                seconds=time.perf_counter() - started,
            )
    progress = Progress(0, before.event_count, 0, len(before.snapshots))
    report = _Counts()
    await _copy_events(source, target, before, already, batch, progress, report, on_progress)
    progress = Progress(progress.events_total, progress.events_total, 0, len(before.snapshots))
    await _copy_snapshots(source, target, already, batch, progress, report, on_progress)
    after = await source.stats()
    check = await _compare(source, target, batch, only=None, missing_ok=False)
    target_ahead = _target_ahead(after, await target.stats())
    seconds = time.perf_counter() - started
    log.debug("copy %s -> %s finished in %.3fs", source.name, target.name, seconds)
    return TransferReport(
        source=source.name,
        target=target.name,
        entities=after.entity_count,
        events=check.events_seen,
        snapshots=check.snapshots_seen,
        events_copied=report.events_copied,
        events_present=report.events_seen - report.events_copied,
        snapshots_copied=report.snapshots_copied,
        snapshots_present=report.snapshots_seen - report.snapshots_copied,
        mismatches=tuple(check.differences),
        mismatch_count=check.count,
        target_ahead=target_ahead,
        source_changed=after != before,
        seconds=seconds,
        events_compared=check.events_compared,
        snapshots_compared=check.snapshots_compared,
        snapshots_newer=check.snapshots_newer,
        zero_signs_lost=check.zero_signs_lost,
    )


@dataclass(frozen=True, slots=True)
class _Batch:
    """How much one batch of a copy carries at most: rows, and bytes of rows."""

    rows: int
    bytes: int


@dataclass(slots=True)
class _Counts:
    """Running totals of a copy."""

    events_seen: int = 0
    events_copied: int = 0
    snapshots_seen: int = 0
    snapshots_copied: int = 0


async def _copy_events(
    source: Endpoint,
    target: Endpoint,
    src: JournalStats,
    dst: JournalStats,
    batch: _Batch,
    progress: Progress,
    counts: _Counts,
    on_progress: ProgressCallback | None,
) -> None:
    """Copy events batch by batch, skipping what the target provably holds."""
    held = _held_up_to(src, dst)
    after: tuple[str, int] | None = None
    while True:
        read_started = time.perf_counter()
        rows = await source.read_events(after, batch.rows, batch.bytes)
        if not rows:
            return
        read_seconds = time.perf_counter() - read_started
        missing = [row for row in rows if row.sequence_nr > held.get(row.entity_id, 0)]
        write_started = time.perf_counter()
        copied = await target.write_events(missing) if missing else 0
        log.debug(
            "events: read %d in %.1f ms, sent %d, %d new, in %.1f ms",
            len(rows),
            read_seconds * 1000,
            len(missing),
            copied,
            (time.perf_counter() - write_started) * 1000,
        )
        counts.events_seen += len(rows)
        counts.events_copied += copied
        after = (rows[-1].entity_id, rows[-1].sequence_nr)
        if on_progress is not None:
            on_progress(
                Progress(
                    min(counts.events_seen, progress.events_total),
                    progress.events_total,
                    0,
                    progress.snapshots_total,
                )
            )


async def _copy_snapshots(
    source: Endpoint,
    target: Endpoint,
    dst: JournalStats,
    batch: _Batch,
    progress: Progress,
    counts: _Counts,
    on_progress: ProgressCallback | None,
) -> None:
    """Copy snapshots the target lacks or holds at a lower sequence number."""
    after: str | None = None
    while True:
        rows = await source.read_snapshots(after, batch.rows, batch.bytes)
        if not rows:
            return
        newer = [row for row in rows if row.sequence_nr > dst.snapshots.get(row.entity_id, -1)]
        copied = await target.write_snapshots(newer) if newer else 0
        log.debug("snapshots: read %d, sent %d, %d written", len(rows), len(newer), copied)
        counts.snapshots_seen += len(rows)
        counts.snapshots_copied += copied
        after = rows[-1].entity_id
        if on_progress is not None:
            on_progress(
                Progress(
                    progress.events_done,
                    progress.events_total,
                    min(counts.snapshots_seen, progress.snapshots_total),
                    progress.snapshots_total,
                )
            )


def _held_up_to(src: JournalStats, dst: JournalStats) -> dict[str, int]:
    """Per entity, the sequence number up to which the target provably holds every event.

    That is the case when the target's events of the entity form an unbroken run
    starting at or below the source's first: every source event up to the run's
    end is there, and need not be sent again.
    """
    held: dict[str, int] = {}
    for entity, theirs in dst.events.items():
        ours = src.events.get(entity)
        if ours is not None and theirs.contiguous and theirs.first <= ours.first:
            held[entity] = theirs.last
    return held


def _target_ahead(src: JournalStats, dst: JournalStats) -> int:
    """Entities for which the target holds more events than the source."""
    return sum(
        1
        for entity, ours in src.events.items()
        if (theirs := dst.events.get(entity)) is not None and theirs.events > ours.events
    )


#: Keys looked up per statement: under SQLite's oldest limit of 999 bound parameters.
_LOOKUP_CHUNK = 400


def _chunks[T](items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """``items`` in consecutive slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _float_bits(value: float) -> bytes:
    """The IEEE 754 bits of a float: ``-0.0`` differs from ``0.0``, a NaN equals itself."""
    return struct.pack("<d", value)


_NEGATIVE_ZERO = _float_bits(-0.0)


def _zero_sign_only(ours: float, theirs: float) -> bool:
    """True when the two differ only in the sign of zero (``-0.0`` against ``0.0``)."""
    return ours == 0.0 and theirs == 0.0 and _float_bits(ours) != _float_bits(theirs)


def _describe_row(row: Row, kind: str) -> str:
    """A row for a mismatch message: its size and timestamp, never its payload."""
    return f"{kind} {row.sequence_nr} ({len(row.payload):,} bytes, timestamp {row.timestamp!r})"


def _difference(ours: Row, theirs: Row | None, kind: str, *, zero_sign: bool) -> str | None:
    """What the target's row under a key has that the source's has not; ``None`` when equal.

    Timestamps are compared bit for bit; without ``zero_sign`` (a side cannot
    hold the sign of zero) ``-0.0`` and ``0.0`` are the same.
    """
    if theirs is None:
        return "none"
    payload_same = ours.payload == theirs.payload
    time_same = _float_bits(ours.timestamp) == _float_bits(theirs.timestamp) or (
        not zero_sign and _zero_sign_only(ours.timestamp, theirs.timestamp)
    )
    if payload_same and time_same:
        return None
    what = " and ".join(
        name for name, same in (("payload", payload_same), ("timestamp", time_same)) if not same
    )
    return f"{_describe_row(theirs, kind)}: {what} differ{'s' if ' and ' not in what else ''}"


@dataclass(slots=True)
class _Comparison:
    """Differences found by :func:`_compare`, one per entity and kind, in key order."""

    missing_ok: bool
    differences: list[Mismatch] = field(default_factory=list)
    entities: set[str] = field(default_factory=set)
    events_seen: int = 0
    snapshots_seen: int = 0
    events_compared: int = 0
    snapshots_compared: int = 0
    snapshots_newer: int = 0
    zero_signs_lost: int = 0
    #: per entity, the target's events found equal to the source's
    matched: Counter[str] = field(default_factory=Counter)
    _last: tuple[str, str] | None = None

    @property
    def count(self) -> int:
        """Number of entities with a difference."""
        return len(self.entities)

    def add(self, mismatch: Mismatch) -> None:
        """Record the first difference of an entity (later ones of it are skipped)."""
        key = (mismatch.entity_id, mismatch.what)
        if key == self._last:  # rows come in key order: an entity's rows are adjacent
            return
        self._last = key
        self.entities.add(mismatch.entity_id)
        if len(self.differences) < MAX_REPORTED_MISMATCHES:
            self.differences.append(mismatch)

    def equal(self, ours: Row, theirs: Row) -> None:
        """Count a target row found equal to the source's."""
        self.zero_signs_lost += _zero_sign_only(ours.timestamp, theirs.timestamp)


async def _compare(
    source: Endpoint,
    target: Endpoint,
    batch: _Batch,
    *,
    only: set[str] | None,
    missing_ok: bool,
) -> _Comparison:
    """Compare, by content, every source row (of the entities ``only``) with the target's.

    The source is read in key order, a batch at a time; the target's rows under
    the same keys are looked up by primary key, so memory stays one batch
    whatever the sizes. A target row under a source key must have the same
    payload bytes and timestamp bits. A key the target lacks is a difference
    unless ``missing_ok`` (before a copy, which brings it). A target snapshot
    at a higher sequence number is newer, not different (a snapshot never moves
    backwards); one at a lower number is a difference unless ``missing_ok``.
    Timestamps are compared as both sides can hold them (see :func:`_difference`).
    """
    zero_sign = source.keeps_zero_sign and target.keeps_zero_sign
    result = _Comparison(missing_ok)
    after: tuple[str, int] | None = None
    while rows := await source.read_events(after, batch.rows, batch.bytes):
        after = (rows[-1].entity_id, rows[-1].sequence_nr)
        result.events_seen += len(rows)
        wanted = rows if only is None else [row for row in rows if row.entity_id in only]
        if not wanted:
            continue
        held = {
            (row.entity_id, row.sequence_nr): row
            for row in await target.fetch_events([(r.entity_id, r.sequence_nr) for r in wanted])
        }
        for row in wanted:
            theirs = held.get((row.entity_id, row.sequence_nr))
            if theirs is None and missing_ok:
                continue
            found = _difference(row, theirs, "event", zero_sign=zero_sign)
            if theirs is not None and found is None:
                result.events_compared += 1
                result.matched[row.entity_id] += 1
                result.equal(row, theirs)
            if found is not None:
                result.add(
                    Mismatch(
                        row.entity_id, "events", _describe_row(row, "event"), found, row.sequence_nr
                    )
                )
    entity_after: str | None = None
    while rows := await source.read_snapshots(entity_after, batch.rows, batch.bytes):
        entity_after = rows[-1].entity_id
        result.snapshots_seen += len(rows)
        wanted = rows if only is None else [row for row in rows if row.entity_id in only]
        if not wanted:
            continue
        held_snapshots = {
            row.entity_id: row
            for row in await target.fetch_snapshots([r.entity_id for r in wanted])
        }
        for row in wanted:
            theirs = held_snapshots.get(row.entity_id)
            if theirs is not None and theirs.sequence_nr > row.sequence_nr:
                result.snapshots_newer += 1
                continue
            if theirs is None or theirs.sequence_nr < row.sequence_nr:
                if missing_ok:
                    continue
                found = "none" if theirs is None else f"an older snapshot at {theirs.sequence_nr}"
            else:
                found = _difference(row, theirs, "snapshot at", zero_sign=zero_sign) or ""
            if found:
                result.add(
                    Mismatch(
                        row.entity_id,
                        "snapshot",
                        _describe_row(row, "snapshot at"),
                        found,
                        row.sequence_nr,
                    )
                )
            else:
                result.snapshots_compared += 1
                if theirs is not None:  # (always: equal content under the same position)
                    result.equal(row, theirs)
    return result


def _events_up_to(stats: EntityStats | None, bound: int) -> int | None:
    """How many of an entity's events are at or below ``bound``, when its statistics tell."""
    if stats is None or bound < stats.first:
        return 0
    if stats.last <= bound:
        return stats.events
    if stats.contiguous:
        return bound - stats.first + 1
    return None  # a gap: only a count can tell


def _span(stats: EntityStats) -> str:
    """An entity's events for a message: ``events 1..9``, or a count when there are gaps."""
    if stats.contiguous:
        return f"events {stats.first}..{stats.last}"
    return f"{stats.events} events from {stats.first} to {stats.last}"


def _holding(stats: EntityStats | None, snapshot: int | None) -> str:
    """What one side holds of an entity, for a message."""
    events = "no events" if stats is None else _span(stats)
    return events if snapshot is None else f"a snapshot at {snapshot} and {events}"


async def _check_one_history(
    target: Endpoint,
    src: JournalStats,
    dst: JournalStats,
    shared: set[str],
    compared: _Comparison,
) -> None:
    """Add to ``compared`` every shared entity not proven to be one history on both sides.

    ``compared`` is the comparison of the shared entities' source rows with the
    target's (rule 1 of the module docstring); this checks rules 2 to 4 with
    its per-entity counts of equal events and the two sides' statistics,
    counting the target's events only for entities whose statistics have gaps.
    """
    candidates = sorted(shared - compared.entities)
    bounds: dict[tuple[str, int], int | None] = {}
    for entity in candidates:
        theirs, snapshot = dst.events.get(entity), dst.snapshots.get(entity)
        highest = _highest(src, entity)
        bounds[entity, highest] = _events_up_to(theirs, highest)
        if snapshot is not None:
            bounds[entity, snapshot] = _events_up_to(theirs, snapshot)
    unknown = [key for key, count in bounds.items() if count is None]
    if unknown:
        bounds.update(zip(unknown, await target.count_events(unknown), strict=True))
    for entity in candidates:
        ours, theirs = src.events.get(entity), dst.events.get(entity)
        our_snapshot, their_snapshot = src.snapshots.get(entity), dst.snapshots.get(entity)
        highest = _highest(src, entity)
        same_snapshot = their_snapshot is not None and their_snapshot == our_snapshot
        unvouched = (bounds[entity, highest] or 0) - compared.matched[entity]
        if unvouched > 0 and theirs is not None:  # rule 2
            why = (
                f"{_span(theirs)}, {unvouched} of them at or below {highest} not in the source: "
                "they cannot be compared"
                + (" (a snapshot cannot be compared with events)" if our_snapshot else "")
            )
        elif (
            their_snapshot is not None
            and not same_snapshot
            and not (
                theirs is not None
                and theirs.first <= 1
                and bounds[entity, their_snapshot] == their_snapshot - theirs.first + 1
            )
        ):  # rule 3
            why = (
                f"a snapshot at {their_snapshot} without its events 1..{their_snapshot}: it "
                "cannot be compared with the source's rows and may summarize another history"
            )
        elif compared.matched[entity] == 0 and not same_snapshot:  # rule 4
            why = f"{_holding(theirs, their_snapshot)}: no row in common to compare"
        else:
            continue
        compared.add(Mismatch(entity, "history", _holding(ours, our_snapshot), why))


def _highest(stats: JournalStats, entity: str) -> int:
    """An entity's highest position on one side: its last event or its snapshot."""
    events = stats.events.get(entity)
    return max(events.last if events is not None else 0, stats.snapshots.get(entity, 0))


def _check_entity_ids(stats: JournalStats) -> None:
    """Refuse, before copying anything, entity ids casty-sa's tables cannot hold."""
    for entity in stats.events.keys() | stats.snapshots.keys():
        if len(entity) > MAX_ENTITY_ID_LENGTH or "\x00" in entity or not entity:
            raise InvalidEventError(
                f"the source holds entity id {entity[:60]!r} (length {len(entity)}), which "
                f"casty-sa cannot store: ids must be 1 to {MAX_ENTITY_ID_LENGTH} characters "
                "without NUL; nothing was copied"
            )


# -- the two directions ------------------------------------------------------------------------


async def import_casty_file(
    path: str | Path,
    target: UrlLike | AsyncEngine,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    migrate: bool | None = None,
    schema: str | None = None,
    on_progress: ProgressCallback | None = None,
    **engine_options: Any,
) -> TransferReport:
    """Copy a casty ``SqliteJournal`` file into a casty-sa database.

    Parameters
    ----------
    path : str | Path
        The casty journal file (opened without being created or changed).
    target : str | URL | AsyncEngine
        The database. A new SQLite database is migrated first; a server
        database must be at head unless ``migrate=True``.
    batch_size : int
        Events per batch and per target transaction.
    batch_bytes : int
        Most bytes of rows per batch (see :func:`copy_journal`).
    migrate : bool | None
        As for :class:`~casty_sa.SAJournal`.
    schema : str | None
        PostgreSQL schema of the target's tables.
    on_progress : Callable[[Progress], None] | None
        Called after every batch.
    **engine_options
        Passed on to :class:`~casty_sa.SAJournal` (``connect_timeout``, …).

    Returns
    -------
    TransferReport
        What was copied and whether the counts match.

    Raises
    ------
    JournalFileError
        ``path`` is missing or not a casty journal file.
    SchemaError, DatabaseUnavailable
        The target is not at head or cannot be reached.
    """
    async with (
        CastyFile.open(path) as source,
        JournalDatabase.open(target, migrate=migrate, schema=schema, **engine_options) as sink,
    ):
        return await copy_journal(
            source, sink, batch_size=batch_size, batch_bytes=batch_bytes, on_progress=on_progress
        )


async def export_casty_file(
    source: UrlLike | AsyncEngine,
    path: str | Path,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    schema: str | None = None,
    on_progress: ProgressCallback | None = None,
    **engine_options: Any,
) -> TransferReport:
    """Copy a casty-sa database into a casty ``SqliteJournal`` file.

    Parameters
    ----------
    source : str | URL | AsyncEngine
        The database; it must be at head (it is never migrated).
    path : str | Path
        The file: created (by casty's own ``SqliteJournal``) when missing;
        an existing casty journal file gets what it lacks.
    batch_size : int
        Events per batch.
    batch_bytes : int
        Most bytes of rows per batch (see :func:`copy_journal`).
    schema : str | None
        PostgreSQL schema of the source's tables.
    on_progress : Callable[[Progress], None] | None
        Called after every batch.
    **engine_options
        Passed on to :class:`~casty_sa.SAJournal`.

    Returns
    -------
    TransferReport
        What was copied and whether the counts match.

    Raises
    ------
    JournalFileError
        ``path`` exists and is not a casty journal file.
    SchemaError, DatabaseUnavailable
        The source is not at head or cannot be reached.
    """
    async with (
        JournalDatabase.open(
            source, migrate=False, schema=schema, must_exist=True, **engine_options
        ) as origin,
        CastyFile.open(path, create=True) as sink,
    ):
        return await copy_journal(
            origin, sink, batch_size=batch_size, batch_bytes=batch_bytes, on_progress=on_progress
        )
