"""What a failed write means for what was stored: the one place that decides.

A backend's ``write`` turns what the driver raised into one of the exceptions
here with :func:`classify_write_failure`; the journal acts on them (isolates the
caller whose rows were refused, sends a contended or unsent write again, reports
an unknown commit outcome)::

    try:
        await conn.execute(insert, *rows)
    except BaseException as exc:
        failure = classify_write_failure(exc, committing=True, dialect="postgresql")
        if failure is exc:
            raise
        raise failure from exc
"""

from __future__ import annotations

import sqlite3

__all__ = [
    "ConnectionLost",
    "Contended",
    "PayloadTooLarge",
    "WriteRefused",
    "classify_write_failure",
]


class WriteRefused(Exception):
    """The database refused the rows themselves (a duplicate key, a bad value).

    Nothing of the transaction was stored. ``duplicate`` tells a primary-key
    violation (a sequence number already stored) from other refusals.
    """

    def __init__(self, cause: BaseException, *, duplicate: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.duplicate = duplicate


class Contended(Exception):
    """The database rolled the whole transaction back to break a deadlock or a
    serialization conflict with another transaction.

    Nothing of it was stored, and the same write may well succeed when sent again.
    """

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class ConnectionLost(Exception):
    """The write failed in a way the database did not answer for.

    ``during_commit`` False: nothing reached the database (the driver refused to
    send it), so the write may go again on another connection. True: the
    statement that commits had been sent (an autocommit statement or
    ``COMMIT``) when the connection broke, timed out or the database hit an
    I/O error, so it may be stored.
    """

    def __init__(self, cause: BaseException, *, during_commit: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.during_commit = during_commit


class PayloadTooLarge(Exception):
    """A value or row over the database's length limit (the caller's refusal, nothing sent)."""


#: deadlock_detected, serialization_failure: the server rolled the whole transaction back
#: (a single autocommit statement, or the explicit transaction whose COMMIT failed)
_ROLLED_BACK = frozenset({"40P01", "40001"})

#: SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_UNIQUE: a sequence number already stored
_SQLITE_DUPLICATE = frozenset({1555, 2067})
#: SQLite primary result codes: SQLITE_NOMEM, SQLITE_IOERR. Raised by a statement that
#: commits, they may come after the commit frame reached the WAL (its fsync failed, the
#: wal-index could not be updated): the commit may be on disk, so the outcome is unknown.
_SQLITE_MAYBE_COMMITTED = frozenset({7, 10})
_SQLITE_TOOBIG = 18


def classify_write_failure(
    exc: BaseException, *, committing: bool, dialect: str, max_length: int | None = None
) -> BaseException:
    """What a failed write means for what was stored: the one place that decides.

    Parameters
    ----------
    exc : BaseException
        What the driver raised.
    committing : bool
        Whether the statement that commits had been sent: a single autocommit
        statement, or the ``COMMIT`` of an explicit transaction. Before that,
        the database rolls the transaction back (or never saw it).
    dialect : str
        ``sqlite`` or ``postgresql``.
    max_length : int | None
        SQLite's length limit on the connection, for the message of a refusal.

    Returns
    -------
    BaseException
        :class:`WriteRefused` when the database refused the rows themselves
        (nothing stored; the journal isolates the caller), :class:`Contended` when
        it rolled the transaction back to break a deadlock (nothing stored; safe to
        send again), :class:`ConnectionLost`
        when nothing was sent (``during_commit=False``) or when the commit was
        sent and the database did not answer with a refusal (``during_commit=True``:
        it may be stored), or ``exc`` itself: nothing stored.
    """
    if not isinstance(exc, Exception):
        return exc  # a cancelled caller sees its cancellation
    if dialect == "postgresql":
        import asyncpg

        if isinstance(exc, asyncpg.UniqueViolationError):
            return WriteRefused(exc, duplicate=True)
        if isinstance(exc, asyncpg.DataError):  # a value refused, by asyncpg or the server
            return WriteRefused(exc, duplicate=False)
        if getattr(exc, "sqlstate", None) in _ROLLED_BACK:
            return Contended(exc)  # the server rolled the transaction back whole
        if _never_sent(exc):
            return ConnectionLost(exc, during_commit=False)
        sqlstate = getattr(exc, "sqlstate", None) or ""
        # an error the server answered the statement with (a timeout, a cancel, a failed
        # deferred check) means it rolled the transaction back; a broken connection, a
        # client-side timeout or a protocol error leaves the commit's outcome open
        answered = isinstance(exc, asyncpg.PostgresError) and not (
            isinstance(exc, asyncpg.PostgresConnectionError) or sqlstate.startswith(("08", "57P"))
        )
    else:
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if code is not None else None
        if isinstance(exc, sqlite3.IntegrityError):
            return WriteRefused(exc, duplicate=code in _SQLITE_DUPLICATE)
        if isinstance(exc, sqlite3.DataError) or primary == _SQLITE_TOOBIG:
            return _too_large("a payload (or its row)", max_length, str(exc))
        # pysqlite's own errors (no result code) come before SQLite ran anything
        answered = isinstance(exc, sqlite3.Error) and primary not in _SQLITE_MAYBE_COMMITTED
    if committing and not answered:
        return ConnectionLost(exc, during_commit=True)
    return exc


def _never_sent(exc: BaseException) -> bool:
    """Whether asyncpg refused an operation before sending anything to the server.

    It checks its protocol state first: a connection the server has just ended (its
    FATAL message read, the protocol left consuming it) or one already closed fails
    there, so the statement (and any COMMIT) never left the client.
    """
    import asyncpg

    text = str(exc)
    if isinstance(exc, asyncpg.InternalClientError):
        return text.startswith("cannot switch to state")
    if isinstance(exc, asyncpg.InterfaceError):
        return text.startswith("cannot perform operation") or text == "connection is closed"
    return False


def _too_large(what: str, limit: int | None, detail: str = "") -> WriteRefused:
    """The refusal of a value over SQLite's length limit (nothing stored; the caller's alone)."""
    on_connection = f" ({limit:,} bytes on this connection)" if limit else ""
    message = f"{what} is over SQLite's length limit SQLITE_LIMIT_LENGTH{on_connection}"
    return WriteRefused(
        PayloadTooLarge(f"{message}: {detail}" if detail else message), duplicate=False
    )
