"""Typed errors raised by casty-sa.

Every error derives from :class:`JournalError`, so an application can catch
the whole family in one ``except`` clause, and each message says what went
wrong and what to do about it. No message ever contains a database password.
"""

from __future__ import annotations

__all__ = [
    "CommitOutcomeUnknown",
    "DatabaseAccessDenied",
    "DatabaseFileReplaced",
    "DatabaseUnavailable",
    "DeletionRefused",
    "DriverNotInstalled",
    "HandlerEndedTransaction",
    "HandlerOverran",
    "InvalidEventError",
    "JournalClosed",
    "JournalError",
    "PayloadDecodeError",
    "PayloadEncodeError",
    "ProjectionBusy",
    "ProjectionError",
    "ProjectionFailed",
    "ProjectionLeaseLost",
    "SchemaError",
    "SequenceConflict",
    "UnsupportedDatabase",
]


class JournalError(Exception):
    """Base class of every error raised by casty-sa.

    Examples
    --------
    >>> issubclass(SequenceConflict, JournalError)
    True
    """


class SequenceConflict(JournalError):
    """A sequence number is already stored for this entity, or was deleted.

    Raised by ``persist`` when another writer (a second node running the same
    entity, or a replayed command) already stored one of the call's sequence
    numbers, or when it is at or below the highest number deleted of the entity
    (``delete_events``: a number is never used twice). Nothing of the failed call
    is stored. casty stops the entity; its next message re-activates it from the
    journal, which then includes the other writer's events.

    Parameters
    ----------
    entity_id : str
        The entity whose history already holds the sequence number.
    sequence_nr : int
        The lowest sequence number of the call that is already stored (the call's
        lowest when the number was deleted).

    Examples
    --------
    >>> err = SequenceConflict("acct-1", 7)
    >>> (err.entity_id, err.sequence_nr)
    ('acct-1', 7)
    """

    def __init__(self, entity_id: str, sequence_nr: int) -> None:
        self.entity_id = entity_id
        self.sequence_nr = sequence_nr
        super().__init__(
            f"entity {entity_id!r} already used sequence number {sequence_nr} (an event "
            "is stored with it, or one was and has been deleted: a number is never used "
            "twice); nothing of this persist call was stored. Another writer got there "
            "first: reload the entity from the journal before writing again."
        )

    def __reduce__(self) -> tuple[type[SequenceConflict], tuple[str, int]]:
        return (type(self), (self.entity_id, self.sequence_nr))


class DeletionRefused(JournalError):
    """A deletion of events beyond the entity's latest snapshot, refused: nothing deleted.

    Recovery starts from the latest snapshot and replays the events after it; events
    deleted beyond it would leave the entity to recover without them. Snapshot first,
    or pass ``force=True`` to delete anyway.

    Examples
    --------
    >>> err = DeletionRefused("acct-1", 9, 5)
    >>> (err.entity_id, err.sequence_nr, err.snapshot_sequence_nr)
    ('acct-1', 9, 5)
    """

    def __init__(self, entity_id: str, sequence_nr: int, snapshot_sequence_nr: int | None) -> None:
        self.entity_id = entity_id
        self.sequence_nr = sequence_nr
        self.snapshot_sequence_nr = snapshot_sequence_nr
        held = (
            "it has no snapshot"
            if snapshot_sequence_nr is None
            else f"its latest snapshot is at sequence number {snapshot_sequence_nr}"
        )
        super().__init__(
            f"refused to delete the events of entity {entity_id!r} up to sequence number "
            f"{sequence_nr}: {held}, so it could not recover without them; nothing was "
            "deleted. Delete up to the snapshot, save a newer one first, or pass force=True"
        )

    def __reduce__(self) -> tuple[type[DeletionRefused], tuple[str, int, int | None]]:
        return (type(self), (self.entity_id, self.sequence_nr, self.snapshot_sequence_nr))


class InvalidEventError(JournalError, ValueError):
    """An entity id, sequence number or event batch that the journal refuses.

    Nothing of the call is stored. Entity ids must be non-empty strings of at
    most :data:`casty_sa.MAX_ENTITY_ID_LENGTH` characters, encodable as UTF-8
    and free of NUL; sequence numbers must be 64-bit integers >= 1, strictly
    increasing within one call.
    """


class PayloadEncodeError(JournalError):
    """The serializer failed on an event or snapshot; nothing was stored.

    Parameters
    ----------
    entity_id : str
        The entity being written.
    sequence_nr : int
        The sequence number of the event (or snapshot) that failed.
    """

    def __init__(self, entity_id: str, sequence_nr: int, cause: BaseException) -> None:
        self.entity_id = entity_id
        self.sequence_nr = sequence_nr
        super().__init__(
            f"could not serialize the payload of entity {entity_id!r} at sequence "
            f"number {sequence_nr}: {type(cause).__name__}: {cause}. Nothing of this "
            "call was stored; make the object serializable by the journal's serializer "
            "(pickle by default) or pass serialize=/deserialize= to SAJournal."
        )


