"""The global order of events: what a row's place in it is, and how a reader's offset says so.

Every event row carries three numbers besides its key (migration ``0002``):

``era``
    0, until the table is restored into a server whose transaction ids are behind
    the ones stored (a dump and restore into another PostgreSQL): the first
    writer after that writes in the next era, so what is written there sorts
    after everything restored (readers read every restored row meanwhile, and
    move into the next era only once a row of it is stored).
``transaction_id``
    PostgreSQL's ``pg_current_xact_id()`` of the transaction that wrote the row
    (a 64-bit counter that never wraps, stored as ``bigint``); 0 on SQLite, whose
    single writer commits in position order, and 0 for rows stored before ``0002``.
``position``
    A number unique in the table: an identity column on PostgreSQL, one more than the
    highest on SQLite; rows stored before ``0002`` were numbered below zero, in
    primary-key order.

The global order is ``(era, transaction_id, position)``. A reader on PostgreSQL
takes only rows whose transaction id is below the oldest transaction still
running (``pg_snapshot_xmin(pg_current_snapshot())``): every transaction that can
still commit has an id at or above that horizon, so it sorts after whatever the
reader has been given and nothing is ever skipped. A long write transaction
delays readers; it never makes them lose an event.

An offset is that triple as 36 hexadecimal digits, so offsets compare as strings in
the global order and can be stored anywhere:

>>> offset = format_offset(0, 812, 5)
>>> offset
'0000000000000000032c8000000000000005'
>>> parse_offset(offset)
(0, 812, 5)
>>> format_offset(0, 0, -3) < format_offset(0, 0, 1) < format_offset(0, 1, -9)
True
>>> from collections import OrderedDict
>>> event_type_name(3.5), event_type_name(OrderedDict())
('float', 'collections.OrderedDict')
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Dialect, Select, Table, and_, case, func, literal_column, null, select
from sqlalchemy.sql.elements import ColumnElement

from casty_sa.models import EVENT_TYPE_LENGTH, tombstone_table

__all__ = [
    "MAX_ERA",
    "MAX_TRANSACTION_ID",
    "InvalidOffset",
    "counter_name",
    "counter_seed",
    "current_era",
    "current_transaction_id",
    "event_type_name",
    "format_offset",
    "full_type_name",
    "global_order",
    "highest_position",
    "newest_place",
    "next_position",
    "next_transaction_id",
    "notify_channel",
    "numbered_insert",
    "offset_head",
    "offset_tail",
    "oldest_running_transaction",
    "parse_offset",
    "positioned_insert",
    "read_horizon",
    "stored_type_name",
    "take_positions",
    "unless_deleted",
]

#: Highest era and transaction id the columns hold (``SMALLINT``, ``BIGINT``).
MAX_ERA = 2**15 - 1
MAX_TRANSACTION_ID = 2**63 - 1

_POSITION_BIAS = 1 << 63  # positions are signed: biased, they sort as unsigned hex
_OFFSET = re.compile(r"[0-9a-f]{36}")


class InvalidOffset(ValueError):
    """An ``after=`` offset that is not one the read side hands out."""


def format_offset(era: int, transaction_id: int, position: int) -> str:
    """The offset of a row: its place in the global order, as a sortable string."""
    return offset_head(era, transaction_id) + offset_tail(position)


def offset_head(era: int, transaction_id: int) -> str:
    """The first 20 digits of an offset: the same for every row of one transaction."""
    return f"{era:04x}{transaction_id:016x}"


def offset_tail(position: int) -> str:
    """The last 16 digits of an offset: the row's position."""
    return f"{position + _POSITION_BIAS:016x}"


def parse_offset(offset: object) -> tuple[int, int, int]:
    """``(era, transaction_id, position)`` of an offset; :class:`InvalidOffset` otherwise."""
    if type(offset) is not str or not _OFFSET.fullmatch(offset):
        shown = repr(offset)[:60]
        raise InvalidOffset(
            f"{shown} is not an offset of casty-sa's read side (36 lowercase hexadecimal "
            "digits, as EventEnvelope.offset gives them)"
        )
    return int(offset[:4], 16), int(offset[4:20], 16), int(offset[20:], 16) - _POSITION_BIAS


def event_type_name(event: object) -> str:
    """What ``event_type`` holds for ``event``: ``module.QualName``, or the name of a built-in."""
    return stored_type_name(full_type_name(event))


def full_type_name(event: object) -> str:
    """``event``'s type name before :func:`stored_type_name` cuts it to the column's length."""
    cls = type(event)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def stored_type_name(name: str) -> str:
    """``name`` as the ``event_type`` column holds it: cut, ending in "…", when too long.

    No Python type name ends in "…", so a stored name ending in it was cut.
    """
    if len(name) > EVENT_TYPE_LENGTH:
        return name[: EVENT_TYPE_LENGTH - 1] + "…"
    return name


def next_position(events: Table, step: Any) -> ColumnElement[Any]:
    """SQLite: the position of the ``step``-th row (from 1) of an ``INSERT``.

    One more than the highest stored, found through the global-order index (its
    last entry); SQLite lets one writer in at a time, so no other writer can take
    the same number, and a later transaction always gets higher ones. Whether
    SQLite evaluates the subquery once per statement or once per row, the rows
    get increasing numbers.
    """
    position: ColumnElement[Any] = _highest_position(events) + step
    return position


