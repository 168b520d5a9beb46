"""Whether a SQLite URL names a file that exists: commands that only read refuse a missing one."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from sqlalchemy.ext.asyncio import AsyncEngine

from casty_sa.errors import DatabaseUnavailable
from casty_sa.urls import UrlLike, is_memory_sqlite, safe_url, to_async_url

__all__ = ["missing_sqlite_file", "require_existing_database"]


def missing_sqlite_file(target: UrlLike | AsyncEngine) -> Path | None:
    """The file of a SQLite URL when that file does not exist, else ``None``.

    Connecting to a missing SQLite file creates an empty one; commands that
    only read check this first, so a typo in a path does not leave a file behind.

    Examples
    --------
    >>> missing_sqlite_file("sqlite:///no/such/dir/journal.db")
    PosixPath('no/such/dir/journal.db')
    >>> missing_sqlite_file("postgresql://db/bank") is None
    True
    """
    if isinstance(target, AsyncEngine):
        return None
    url = to_async_url(target)
    if url.get_backend_name() != "sqlite" or is_memory_sqlite(url) or not url.database:
        return None
    database = url.database
    if database.startswith("file:"):
        return None  # a URI filename: SQLite's own options decide
    path = Path(database)
    return None if path.exists() else path


def require_existing_database(target: UrlLike | AsyncEngine) -> None:
    """Raise ``DatabaseUnavailable`` for a SQLite URL naming a file that does not exist.

    Raises
    ------
    DatabaseUnavailable
        The SQLite file is missing.
    """
    missing = missing_sqlite_file(target)
    if missing is not None:
        raise DatabaseUnavailable(
            f"{safe_url(to_async_url(cast(UrlLike, target)))}: no such SQLite file {missing}"
        )
