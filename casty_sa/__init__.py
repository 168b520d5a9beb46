"""casty-sa: the SQLAlchemy event journal for casty's event-sourced actors.

Replace ``SqliteJournal("x.db")`` with ``SAJournal("sqlite:///x.db")`` or
``SAJournal("postgresql://…")``: the same ``EventJournal`` protocol, on tables
a DBA manages with Alembic.

Examples
--------
>>> from casty import JournalKind
>>> SAJournal("sqlite:///bank.db").kind is JournalKind.local
True
>>> SAJournal("postgresql://app:secret@db/bank")
SAJournal('postgresql+asyncpg://app:***@db/bank', kind=centralized)
"""

from casty_sa.envelopes import EventEnvelope
from casty_sa.errors import (
    CommitOutcomeUnknown,
    DatabaseAccessDenied,
    DatabaseFileReplaced,
    DatabaseUnavailable,
    DeletionRefused,
    DriverNotInstalled,
    HandlerEndedTransaction,
    HandlerOverran,
    InvalidEventError,
    JournalClosed,
    JournalError,
    PayloadDecodeError,
    PayloadEncodeError,
    ProjectionBusy,
    ProjectionError,
    ProjectionFailed,
    ProjectionLeaseLost,
    SchemaError,
    SequenceConflict,
    UnsupportedDatabase,
)
from casty_sa.event_stream import EventStream
from casty_sa.journal import MAX_SEQUENCE_NR, SAJournal
from casty_sa.migrate import current, downgrade, upgrade
from casty_sa.models import (
    MAX_ENTITY_ID_LENGTH,
    NAMING_CONVENTION,
    VERSION_TABLE,
    Base,
    EventRecord,
    SnapshotRecord,
    TombstoneRecord,
    metadata,
)
from casty_sa.ordering import InvalidOffset
from casty_sa.projections import Projection, ProjectionStatus, SliceCountChanged, SliceStatus
from casty_sa.replication import LocalReplication
from casty_sa.retention import Cut, Forgotten
from casty_sa.revisions import exclude_journal_tables, head_revision
from casty_sa.serializers import JsonSerializer, SerializationError, UnknownTypeError

__all__ = [
    "MAX_ENTITY_ID_LENGTH",
    "MAX_SEQUENCE_NR",
    "NAMING_CONVENTION",
    "VERSION_TABLE",
    "Base",
    "CommitOutcomeUnknown",
    "Cut",
    "DatabaseAccessDenied",
    "DatabaseFileReplaced",
    "DatabaseUnavailable",
    "DeletionRefused",
    "DriverNotInstalled",
    "EventEnvelope",
    "EventRecord",
    "EventStream",
    "Forgotten",
    "HandlerEndedTransaction",
    "HandlerOverran",
    "InvalidEventError",
    "InvalidOffset",
    "JournalClosed",
    "JournalError",
    "JsonSerializer",
    "LocalReplication",
    "PayloadDecodeError",
    "PayloadEncodeError",
    "Projection",
    "ProjectionBusy",
    "ProjectionError",
    "ProjectionFailed",
    "ProjectionLeaseLost",
    "ProjectionStatus",
    "SAJournal",
    "SchemaError",
    "SequenceConflict",
    "SerializationError",
    "SliceCountChanged",
    "SliceStatus",
    "SnapshotRecord",
    "TombstoneRecord",
    "UnknownTypeError",
    "UnsupportedDatabase",
    "current",
    "downgrade",
    "exclude_journal_tables",
    "head_revision",
    "metadata",
    "upgrade",
]