def numbered_insert(events: Table, dialect: Dialect) -> str:
    """SQLite: the ``INSERT`` of event rows that take the next positions, in one statement.

    One row of ``VALUES``: ``entity_id, sequence_nr, timestamp, payload, event_type``
    and the row's ``step`` in the statement (from 1); more rows repeat it
    (:func:`casty_sa.backends.sqlite_rows.multi_row`). The highest stored position
    is read once for the statement, joined to the rows, where the same subquery in
    each row of ``VALUES`` would be run once per row (a third of the write's cost).
    A deleted sequence number is refused (:func:`sqlite_values_checked`).

    Examples
    --------
    >>> from sqlalchemy.dialects import sqlite
    >>> from casty_sa.models import journal_tables
    >>> sql = numbered_insert(journal_tables()[0], sqlite.dialect())
    >>> sql.split(" FROM ")[0].split(", v.column3")[1]
    ', v.column4, v.column5, 0, 0, h.top + v.column6'
    """
    highest = select(_highest_position(events).label("top"))
    compiled = highest.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
    return sqlite_values_checked(events, dialect, "h.top + v.column6", f", ({compiled}) AS h")


def sqlite_values_checked(events: Table, dialect: Dialect, position: str, more: str = "") -> str:
    """SQLite: the ``INSERT … SELECT`` of one row of ``VALUES`` (six values, the sixth
    giving ``position``), joined to the tombstones: a row at or below its entity's
    tombstone gets a ``NULL`` sequence number, refused by the column's ``NOT NULL`` in
    the same statement (see :func:`unless_deleted`). A join, not a subquery per row of
    ``VALUES``, which SQLite would run once per row."""
    preparer = dialect.identifier_preparer
    table = preparer.format_table(events)
    tombstones = preparer.format_table(tombstone_table(events.schema))
    return (
        f"INSERT INTO {table} (entity_id, sequence_nr, timestamp, payload, event_type, era, "
        "transaction_id, position) SELECT v.column1, CASE WHEN v.column2 <= t.sequence_nr "
        "THEN NULL ELSE v.column2 END, v.column3, v.column4, v.column5, 0, 0, "
        f"{position} FROM (VALUES (?, ?, ?, ?, ?, ?)) AS v{more} "
        f"LEFT JOIN {tombstones} AS t ON t.entity_id = v.column1"
    )


def unless_deleted(sequence_nr: Any, tombstone: Any, *, only_if: Any = None) -> ColumnElement[Any]:
    """``sequence_nr``, or ``NULL`` when it is at or below the entity's ``tombstone``.

    Every insert of events puts this in its ``sequence_nr`` column: a row whose number
    was deleted (:mod:`casty_sa.retention`) is refused by the column's ``NOT NULL`` in
    the statement that inserts it, and the failure rules of the dialects report that as
    a sequence number taken (``WriteRefused(duplicate=True)``). ``only_if``: a condition
    evaluated first, the tombstone looked up only when it holds (PostgreSQL evaluates
    ``AND`` from the left and stops at a false).
    """
    deleted = sequence_nr <= tombstone
    if only_if is not None:
        deleted = and_(only_if, deleted)
    checked: ColumnElement[Any] = case((deleted, null()), else_=sequence_nr)
    return checked


