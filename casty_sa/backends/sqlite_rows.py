"""SQLite's limits on a statement, the rows as its statements take them, and its errors.

A write group is one multi-row ``INSERT … VALUES (…), (…)`` when it fits
SQLite's variable limit (:data:`MAX_ROWS` rows, :func:`multi_row` rewrites the
compiled one-row statement); a ``-0.0`` timestamp is stored as SQLite keeps it
(:func:`keep_negative_zero`); a payload over the length limit is named with
that limit (:func:`length_limit`); a failed write's error is read by
:func:`write_failure`, the rule the SQLite dialect registers.
"""

from __future__ import annotations

import functools
import operator
import sqlite3
from collections.abc import Sequence
from typing import Any

from casty_sa.backends.failures import WriteRefused, too_large
from casty_sa.codec import EventRow, Row
from casty_sa.models import SQLITE_NEGATIVE_ZERO, is_negative_zero

__all__ = [
    "MAX_ROWS",
    "flat",
    "flat_events",
    "keep_negative_zero",
    "length_limit",
    "multi_row",
    "write_failure",
]

#: rows per multi-row statement: up to 6 parameters a row, within SQLite's variable limit
MAX_ROWS = min(
    1000, sqlite3.connect(":memory:").getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 6
)

#: SQLite's default SQLITE_LIMIT_LENGTH, for a connection whose own limit cannot be read
_SQLITE_MAX_LENGTH = sqlite3.connect(":memory:").getlimit(sqlite3.SQLITE_LIMIT_LENGTH)


def length_limit(driver_connection: Any) -> int:
    """SQLITE_LIMIT_LENGTH of the connection (aiosqlite's sqlite3 connection), in bytes."""
    try:  # aiosqlite's _conn raises ValueError once the connection is closed
        return int(driver_connection._conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH))
    except (AttributeError, sqlite3.Error, TypeError, ValueError):
        return _SQLITE_MAX_LENGTH


@functools.lru_cache(maxsize=256)
def multi_row(statement: str, rows: int) -> str:
    """``statement`` (one row of ``VALUES``) rewritten for ``rows`` rows."""
    head, sep, rest = statement.partition("VALUES (")
    depth, end = 1, -1
    while depth and end + 1 < len(rest):  # the row's closing parenthesis (it may hold a subquery)
        end += 1
        depth += {"(": 1, ")": -1}.get(rest[end], 0)
    if not sep or depth or "VALUES (" in rest:
        raise AssertionError(f"unexpected statement shape: {statement}")
    row = "(" + rest[: end + 1]
    return head + "VALUES " + ", ".join([row] * rows) + rest[end + 1 :]


def flat(rows: Sequence[Row]) -> list[Any]:
    """The values of ``rows`` in one list, as a multi-row statement binds them."""
    return [value for row in rows for value in row]


def flat_events(rows: Sequence[EventRow]) -> list[Any]:
    """:func:`flat` for the events insert: each row ends with its place in the statement,
    from 1 (see :func:`casty_sa.ordering.numbered_insert`)."""
    return [value for step, row in enumerate(rows, 1) for value in (*row, step)]


_TIMESTAMP = operator.itemgetter(2)


def keep_negative_zero[R: (Row, EventRow)](rows: Sequence[R]) -> Sequence[R]:
    """``rows`` with a ``-0.0`` timestamp as SQLite keeps it (rare: a copy only then)."""
    if 0.0 not in map(_TIMESTAMP, rows):  # -0.0 == 0.0; a scan in C, no copy
        return rows
    return [_zero_kept(row) for row in rows]


def _zero_kept(row: Any) -> Any:
    """A row (of either shape) whose ``-0.0`` timestamp is stored as SQLite keeps it."""
    return (*row[:2], SQLITE_NEGATIVE_ZERO, *row[3:]) if is_negative_zero(row[2]) else row


#: SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_UNIQUE, SQLITE_CONSTRAINT_NOTNULL
_SQLITE_PRIMARY_KEY, _SQLITE_UNIQUE, _SQLITE_NOT_NULL = 1555, 2067, 1299
#: the columns of the events' primary key, as SQLite names them in a violation's message
_KEY_COLUMNS = "casty_sa_events.entity_id, casty_sa_events.sequence_nr"
#: SQLite primary result codes: SQLITE_NOMEM, SQLITE_IOERR. Raised by a statement that
#: commits, they may come after the commit frame reached the WAL (its fsync failed, the
#: wal-index could not be updated): the commit may be on disk, so the outcome is unknown.
_SQLITE_MAYBE_COMMITTED = frozenset({7, 10})
_SQLITE_TOOBIG = 18


def write_failure(exc: Exception, max_length: int | None) -> BaseException | bool:
    """sqlite3's error of a failed write (see ``WriteFailureRule``)."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if code is not None else None
    if isinstance(exc, sqlite3.IntegrityError):
        return WriteRefused(exc, duplicate=_sequence_nr_taken(code, str(exc)))
    if isinstance(exc, sqlite3.DataError) or primary == _SQLITE_TOOBIG:
        return too_large("a payload (or its row)", max_length, str(exc))
    # pysqlite's own errors (no result code) come before SQLite ran anything
    return isinstance(exc, sqlite3.Error) and primary not in _SQLITE_MAYBE_COMMITTED


def _sequence_nr_taken(code: int | None, message: str) -> bool:
    """Whether an integrity error is a sequence number taken: stored, or deleted.

    SQLite reports a primary key's violation as such; a key made a ``UNIQUE`` index (an
    application's own table) is known by its columns; a deleted number is a ``NULL``
    sequence number (see :func:`casty_sa.ordering.unless_deleted`). The global order's
    unique index, or any other constraint, refused the rows for another reason: not a
    sequence conflict.

    Examples
    --------
    >>> _sequence_nr_taken(1555, "UNIQUE constraint failed: casty_sa_events.entity_id, "
    ...                    "casty_sa_events.sequence_nr")
    True
    >>> _sequence_nr_taken(1299, "NOT NULL constraint failed: casty_sa_events.sequence_nr")
    True
    >>> _sequence_nr_taken(2067, "UNIQUE constraint failed: casty_sa_events.era, "
    ...                    "casty_sa_events.transaction_id, casty_sa_events.position")
    False
    """
    if code == _SQLITE_PRIMARY_KEY:
        return True
    if code == _SQLITE_NOT_NULL:
        return message.endswith("failed: casty_sa_events.sequence_nr")
    return code == _SQLITE_UNIQUE and message.endswith(f"failed: {_KEY_COLUMNS}")