class PayloadDecodeError(JournalError):
    """A stored payload could not be turned back into an object.

    Typical causes: the event class was renamed or moved since it was stored,
    or the journal is configured with a different serializer than the one that
    wrote the row.

    Parameters
    ----------
    entity_id : str
        The entity whose row failed to decode.
    sequence_nr : int
        The sequence number of that row.
    """

    def __init__(
        self, entity_id: str, sequence_nr: int, cause: BaseException, *, what: str = "event"
    ) -> None:
        self.entity_id = entity_id
        self.sequence_nr = sequence_nr
        super().__init__(
            f"could not decode the stored {what} of entity {entity_id!r} at sequence "
            f"number {sequence_nr}: {type(cause).__name__}: {cause}. If the class was "
            "renamed or moved, keep an alias under its old name (or a custom "
            "deserialize= that maps it); if the serializer changed, configure the one "
            "that wrote the data."
        )


class SchemaError(JournalError):
    """The database has no casty-sa tables, or they are not at the expected revision.

    The message names the revision found and the one expected, and the command
    that brings the database to head.
    """


class UnsupportedDatabase(JournalError):
    """The URL or engine names a database or driver casty-sa does not support.

    Supported: SQLite through ``aiosqlite``, PostgreSQL through ``asyncpg`` or
    ``psycopg`` (3), MySQL and MariaDB through ``asyncmy`` or ``aiomysql``.
    """


class DriverNotInstalled(UnsupportedDatabase):
    """The URL names a supported driver that is not installed; the message names the
    extra of casty-sa that installs it (``pip install 'casty-sa[psycopg]'``)."""


class DatabaseUnavailable(JournalError):
    """The database could not be reached, or a statement failed or timed out.

    Nothing of a failed write was committed (when the outcome cannot be known,
    :class:`CommitOutcomeUnknown` is raised instead). The journal stays usable:
    later calls open fresh connections.
    """


class DatabaseAccessDenied(DatabaseUnavailable):
    """The database refused the journal: a wrong password, an unknown role, a login the
    server does not allow, a database or SQLite directory that does not exist, a missing
    privilege.

    Nothing of the failed call was stored. Unlike its parent class this is not
    transient: calling again fails the same way until the configuration (URL,
    role, grants, directory) is fixed, so the journal does not retry it and a
    retry loop should not either. A subclass of :class:`DatabaseUnavailable`,
    so code that already catches that one still does.
    """


class CommitOutcomeUnknown(DatabaseUnavailable):
    """The write failed after its commit had started.

    The statement that commits (a single autocommit statement or ``COMMIT``)
    was sent when the connection was lost, the client timed out, or the
    database hit an I/O error while committing (SQLite: an ``fsync`` of the
    ``-wal`` that failed). The events may or may not be stored. Do not re-send
    them blindly: reload the entity (``load``) to see whether they are there.
    casty does this on its own, since the failed entity stops and re-activates
    from the journal.
    """


class DatabaseFileReplaced(JournalError):
    """The SQLite file the journal opened is no longer the file at its path.

    It was deleted, replaced (a backup restored over it) or its directory was
    removed while the journal ran. The journal's connections still hold the old
    file, which no later process will open, so nothing the journal writes from
    then on is stored at the path: the write that found out says whether it went
    into the old file (committed there, NOT stored at the path) or failed. Every
    later call of the journal fails with this error instead of writing into the
    old file or silently starting a new journal at the path; restart the node.
    """


class JournalClosed(JournalError):
    """The journal was used after ``close()``; create a new ``SAJournal``.

    Examples
    --------
    >>> str(JournalClosed())
    'this SAJournal is closed; create a new one'
    """

    def __init__(self, message: str = "this SAJournal is closed; create a new one") -> None:
        super().__init__(message)


class ProjectionError(JournalError):
    """Base class of the errors of a projection (:mod:`casty_sa.projections`)."""


class ProjectionLeaseLost(ProjectionError):
    """A projection's worker no longer holds the lease of its slice.

    Another worker took the slice over (this one's lease had expired: it was
    frozen or cut off from the database), or the projection was reset. The batch
    in hand was rolled back, NOTHING of it is stored; the worker goes back to
    waiting for a free slice and resumes from the stored offset.
    """


class ProjectionBusy(ProjectionError):
    """``catch_up`` found a slice whose lease another live worker holds.

    That worker applies the slice's events; wait for it, or stop it first.
    """


class ProjectionFailed(ProjectionError):
    """A projection with ``on_error="stop"`` stopped at an event its handler failed on.

    Nothing of the failed batch is stored and the offset stands just before the
    event named in the message (entity id, sequence number, offset); the cause is
    chained. Fix the handler or the data and start the projection again: it
    resumes with that event.
    """


class HandlerEndedTransaction(ProjectionError):
    """The handler committed, rolled back or closed the batch's session."""

    def __init__(self) -> None:
        super().__init__(
            "the handler must not commit, roll back or close the session it is given: the "
            "projection commits its writes with the offset (a savepoint is fine)"
        )


class HandlerOverran(ProjectionError):
    """The batch's handler calls ran past the batch's lease (``lease_seconds``)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"the handler was still running {seconds:g} s after the batch began "
            "(lease_seconds): a batch holds its slice's row (and on SQLite the file's write "
            "lock) until it ends, so it is cut there; raise lease_seconds for slower handlers"
        )
