"""SQLite's limits on a statement, and the rows as SQLite's statements take them.

A write group is one multi-row ``INSERT … VALUES (…), (…)`` when it fits
SQLite's variable limit (:data:`MAX_ROWS` rows, :func:`multi_row` rewrites the
compiled one-row statement); a ``-0.0`` timestamp is stored as SQLite keeps it
(:func:`keep_negative_zero`); a payload over the length limit is named with
that limit (:func:`length_limit`).
"""

from __future__ import annotations

import functools
import operator
import sqlite3
from collections.abc import Sequence
from typing import Any

from casty_sa.codec import Row
from casty_sa.models import SQLITE_NEGATIVE_ZERO, is_negative_zero

__all__ = ["MAX_ROWS", "flat", "keep_negative_zero", "length_limit", "multi_row"]

#: rows per multi-row statement: 4 parameters a row, within SQLite's variable limit
MAX_ROWS = min(
    1000, sqlite3.connect(":memory:").getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 4
)
_ONE_ROW = "VALUES (?, ?, ?, ?)"

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
    head, sep, tail = statement.partition(_ONE_ROW)
    if not sep or _ONE_ROW in tail:
        raise AssertionError(f"unexpected statement shape: {statement}")
    return head + "VALUES " + ", ".join(["(?, ?, ?, ?)"] * rows) + tail


def flat(rows: Sequence[Row]) -> list[Any]:
    """The values of ``rows`` in one list, as a multi-row statement binds them."""
    return [value for row in rows for value in row]


_TIMESTAMP = operator.itemgetter(2)


def keep_negative_zero(rows: Sequence[Row]) -> Sequence[Row]:
    """``rows`` with a ``-0.0`` timestamp as SQLite keeps it (rare: a copy only then)."""
    if 0.0 not in map(_TIMESTAMP, rows):  # -0.0 == 0.0; a scan in C, no copy
        return rows
    return [
        (row[0], row[1], SQLITE_NEGATIVE_ZERO, row[3]) if is_negative_zero(row[2]) else row  # type: ignore[misc]
        for row in rows
    ]