def highest_position(events: Table, dialect: Dialect) -> str:
    """SQLite: the statement that reads the highest stored position (0 for none).

    A writer that runs it inside its ``BEGIN IMMEDIATE`` transaction (no other writer
    can come in) and numbers its rows from there binds their positions, which SQLite
    inserts faster than rows that each compute theirs (:func:`numbered_insert`).
    """
    statement = select(_highest_position(events))
    return str(statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def positioned_insert(events: Table, dialect: Dialect) -> str:
    """SQLite: the ``INSERT`` of event rows with their positions bound (see
    :func:`highest_position`); one row of ``VALUES``: :func:`numbered_insert`'s, with the
    position where the step is."""
    return sqlite_values_checked(events, dialect, "v.column6")


def global_order(events: Table) -> tuple[ColumnElement[Any], ...]:
    """The columns of the global order, in order."""
    return (events.c.era, events.c.transaction_id, events.c.position)


def newest_place(events: Table) -> Select[Any]:
    """``(era, transaction_id, position)`` of the newest row: the global-order index's last
    entry (one look, whatever the table's size)."""
    order = global_order(events)
    return (
        select(*order)
        .order_by(*(column.desc() for column in order))
        .limit(literal_column("1"))
        .offset(literal_column("0"))  # SQLite's compiler would bind an OFFSET otherwise
    )


def _highest_position(events: Table) -> ColumnElement[Any]:
    """SQLite: the highest stored position (0 for none)."""
    highest = newest_place(events).with_only_columns(events.c.position).scalar_subquery()
    top: ColumnElement[Any] = func.coalesce(highest, literal_column("0"))
    return top


def current_era(events: Table) -> ColumnElement[int]:
    """PostgreSQL: the era a writer writes in.

    The highest stored era, or the next one when that era's highest transaction id
    is not below the server's next one: the rows were written by another server
    (restored here), and this server's transactions would sort before them.
    ``pg_snapshot_xmax`` assigns no transaction id, unlike ``pg_current_xact_id``.
    """
    top, newest = _newest_era(events)
    one: ColumnElement[int] = literal_column("1")
    return top + case((newest >= next_transaction_id(), one), else_=literal_column("0"))


def read_horizon(events: Table) -> tuple[ColumnElement[int], ColumnElement[int]]:
    """PostgreSQL: ``(era, transaction_id)`` below which every row is committed, for good.

    The highest stored era, and in it the oldest transaction still running
    (:func:`oldest_running_transaction`). While that era's rows were written by a
    server ahead of this one (see :func:`current_era`), all of them: they are
    restored, so committed. Never the next era before a row of it is stored: a
    writer that starts once this server's transaction ids have passed the restored
    ones writes in the highest era still, after them, and a reader that had moved
    into the next era would pass those rows.
    """
    top, newest = _newest_era(events)
    restored = newest >= next_transaction_id()
    return top, case((restored, newest + literal_column("1")), else_=oldest_running_transaction())


def _newest_era(events: Table) -> tuple[ColumnElement[int], ColumnElement[int]]:
    """The highest stored era (0 for an empty table) and its highest transaction id."""
    zero: ColumnElement[int] = literal_column("0")
    top = select(func.coalesce(func.max(events.c.era), zero)).scalar_subquery()
    newest = select(func.max(events.c.transaction_id)).where(events.c.era == top).scalar_subquery()
    return top, newest


def current_transaction_id() -> ColumnElement[int]:
    """PostgreSQL: the writing transaction's id (``xid8``) as a ``bigint``."""
    return literal_column("pg_current_xact_id()::text::bigint")


def oldest_running_transaction() -> ColumnElement[int]:
    """PostgreSQL: the readers' horizon, the oldest transaction id still running.

    Every transaction below it has ended, so the rows it wrote are visible to the
    statement that evaluates this (in the same statement: its own snapshot).
    """
    return literal_column("pg_snapshot_xmin(pg_current_snapshot())::text::bigint")


def next_transaction_id() -> ColumnElement[int]:
    """PostgreSQL: the next transaction id the server will assign (none at or above it exists)."""
    return literal_column("pg_snapshot_xmax(pg_current_snapshot())::text::bigint")


def notify_channel(schema: str | None) -> str:
    """The ``LISTEN``/``NOTIFY`` channel a PostgreSQL journal announces commits on."""
    return "casty_sa_events" if schema is None else f"casty_sa_events.{schema}"


def take_positions(preparer: Any, schema: str | None = None) -> str:
    """MySQL/MariaDB: the statements that take a writer's positions, ``n`` bound as ``%s``.

    First in the writer's transaction: the counter's row (migration ``0004``) moves up by
    ``n`` and stays locked until the commit, so writers commit in position order and a
    reader that has seen a row has seen every row below it. ``LAST_INSERT_ID(expr)``
    keeps the new value for the session; the rows take ``value - n + 1 … value``.
    ``LAST_INSERT_ID`` is reset first, so a counter without its row leaves it at 0
    (which no taken value is), and the positions ``NULLIF(LAST_INSERT_ID(), 0) - k``
    are ``NULL``: refused, never numbered from a stale value.

    Examples
    --------
    >>> from sqlalchemy.dialects import mysql
    >>> for sql in take_positions(mysql.dialect().identifier_preparer).split("; "):
    ...     print(sql)
    DO LAST_INSERT_ID(0)
    UPDATE casty_sa_event_counter SET position = LAST_INSERT_ID(position + %s) WHERE id = 1
    """
    counter = _qualified(preparer, "casty_sa_event_counter", schema)
    position = preparer.quote("position")
    return (
        f"DO LAST_INSERT_ID(0); UPDATE {counter} SET {position} = "
        f"LAST_INSERT_ID({position} + %s) WHERE id = 1"
    )


def counter_seed(preparer: Any, schema: str | None = None) -> str:
    """MySQL/MariaDB: make the counter's row, at the highest stored position (or 0), unless
    it is there (tables an application made from the models have none)."""
    counter = _qualified(preparer, "casty_sa_event_counter", schema)
    events = _qualified(preparer, "casty_sa_events", schema)
    position = preparer.quote("position")
    return (
        f"INSERT INTO {counter} (id, {position}) SELECT 1, "
        f"GREATEST(COALESCE(MAX({position}), 0), 0) FROM {events} ON DUPLICATE KEY UPDATE id = id"
    )


def counter_name(preparer: Any, schema: str | None = None) -> str:
    """MySQL/MariaDB: the counter table's name as statements write it."""
    return _qualified(preparer, "casty_sa_event_counter", schema)


def _qualified(preparer: Any, name: str, schema: str | None) -> str:
    quoted = preparer.quote(name)
    return quoted if schema is None else f"{preparer.quote_schema(schema)}.{quoted}"
