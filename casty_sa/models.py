"""Declarative models of casty-sa's tables: events, snapshots, projection offsets.

The tables carry a ``casty_sa_`` prefix so they never clash with an
application's own ``events`` or ``snapshots``. Constraint names come from
:data:`NAMING_CONVENTION`, so they are the same on every dialect and the
hand-written migrations can name them.

Examples
--------
>>> sorted(metadata.tables)  # doctest: +NORMALIZE_WHITESPACE
['casty_sa_event_counter', 'casty_sa_events', 'casty_sa_projection_offsets',
 'casty_sa_snapshots', 'casty_sa_tombstones']
>>> [c.name for c in EventRecord.__table__.primary_key]
['entity_id', 'sequence_nr']
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Dialect,
    Double,
    Identity,
    Index,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    func,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.schema import SchemaConst
from sqlalchemy.types import TypeDecorator

__all__ = [
    "EVENTS_PRIMARY_KEY",
    "EVENT_TYPE_LENGTH",
    "GLOBAL_ORDER_INDEX",
    "MAX_ENTITY_ID_LENGTH",
    "NAMING_CONVENTION",
    "OWNER_LENGTH",
    "PROJECTION_NAME_LENGTH",
    "SQLITE_NEGATIVE_ZERO",
    "VERSION_TABLE",
    "Base",
    "EventCounterRecord",
    "EventRecord",
    "ExactString",
    "ProjectionOffsetRecord",
    "SnapshotRecord",
    "Timestamp",
    "TombstoneRecord",
    "binary_collation",
    "journal_tables",
    "metadata",
    "newer_snapshot_wins",
    "tombstone_table",
]

#: Longest entity id, in characters. 512 characters of UTF-8 stay under
#: PostgreSQL's btree limit for an index entry; on MySQL/MariaDB a key of
#: ``VARCHAR(512)`` in utf8mb4 (4 bytes a character: 2,048 bytes) and a ``BIGINT``
#: stays under InnoDB's 3,072-byte limit for an index key.
MAX_ENTITY_ID_LENGTH = 512

#: Alembic version table of casty-sa's own migration history. Never
#: ``alembic_version``, so an application's history in the same database is
#: left alone.
VERSION_TABLE = "casty_sa_alembic_version"

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: The ``MetaData`` holding casty-sa's tables; include it in an application's
#: own Alembic ``target_metadata`` list to let autogenerate see them.
metadata = MetaData(naming_convention=NAMING_CONVENTION)


#: How SQLite holds a ``-0.0`` timestamp. A REAL column stores a whole-number float as an
#: integer, which drops the sign of zero; these 8 bytes (the float's IEEE 754 form, a BLOB,
#: which REAL affinity leaves alone) keep it. Every other float is stored as it is.
SQLITE_NEGATIVE_ZERO = struct.pack(">d", -0.0)


def is_negative_zero(value: object) -> bool:
    """Whether ``value`` is the float ``-0.0`` (which ``== 0.0``, so compare the sign)."""
    return value == 0.0 and type(value) is float and math.copysign(1.0, value) < 0


class Timestamp(TypeDecorator[float]):
    """A ``DOUBLE`` column whose floats come back bit for bit on every database.

    On SQLite, ``-0.0`` is stored as :data:`SQLITE_NEGATIVE_ZERO` and read
    back as ``-0.0``; elsewhere, and for every other value, it is a plain
    ``Double``. casty-sa's own statements use it (see :func:`journal_tables`);
    the models keep a plain ``Double``, so an application's Alembic
    autogenerate renders ``sa.Double()`` and needs no import of casty-sa.

    Examples
    --------
    >>> from sqlalchemy.dialects import sqlite
    >>> Timestamp().bind_processor(sqlite.dialect())(-0.0) == SQLITE_NEGATIVE_ZERO
    True
    """

    impl = Double
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        if dialect.name in ("mysql", "mariadb"):
            return _refuse_on_mysql
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        def process(value: Any) -> Any:
            return SQLITE_NEGATIVE_ZERO if is_negative_zero(value) else value

        return process

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any] | None:
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)

        def process(value: Any) -> Any:
            return -0.0 if value == SQLITE_NEGATIVE_ZERO else value

        return process


class ExactString(String):
    """A ``VARCHAR`` that compares exactly, byte for byte, on every database.

    MySQL's and MariaDB's default collations compare case-insensitively and pad
    trailing spaces, so ``"alice"``, ``"Alice"`` and ``"alice "`` would be one key
    there; this type gives the column ``utf8mb4`` with a binary ``NO PAD`` collation
    (:func:`binary_collation`). Elsewhere it is a plain ``VARCHAR`` (SQLite's and
    PostgreSQL's keys already compare exactly).

    Examples
    --------
    >>> from sqlalchemy.dialects import mysql
    >>> print(ExactString(512).compile(dialect=mysql.dialect(is_mariadb=True)))
    VARCHAR(512) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin
    >>> print(ExactString(512).compile(dialect=mysql.dialect()))
    VARCHAR(512) CHARACTER SET utf8mb4 COLLATE utf8mb4_0900_bin
    """


def binary_collation(dialect: Dialect) -> str:
    """The utf8mb4 collation comparing code points with no padding: MariaDB's or MySQL 8's.

    Online the dialect knows its server; offline (``--sql``) the URL says which:
    ``mariadb://`` is MariaDB, ``mysql://`` MySQL 8 (8.0.17 or later).
    """
    return "utf8mb4_nopad_bin" if getattr(dialect, "is_mariadb", False) else "utf8mb4_0900_bin"


@compiles(ExactString, "mysql")
@compiles(ExactString, "mariadb")
def _exact_on_mysql(type_: ExactString, compiler: Any, **_kw: Any) -> str:
    return (
        f"VARCHAR({type_.length}) CHARACTER SET utf8mb4 "
        f"COLLATE {binary_collation(compiler.dialect)}"
    )


#: Payloads: ``BLOB`` holds 64 KB on MySQL/MariaDB, ``LONGBLOB`` 4 GB.
Payload = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")

#: Table options on MySQL/MariaDB: InnoDB (transactions, row locks) and utf8mb4 (under
#: both names: SQLAlchemy reads the ``mariadb_`` ones for a ``mariadb://`` URL). Typed
#: ``Any`` so that it spreads into ``op.create_table(…, **MYSQL_TABLE)`` beside its flags.
MYSQL_TABLE: dict[str, Any] = {
    f"{name}_{option}": value
    for name in ("mysql", "mariadb")
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"))
}


def mysql_cannot_hold(value: float) -> str | None:
    """Why MySQL's ``DOUBLE`` cannot hold ``value`` as it is (``None``: it can).

    It stores ``-0.0`` as ``0.0`` (the sign lost) and has no infinities or NaN; every
    other double, subnormals included, comes back bit for bit.

    >>> mysql_cannot_hold(-0.0).split(",")[0]
    'timestamp -0.0 cannot be stored on MySQL/MariaDB'
    >>> mysql_cannot_hold(5e-324) is None
    True
    """
    if is_negative_zero(value) or (isinstance(value, float) and not math.isfinite(value)):
        shown = "-0.0" if is_negative_zero(value) else repr(value)
        return (
            f"timestamp {shown} cannot be stored on MySQL/MariaDB, whose DOUBLE turns -0.0 "
            "into 0.0 and holds no infinity or NaN"
        )
    return None


def _refuse_on_mysql(value: Any) -> Any:
    reason = None if value is None else mysql_cannot_hold(value)
    if reason is not None:
        raise ValueError(reason)
    return value


class Base(DeclarativeBase):
    """Declarative base of casty-sa's models, bound to :data:`metadata`."""

    metadata = metadata


#: The name of the events' primary key: its violation is a sequence number already stored.
EVENTS_PRIMARY_KEY = "pk_casty_sa_events"
#: The unique index of the global order ``(era, transaction_id, position)``.
GLOBAL_ORDER_INDEX = "ix_casty_sa_events_global_order"

#: Longest ``event_type``, in characters (see :func:`casty_sa.ordering.event_type_name`).
EVENT_TYPE_LENGTH = 255


class EventRecord(Base):
    """One persisted event: the serializer's bytes of a casty ``PersistedEvent``.

    The primary key ``(entity_id, sequence_nr)`` is what stops two writers of
    the same entity from forking its history. ``(era, transaction_id, position)``
    is the event's place in the global order the read side follows (see
    :mod:`casty_sa.ordering`); ``event_type`` names the event's class, or is
    ``NULL`` for rows stored before migration ``0002`` or copied from a casty file.
    """

    __tablename__ = "casty_sa_events"
    __table_args__ = (
        Index(GLOBAL_ORDER_INDEX, "era", "transaction_id", "position", unique=True),
        MYSQL_TABLE,
    )

    entity_id: Mapped[str] = mapped_column(ExactString(MAX_ENTITY_ID_LENGTH), primary_key=True)
    sequence_nr: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    timestamp: Mapped[float] = mapped_column(Double)
    payload: Mapped[bytes] = mapped_column(Payload)
    event_type: Mapped[str | None] = mapped_column(ExactString(EVENT_TYPE_LENGTH))
    era: Mapped[int] = mapped_column(SmallInteger)
    transaction_id: Mapped[int] = mapped_column(BigInteger)
    # PostgreSQL: an identity column; SQLite and MySQL: the journal numbers it (see
    # casty_sa.ordering; MySQL renders no identity here)
    position: Mapped[int] = mapped_column(BigInteger, Identity())


class SnapshotRecord(Base):
    """The latest snapshot of one entity (at most one row per entity)."""

    __tablename__ = "casty_sa_snapshots"
    __table_args__ = (MYSQL_TABLE,)

    entity_id: Mapped[str] = mapped_column(ExactString(MAX_ENTITY_ID_LENGTH), primary_key=True)
    sequence_nr: Mapped[int] = mapped_column(BigInteger)
    timestamp: Mapped[float] = mapped_column(Double)
    payload: Mapped[bytes] = mapped_column(Payload)


class EventCounterRecord(Base):
    """MySQL/MariaDB: the highest position handed out, in one row (migration ``0004``).

    Every writer of events there takes its positions with ``UPDATE … SET position =
    LAST_INSERT_ID(position + n)`` first in its transaction, and holds the row's lock
    until it commits: writers commit in position order, so a reader never passes a row
    that commits late (see :mod:`casty_sa.ordering`). On PostgreSQL and SQLite the table
    is created empty and never used.
    """

    __tablename__ = "casty_sa_event_counter"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"), MYSQL_TABLE)

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    position: Mapped[int] = mapped_column(BigInteger)


class TombstoneRecord(Base):
    """The highest sequence number ever deleted of one entity (migration ``0005``).

    Every insert of events refuses a row at or below it (:mod:`casty_sa.ordering`), so
    a deleted sequence number is never used again; ``forget`` removes the row with the
    entity's events and snapshot (:mod:`casty_sa.retention`).
    """

    __tablename__ = "casty_sa_tombstones"
    __table_args__ = (MYSQL_TABLE,)

    entity_id: Mapped[str] = mapped_column(ExactString(MAX_ENTITY_ID_LENGTH), primary_key=True)
    sequence_nr: Mapped[int] = mapped_column(BigInteger)


#: Longest projection name, in characters.
PROJECTION_NAME_LENGTH = 255
#: Longest owner tag of a projection's lease (``host:pid:random``).
OWNER_LENGTH = 255


class ProjectionOffsetRecord(Base):
    """Where one slice of a projection stands, and which worker may move it.

    A projection (:class:`casty_sa.projections.Projection`) has ``slice_count`` rows,
    one per slice ``0 … slice_count - 1``; a one-slice projection has one row. The
    row is updated in the same transaction as the read-model writes of every batch,
    so ``last_offset`` (the offset of the last event handled, ``NULL`` before the
    first) can never disagree with the read model. It lives in the read model's
    database, which need not be the journal's.

    The lease: ``owner`` may apply events while ``lease_expires_ms`` (milliseconds
    since 1970 on the database's clock) is in the future. Every take-over and every
    reset adds one to ``fence``, and a batch commits only if the row still has the
    owner and fence its worker took it with, so a worker that lost its lease
    (frozen, cut off, reset) can never commit a batch.
    """

    __tablename__ = "casty_sa_projection_offsets"
    __table_args__ = (
        CheckConstraint("slice_count >= 1", name="slice_count"),
        CheckConstraint("slice >= 0 AND slice < slice_count", name="slice"),
        MYSQL_TABLE,
    )

    projection: Mapped[str] = mapped_column(ExactString(PROJECTION_NAME_LENGTH), primary_key=True)
    slice: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    slice_count: Mapped[int] = mapped_column(SmallInteger)
    last_offset: Mapped[str | None] = mapped_column(String(36))
    handled: Mapped[int] = mapped_column(BigInteger)
    fence: Mapped[int] = mapped_column(BigInteger)
    owner: Mapped[str | None] = mapped_column(String(OWNER_LENGTH))
    lease_expires_ms: Mapped[int | None] = mapped_column(BigInteger)
    updated_ms: Mapped[int] = mapped_column(BigInteger)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_ms: Mapped[int | None] = mapped_column(BigInteger)


@functools.cache
def journal_tables(schema: str | None = None) -> tuple[Table, Table]:
    """The events and snapshots tables as casty-sa's own statements use them.

    Copies of the models' tables (in ``schema``, when given) whose
    ``timestamp`` columns are :class:`Timestamp`, so every read and write of
    casty-sa keeps timestamps bit for bit. The DDL is the models'.

    Examples
    --------
    >>> events, snapshots = journal_tables()
    >>> events.name, type(snapshots.c.timestamp.type).__name__
    ('casty_sa_events', 'Timestamp')
    """
    target = MetaData(naming_convention=NAMING_CONVENTION)
    events, snapshots = (
        cast(Table, record.__table__).to_metadata(
            target, schema=schema if schema is not None else SchemaConst.RETAIN_SCHEMA
        )
        for record in (EventRecord, SnapshotRecord)
    )
    for table in (events, snapshots):
        table.c.timestamp.type = Timestamp()
    return events, snapshots


@functools.cache
def tombstone_table(schema: str | None = None) -> Table:
    """The tombstones table in ``schema`` (see :func:`journal_tables`)."""
    table = cast(Table, TombstoneRecord.__table__)
    return table if schema is None else table.to_metadata(MetaData(), schema=schema)


type DialectInsert = postgresql.Insert | sqlite.Insert | mysql.Insert


def newer_snapshot_wins(
    insert: DialectInsert, table: Table, *, replace_equal: bool
) -> DialectInsert:
    """``insert`` (the dialect's ``INSERT`` into a snapshots ``table``) that never moves back.

    An entity keeps one snapshot. A row for an entity that already has one
    replaces it only when its sequence number is higher, so a late write from a
    deposed node never moves recovery backwards. At an equal sequence number the
    two writers disagree on purpose, and this is the one place that says so:

    - the journal (``replace_equal=True``): the latest ``save_snapshot`` wins, as
      casty's own journals do; both snapshots stand for the same events;
    - a copy (``replace_equal=False``, ``casty-sa import``/``export``): what the
      target already holds is never rewritten, so running a copy again changes
      nothing and reports nothing copied.

    Examples
    --------
    >>> from sqlalchemy.dialects import sqlite
    >>> snapshots = journal_tables(None)[1]
    >>> statement = newer_snapshot_wins(sqlite.insert(snapshots), snapshots, replace_equal=False)
    >>> str(statement.compile(dialect=sqlite.dialect())).split("WHERE ")[1]
    'excluded.sequence_nr > casty_sa_snapshots.sequence_nr'
    """
    if isinstance(insert, mysql.Insert):
        return _newer_snapshot_wins_mysql(insert, table, replace_equal=replace_equal)
    excluded = insert.excluded
    newer = (
        excluded.sequence_nr >= table.c.sequence_nr
        if replace_equal
        else excluded.sequence_nr > table.c.sequence_nr
    )
    updated = {column.name: excluded[column.name] for column in table.c if not column.primary_key}
    upsert: postgresql.Insert | sqlite.Insert = insert.on_conflict_do_update(
        index_elements=[table.c.entity_id], set_=updated, where=newer
    )
    return upsert


def _newer_snapshot_wins_mysql(
    insert: mysql.Insert, table: Table, *, replace_equal: bool
) -> mysql.Insert:
    """:func:`newer_snapshot_wins` on MySQL/MariaDB: ``ON DUPLICATE KEY UPDATE``.

    It has no ``WHERE``: each column keeps its value unless the row is newer. MySQL
    assigns the ``SET`` list left to right, each assignment seeing the ones before,
    so ``sequence_nr`` comes last: every condition reads the stored one.
    """
    new = insert.inserted
    newer = (
        new.sequence_nr >= table.c.sequence_nr
        if replace_equal
        else new.sequence_nr > table.c.sequence_nr
    )
    names = [c.name for c in table.c if not c.primary_key and c.name != "sequence_nr"]
    assignments = [
        (name, func.if_(newer, new[name], table.c[name])) for name in [*names, "sequence_nr"]
    ]
    return insert.on_duplicate_key_update(assignments)
