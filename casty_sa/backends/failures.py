"""What a failed write means for what was stored: the verdicts, and the one rule above them.

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

from collections.abc import Callable

from casty_sa.dialects import find

__all__ = [
    "ConnectionLost",
    "Contended",
    "PayloadTooLarge",
    "WriteFailureRule",
    "WriteRefused",
    "classify_write_failure",
    "too_large",
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


#: A dialect's reading of a failed write (see :func:`classify_write_failure`): the verdict
#: itself (a refusal, a contention, a write never sent), or whether the database answered
#: the statement with its error (``True``: it rolled the transaction back, nothing stored;
#: ``False``: a committing statement may have committed). Called with the error and, on
#: SQLite, the connection's length limit for a refusal's message.
type WriteFailureRule = Callable[[Exception, int | None], BaseException | bool]


def classify_write_failure(
    exc: BaseException, *, committing: bool, dialect: str, max_length: int | None = None
) -> BaseException:
    """What a failed write means for what was stored: the one place that decides.

    The dialect's rule reads the driver's error; what follows from it (a
    committing statement the database did not answer may have committed) is
    decided here, the same for every dialect.

    Parameters
    ----------
    exc : BaseException
        What the driver raised.
    committing : bool
        Whether the statement that commits had been sent: a single autocommit
        statement, or the ``COMMIT`` of an explicit transaction. Before that,
        the database rolls the transaction back (or never saw it).
    dialect : str
        The dialect whose registered rule (``Dialect.write_failure``) reads ``exc``.
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
    rule = _rule_of(dialect)
    answered = rule(exc, max_length)
    if isinstance(answered, BaseException):
        return answered
    if committing and not answered:
        return ConnectionLost(exc, during_commit=True)
    return exc


def too_large(what: str, limit: int | None, detail: str = "") -> WriteRefused:
    """The refusal of a value over SQLite's length limit (nothing stored; the caller's alone)."""
    on_connection = f" ({limit:,} bytes on this connection)" if limit else ""
    message = f"{what} is over SQLite's length limit SQLITE_LIMIT_LENGTH{on_connection}"
    return WriteRefused(
        PayloadTooLarge(f"{message}: {detail}" if detail else message), duplicate=False
    )


def _rule_of(dialect: str) -> WriteFailureRule:
    """The failed-write rule the dialect registered (none: refused, never guessed)."""
    found = find(dialect)
    if found is None or found.write_failure is None:
        raise ValueError(f"no rule for failed writes is registered for dialect {dialect!r}")
    return found.write_failure
