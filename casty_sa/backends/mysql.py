"""MySQL and MariaDB through ``asyncmy`` (or ``aiomysql``): a write group in one packet.

The whole MySQL dialect (see :mod:`casty_sa.dialects`): the URLs it accepts
(``mysql://``, ``mariadb://``, each with ``+asyncmy`` or ``+aiomysql``), the engine
(:mod:`casty_sa.backends.mysql_engines`) and the backend.

The backend: a write group is one transaction sent as one packet of statements
(both drivers enable multi-statements): the events take their positions from the
one-row counter (``UPDATE … SET position = LAST_INSERT_ID(position + n)``, see
:class:`~casty_sa.models.EventCounterRecord`), are checked against the tombstones of
deleted sequence numbers (one statement), are inserted in one multi-row
``INSERT``, the snapshots upserted, and ``COMMIT`` ends it. The counter's row lock,
held until that commit, makes writers commit in position order: the read side's
no-gap guarantee (:mod:`casty_sa.backends.mysql_reads`). A group over the server's
``max_allowed_packet`` goes in several packets, ``COMMIT`` in the last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from casty import JournalKind
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.asyncio import AsyncEngine

from casty_sa.backends.base import BackendSettings, latest_per_entity
from casty_sa.backends.failures import (
    ConnectionLost,
    Contended,
    PayloadTooLarge,
    WriteRefused,
    classify_write_failure,
)
from casty_sa.backends.mysql_engines import mysql_engine
from casty_sa.backends.mysql_reads import (
    LEFT_CLEAN,
    MySQLReading,
    error_code,
    is_mysql_disconnect,
)
from casty_sa.codec import ROW_COLUMNS, EventRow, Row
from casty_sa.dialects import Dialect, register
from casty_sa.models import mysql_cannot_hold, newer_snapshot_wins, tombstone_table
from casty_sa.ordering import counter_name, counter_seed, take_positions

__all__ = ["MySQLBackend"]

#: Bytes of a statement besides its values, and of each row besides its payload.
_STATEMENT_OVERHEAD = 1024
_ROW_OVERHEAD = 128
#: Most entities one tombstone check takes (``MySQLBackend._refuse_deleted``): 2,000
#: tombstoned entities cost 32 ms in one statement, 13 ms in statements of 128.
_CHECKED = 128
#: Payloads from this size on are measured as escaped (the drivers escape these bytes with
#: a backslash), not taken at twice their size.
_EXACT_FROM = 2**16
_ESCAPED = (b"\0", b"\\", b"\n", b"\r", b"\x1a", b'"', b"'")


class MySQLBackend(MySQLReading):
    """asyncmy/aiomysql: a whole group in one packet, ``COMMIT`` included."""

    # a second group in flight waits for the counter's lock on the server, its packet
    # already there: it commits (and flushes, with the first one's) right after
    write_pipeline = 2

    def __init__(self, engine: AsyncEngine, schema: str | None, settings: BackendSettings) -> None:
        super().__init__(engine, schema, settings)
        self._upsert_sql: str | None = None  # compiled once the server is known
        self._packet_limit: int | None = None
        preparer = engine.dialect.identifier_preparer
        self._take = take_positions(preparer, schema)
        self._seed = counter_seed(preparer, schema)
        events = preparer.format_table(self.events)
        self._tombstones = preparer.format_table(tombstone_table(schema))
        self._counter = counter_name(preparer, schema)
        self._insert_head = (
            f"INSERT INTO {events} (entity_id, sequence_nr, timestamp, payload, event_type, "
            f"era, transaction_id, {preparer.quote('position')}) VALUES "
        )

    async def write(
        self, events: Sequence[EventRow], snapshots: Sequence[Row], *, seeded: bool = False
    ) -> None:
        snapshots = latest_per_entity(snapshots)  # a row may be upserted once per statement
        _refuse_timestamps(events, snapshots)
        fairy = await self.take_writer()
        fairy.info.pop(LEFT_CLEAN, None)
        conn = fairy.driver_connection
        committing = False
        counts: list[int] = []
        try:
            if not self.usable(conn):  # the server ended it: nothing goes out
                raise ConnectionLost(OSError("connection closed"), during_commit=False)
            # escaped and encoded before anything is sent: a failure here stored nothing
            packets = [_wire(conn, *p) for p in await self._packets(conn, events, snapshots)]
            for number, packet in enumerate(packets, start=1):
                committing = number == len(packets)
                await self._bounded(self._run(conn, packet, counts))
        except BaseException as exc:
            # a server that answered with an error ran what came before it: rolled back here;
            # a connection gone, silent or cut off half-way is dropped, never reset
            broken = isinstance(exc, ConnectionLost) or self.broken(exc)
            drop = exc if broken else await self._abandon(fairy)
            await self.give_back_writer(fairy, drop)
            if drop is not None and drop is not exc and not isinstance(drop, Exception):
                raise drop from exc  # cancelled while rolling back
            if drop is None and events and counts[2:3] == [0] and not seeded:
                await self._seed_counter()  # the counter has no row: nothing was stored
                await self.write(events, snapshots, seeded=True)
                return
            if isinstance(exc, ConnectionLost):
                raise
            failure = classify_write_failure(exc, committing=committing, dialect="mysql")
            if failure is exc:
                raise
            raise failure from exc
        fairy.info[LEFT_CLEAN] = True  # the packet ended with COMMIT
        await self.give_back_writer(fairy, None)

    async def _run(self, conn: Any, packet: bytes, counts: list[int]) -> None:
        """Send one packet of statements (see :func:`_wire`) and read every result, their
        row counts to ``counts`` as they come (the counter's ``UPDATE`` is the third)."""
        async with conn.cursor() as cursor:
            await cursor.execute(packet)  # no arguments: the driver sends it as it is
            counts.append(int(cursor.rowcount))
            while await cursor.nextset():
                counts.append(int(cursor.rowcount))

    async def _abandon(self, fairy: Any) -> BaseException | None:
        """Roll back what the failed packet left open, within the statement timeout: how
        that failed (the connection is then dropped), or ``None`` (it is clean again)."""
        try:
            await self._bounded(fairy.driver_connection.rollback())
        except BaseException as exc:  # noqa: BLE001 - the caller drops the connection
            return exc
        fairy.info[LEFT_CLEAN] = True  # the pool's reset need not roll back again
        return None

    async def _seed_counter(self) -> None:
        """Make the counter's row (tables made without migration 0004's seed)."""
        async with self.connection() as conn:
            await self._bounded(self._run(conn, _wire(conn, self._seed + "; COMMIT", []), []))

    async def _packets(
        self, conn: Any, events: Sequence[EventRow], snapshots: Sequence[Row]
    ) -> list[tuple[str, list[Any]]]:
        """The group's statements, in as few packets as the server takes, ``COMMIT`` last."""
        limit = await self._limit(conn)
        statements: list[tuple[str, list[Any], int]] = []
        if events:
            statements.append((self._take, [len(events)], _STATEMENT_OVERHEAD))
            statements += self._refuse_deleted(events, limit)
            statements += self._event_inserts(events, limit)
        if snapshots:
            statements += await self._snapshot_upserts(conn, snapshots, limit)
        packets: list[tuple[str, list[Any]]] = []
        sql = ["START TRANSACTION"]  # one, even on an application's engine in autocommit
        args: list[Any] = []
        size = 0
        for text, values, length in statements:
            if sql and size + length > limit:
                packets.append(("; ".join(sql), args))
                sql, args, size = [], [], 0
            sql.append(text)
            args += values
            size += length
        sql.append("COMMIT")
        packets.append(("; ".join(sql), args))
        return packets

    def _refuse_deleted(
        self, events: Sequence[EventRow], limit: int
    ) -> list[tuple[str, list[Any], int]]:
        """The statements that fail the transaction when a row's sequence number was deleted.

        Right after the counter's ``UPDATE`` (so after a deletion holding the counter has
        committed: :mod:`casty_sa.retention`), one probe of the tombstones' key per entity
        of the group, not one per row: the counter's ``id`` set to ``NULL`` (refused by its
        ``NOT NULL``, error 1048 naming ``id``) when any entity's tombstone reaches the
        lowest number the group writes for it. Read by the failure rule as a sequence
        conflict, the callers isolated as for a duplicate key. At most :data:`_CHECKED`
        entities a statement, each within ``limit`` bytes: the server tries a ``CASE``'s
        ``WHEN`` clauses one by one for every tombstone found (quadratic in a statement's
        entities), and a group's statements go in several packets.
        """
        lowest: dict[str, int] = {}
        for entity_id, sequence_nr, *_ in events:
            lowest[entity_id] = min(lowest.get(entity_id, sequence_nr), sequence_nr)
        statements: list[tuple[str, list[Any], int]] = []
        chunk: dict[str, int] = {}
        size = _STATEMENT_OVERHEAD
        for entity_id, sequence_nr in lowest.items():
            length = 2 * 4 * 2 * len(entity_id) + 48  # twice, escaped, 4 bytes a character
            if chunk and (len(chunk) == _CHECKED or size + length > limit):
                statements.append(self._refusal(chunk, size))
                chunk, size = {}, _STATEMENT_OVERHEAD
            chunk[entity_id] = sequence_nr
            size += length
        statements.append(self._refusal(chunk, size))
        return statements

    def _refusal(self, lowest: dict[str, int], size: int) -> tuple[str, list[Any], int]:
        """One statement of :meth:`_refuse_deleted`, for the entities of ``lowest``."""
        keys = ", ".join(["%s"] * len(lowest))
        cases = " ".join(["WHEN %s THEN %s"] * len(lowest))
        sql = (
            f"UPDATE {self._counter} SET id = IF(EXISTS(SELECT 1 FROM {self._tombstones} AS t "
            f"WHERE t.entity_id IN ({keys}) AND t.sequence_nr >= CASE t.entity_id {cases} END), "
            "NULL, id) WHERE id = 1"
        )
        args: list[Any] = [*lowest, *(v for pair in lowest.items() for v in pair)]
        return sql, args, size

    def _event_inserts(
        self, events: Sequence[EventRow], limit: int
    ) -> list[tuple[str, list[Any], int]]:
        """Multi-row ``INSERT`` statements of the events, each within ``limit`` bytes; each
        row's position is counted down from the counter's new value (``LAST_INSERT_ID()``,
        ``NULL`` should the counter not have moved: refused as a ``NULL`` position)."""
        statements: list[tuple[str, list[Any], int]] = []
        rows: list[str] = []
        args: list[Any] = []
        size = _STATEMENT_OVERHEAD
        below = len(events)
        for entity_id, sequence_nr, timestamp, payload, event_type in events:
            below -= 1
            length = _row_size(entity_id, payload, event_type)
            if length > limit - _STATEMENT_OVERHEAD:
                raise _refuse_oversized(length, limit)
            if rows and size + length > limit:
                statements.append((self._insert_head + ", ".join(rows), args, size))
                rows, args, size = [], [], _STATEMENT_OVERHEAD
            rows.append(f"(%s, %s, %s, %s, %s, 0, 0, NULLIF(LAST_INSERT_ID(), 0) - {below})")
            args += (entity_id, sequence_nr, timestamp, payload, event_type)
            size += length
        statements.append((self._insert_head + ", ".join(rows), args, size))
        return statements

    async def _snapshot_upserts(
        self, conn: Any, snapshots: Sequence[Row], limit: int
    ) -> list[tuple[str, list[Any], int]]:
        """Multi-row upserts of the snapshots (never moving one back), each within ``limit``."""
        head, tail = await self._upsert_parts()
        statements: list[tuple[str, list[Any], int]] = []
        rows: list[str] = []
        args: list[Any] = []
        size = _STATEMENT_OVERHEAD
        for row in snapshots:
            length = _row_size(row[0], row[3], None)
            if length > limit - _STATEMENT_OVERHEAD:
                raise _refuse_oversized(length, limit)
            if rows and size + length > limit:
                statements.append((f"{head}{', '.join(rows)}{tail}", args, size))
                rows, args, size = [], [], _STATEMENT_OVERHEAD
            rows.append("(%s, %s, %s, %s)")
            args += row
            size += length
        statements.append((f"{head}{', '.join(rows)}{tail}", args, size))
        return statements

    async def _upsert_parts(self) -> tuple[str, str]:
        """The upsert around its ``VALUES`` rows, compiled once SQLAlchemy knows the server
        (``VALUES(col)`` on MariaDB, a row alias on MySQL 8.0.20 and later)."""
        if self._upsert_sql is None:
            values = [dict.fromkeys(ROW_COLUMNS, None)]
            statement = newer_snapshot_wins(
                mysql.insert(self.snapshots).values(values), self.snapshots, replace_equal=True
            )
            self._upsert_sql = self._compile(statement)
        head, _, rest = self._upsert_sql.partition(" VALUES (")
        tail = rest[rest.index(")") + 1 :]
        return f"{head} VALUES ", tail

    async def _limit(self, conn: Any) -> int:
        """Bytes a packet may carry: the server's ``max_allowed_packet`` (read once)."""
        if self._packet_limit is None:
            async with conn.cursor() as cursor:
                await self._bounded(cursor.execute("SELECT @@max_allowed_packet"))
                (server,) = await cursor.fetchone()
            # the server's alone: the drivers' own max_allowed_packet bounds no query they
            # send (they split it into 16 MiB protocol packets)
            self._packet_limit = int(server) - _STATEMENT_OVERHEAD
        return self._packet_limit


class _CounterMissing(Exception):
    """The counter's row is not there (the ``UPDATE`` matched nothing): nothing stored."""


def _wire(conn: Any, sql: str, args: Sequence[Any]) -> bytes:
    """``sql`` with ``args`` in it, as the bytes that go out (what the drivers' ``execute``
    does, done before anything is sent, so that a value that cannot be escaped or encoded
    is a refusal of the rows, never a commit of unknown outcome).

    The driver escapes where it can (asyncmy, compiled); bytes are escaped here where
    it cannot (aiomysql's escaping of bytes breaks with PyMySQL 1.2:
    aio-libs/aiomysql#1080), the rest by the driver. Bytes go as
    ``_binary'…'``, each byte that needs it backslash-escaped (quotes doubled instead
    in a session with ``NO_BACKSLASH_ESCAPES``), the other bytes as they are (by way of
    ``surrogateescape``): about the payload's size, not twice it.
    """
    try:
        escaping = _ESCAPING.get(type(conn))
        if escaping is None:
            escaping = _ESCAPING[type(conn)] = _escaping_of(conn)
        if escaping == "mogrify":  # asyncmy: its own escaping, compiled
            text = conn.cursor().mogrify(sql, tuple(args))
        elif escaping == "driver":  # aiomysql with a PyMySQL that escapes bytes right
            text = sql % tuple(conn.escape(value) for value in args)
        else:
            text = sql % tuple(
                _bytes_literal(conn, value) if isinstance(value, bytes) else conn.escape(value)
                for value in args
            )
        return bytes(text.encode(conn._encoding, "surrogateescape"))
    except Exception as exc:  # whatever the driver's escaping raised
        raise WriteRefused(exc, duplicate=False) from exc


#: per driver connection class, who escapes a statement's values: the driver's compiled
#: ``mogrify`` (asyncmy), its ``escape`` (aiomysql), or its ``escape`` with bytes escaped
#: here (aiomysql on a PyMySQL whose escaping of bytes is broken)
_ESCAPING: dict[type, str] = {}


def _escaping_of(conn: Any) -> str:
    """How :func:`_wire` escapes values on connections of ``conn``'s class."""
    probe = bytes(range(256))
    try:
        right = bool(conn.escape(probe) == _bytes_literal(conn, probe))
    except Exception:  # noqa: BLE001 - aiomysql with PyMySQL 1.2: TypeError
        right = False
    if not right:
        return "own"
    # asyncmy's cursor() is a plain cursor; aiomysql's is an awaitable context manager
    return "mogrify" if type(conn).__module__.startswith("asyncmy") else "driver"


def _bytes_literal(conn: Any, value: bytes) -> str:
    return f"_binary'{conn.escape_string(value.decode('ascii', 'surrogateescape'))}'"


def _row_size(entity_id: str, payload: bytes, event_type: str | None) -> int:
    """The most bytes a row takes in a statement: escaping may double each byte (a large
    payload's escaped size is counted exactly)."""
    text = 2 * 4 * (len(entity_id) + len(event_type or "")) + _ROW_OVERHEAD
    if len(payload) < _EXACT_FROM:
        return 2 * len(payload) + text
    return len(payload) + sum(payload.count(byte) for byte in _ESCAPED) + text


def _refuse_timestamps(events: Sequence[EventRow], snapshots: Sequence[Row]) -> None:
    """Refuse timestamps MySQL's ``DOUBLE`` cannot hold as they are (nothing is sent; see
    :func:`~casty_sa.models.mysql_cannot_hold`)."""
    for stamp in (*(row[2] for row in events), *(row[2] for row in snapshots)):
        reason = mysql_cannot_hold(stamp)
        if reason is not None:
            raise WriteRefused(ValueError(reason), duplicate=False)


def _refuse_oversized(size: int, limit: int) -> WriteRefused:
    return WriteRefused(
        PayloadTooLarge(
            f"a row of up to {size:,} bytes once escaped is over the server's "
            f"max_allowed_packet ({limit + _STATEMENT_OVERHEAD:,} bytes, less "
            f"{_STATEMENT_OVERHEAD:,} for the statement around it); raise it on the server"
        ),
        duplicate=False,
    )


#: ER_LOCK_DEADLOCK (the server rolled the transaction back), ER_LOCK_WAIT_TIMEOUT (the
#: statement only: the backend rolls the rest back itself)
_CONTENDED = frozenset({1213, 1205})
#: ER_DUP_ENTRY, ER_DUP_ENTRY_WITH_KEY_NAME
_DUPLICATE = frozenset({1062, 1586})
#: values refused (too long, out of range, bad value, NULL, check…) or an app's trigger's SIGNAL
_REFUSED = frozenset({1406, 1264, 1366, 1048, 1292, 3819, 4025, 1153, 1301, 1690, 1644})


def _write_failure(exc: Exception, _max_length: int | None) -> BaseException | bool:
    """asyncmy's (or aiomysql's) error of a failed write (see ``WriteFailureRule``)."""
    code = error_code(exc)
    if code in _DUPLICATE:
        # only the events' primary key is a sequence number already stored: MySQL names it
        # PRIMARY ('casty_sa_events.PRIMARY' on 8.0); the global order's index is another
        return WriteRefused(exc, duplicate="PRIMARY'" in str(exc))
    if code == 1048:  # ER_BAD_NULL_ERROR: the counter's NULL id is a deleted sequence number
        # (MySQLBackend._refuse_deleted); the column's name alone: lc_messages translates
        deleted = "'id'" in str(exc)  # the rest ("Feld 'id' darf nicht NULL sein")
        return WriteRefused(exc, duplicate=deleted)
    if code in _REFUSED:
        return WriteRefused(exc, duplicate=False)
    if code in _CONTENDED:
        return Contended(exc)
    # a server's answer (an error code below 2000: CR_* codes are the client's) means
    # the packet stopped there, COMMIT unrun; a lost connection leaves it open
    return code is not None and code < 2000 and not is_mysql_disconnect(exc)


register(
    Dialect(
        name="mysql",
        aliases=frozenset({"mariadb"}),
        url_names=frozenset({"mariadb"}),
        label="MySQL/MariaDB",
        example="mysql://…",
        driver="asyncmy",
        drivers=frozenset({"aiomysql"}),
        extras={"asyncmy": ("asyncmy", "mysql"), "aiomysql": ("aiomysql", "aiomysql")},
        kind=JournalKind.centralized,
        timed=True,
        engine=mysql_engine,
        backend=MySQLBackend,
        write_failure=_write_failure,
    )
)
