"""Declarative models of casty-sa's two tables.

The tables carry a ``casty_sa_`` prefix so they never clash with an
application's own ``events`` or ``snapshots``. Constraint names come from
:data:`NAMING_CONVENTION`, so they are the same on every dialect and the
hand-written migrations can name them.

Examples
--------
>>> sorted(metadata.tables)
['casty_sa_events', 'casty_sa_snapshots']
>>> [c.name for c in EventRecord.__table__.primary_key]
['entity_id', 'sequence_nr']
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Double, LargeBinary, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "MAX_ENTITY_ID_LENGTH",
    "NAMING_CONVENTION",
    "VERSION_TABLE",
    "Base",
    "EventRecord",
    "SnapshotRecord",
    "metadata",
]

#: Longest entity id, in characters. 512 characters of UTF-8 stay under
#: PostgreSQL's btree limit for an index entry.
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


class Base(DeclarativeBase):
    """Declarative base of casty-sa's models, bound to :data:`metadata`."""

    metadata = metadata


class EventRecord(Base):
    """One persisted event: the serializer's bytes of a casty ``PersistedEvent``.

    The primary key ``(entity_id, sequence_nr)`` is what stops two writers of
    the same entity from forking its history.
    """

    __tablename__ = "casty_sa_events"

    entity_id: Mapped[str] = mapped_column(String(MAX_ENTITY_ID_LENGTH), primary_key=True)
    sequence_nr: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    timestamp: Mapped[float] = mapped_column(Double)
    payload: Mapped[bytes] = mapped_column(LargeBinary)


class SnapshotRecord(Base):
    """The latest snapshot of one entity (at most one row per entity)."""

    __tablename__ = "casty_sa_snapshots"

    entity_id: Mapped[str] = mapped_column(String(MAX_ENTITY_ID_LENGTH), primary_key=True)
    sequence_nr: Mapped[int] = mapped_column(BigInteger)
    timestamp: Mapped[float] = mapped_column(Double)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
