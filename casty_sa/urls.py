"""From a connection string to an async SQLAlchemy URL and a journal kind.

A plain ``sqlite:///f.db`` picks ``aiosqlite``, a plain ``postgresql://``
picks ``asyncpg``. A sync-only driver (``pysqlite``, ``psycopg2``) or another
database is refused with :class:`~casty_sa.errors.UnsupportedDatabase`.

Examples
--------
>>> to_async_url("sqlite:///bank.db").drivername
'sqlite+aiosqlite'
>>> to_async_url("postgresql://app:secret@db/bank").drivername
'postgresql+asyncpg'
>>> kind_of(to_async_url("postgresql://db/bank")).value
'centralized'
>>> safe_url("postgresql://app:secret@db/bank")
'postgresql://app:***@db/bank'
"""

from __future__ import annotations

from casty import JournalKind
from sqlalchemy import URL, make_url
from sqlalchemy.exc import ArgumentError

from casty_sa.errors import UnsupportedDatabase

__all__ = ["is_memory_sqlite", "kind_of", "safe_url", "to_async_url"]

#: backend name -> (async driver to use, drivers accepted, journal kind)
_BACKENDS: dict[str, tuple[str, frozenset[str], JournalKind]] = {
    "sqlite": ("aiosqlite", frozenset({"aiosqlite"}), JournalKind.local),
    "postgresql": ("asyncpg", frozenset({"asyncpg"}), JournalKind.centralized),
}
_ALIASES = {"postgres": "postgresql"}


def safe_url(url: str | URL) -> str:
    """Render a URL for messages and logs, with any password masked.

    Parameters
    ----------
    url : str | URL
        The URL to render. A string that does not parse is reduced to its
        scheme, since it may hold a password in a form we cannot find.
    """
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url.split(":", 1)[0] + "://…" if ":" in url else "<unparseable URL>"


def to_async_url(url: str | URL) -> URL:
    """Return the URL with its async driver, or raise ``UnsupportedDatabase``.

    Parameters
    ----------
    url : str | URL
        ``sqlite:///path``, ``sqlite://`` (memory), ``postgresql://…``, or the
        same with an explicit async driver (``+aiosqlite``, ``+asyncpg``).

    Raises
    ------
    UnsupportedDatabase
        For another database, a sync-only driver or an unparseable URL.
    """
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except (ArgumentError, ValueError) as exc:
        raise UnsupportedDatabase(
            f"{safe_url(url)} is not a database URL ({exc}); expected e.g. "
            "'sqlite:///journal.db' or 'postgresql://user@host/dbname'"
        ) from None
    backend, _, driver = parsed.drivername.partition("+")
    backend = _ALIASES.get(backend, backend)
    if backend not in _BACKENDS:
        raise UnsupportedDatabase(
            f"database {backend!r} (in {safe_url(parsed)}) is not supported by casty-sa; "
            "use SQLite ('sqlite:///journal.db') or PostgreSQL ('postgresql://…')"
        )
    default_driver, accepted, _ = _BACKENDS[backend]
    if driver and driver not in accepted:
        raise UnsupportedDatabase(
            f"driver {driver!r} for {backend} is not supported: casty-sa needs an "
            f"async driver; use '{backend}+{default_driver}://…' or plain '{backend}://…'"
        )
    return parsed.set(drivername=f"{backend}+{default_driver}")


def kind_of(url: URL) -> JournalKind:
    """The journal kind of a (normalized) URL: SQLite is local, PostgreSQL centralized."""
    backend = _ALIASES.get(url.get_backend_name(), url.get_backend_name())
    try:
        return _BACKENDS[backend][2]
    except KeyError:
        raise UnsupportedDatabase(
            f"database {backend!r} is not supported by casty-sa; use SQLite or PostgreSQL"
        ) from None


def is_memory_sqlite(url: URL) -> bool:
    """True for an in-memory SQLite URL (``sqlite://`` or ``:memory:``)."""
    if url.get_backend_name() != "sqlite":
        return False
    database = url.database or ""
    return database in ("", ":memory:") or "mode=memory" in database
