"""The journal's hot paths: Core statements compiled once, run on the pooled driver connection.

Every statement is a SQLAlchemy Core construct built from the declarative
tables and compiled once per dialect (and schema) when the journal starts. At
call time the rows go straight to the driver connection that SQLAlchemy's pool
hands out, so a ``persist`` pays for the database work and little else: no
per-call compilation, ORM session or greenlet hop per statement. The pool,
its checkout and the connect-time pragmas stay SQLAlchemy's.

The package holds one module per job:

- :mod:`~casty_sa.backends.base`: the :class:`Backend` interface and what dialects share;
- :mod:`~casty_sa.backends.pooled`: connections from the pool (gate, ping, kept writer);
- :mod:`~casty_sa.backends.failures`: what a failed write means for what was stored;
- :mod:`~casty_sa.backends.sqlite` (with :mod:`~casty_sa.backends.sqlite_file` and
  :mod:`~casty_sa.backends.sqlite_rows`), :mod:`~casty_sa.backends.postgresql` and
  :mod:`~casty_sa.backends.mysql` (with :mod:`~casty_sa.backends.mysql_reads`): one
  module per dialect.

Adding a dialect takes one module here, ``casty_sa/backends/<name>.py``,
holding its backend (a :class:`~casty_sa.backends.pooled.PooledBackend` or a
:class:`Backend`), its engine factory, its rule for reading a failed write's error
(:data:`~casty_sa.backends.failures.WriteFailureRule`) and, at import, one
:func:`casty_sa.dialects.register` call with a :class:`~casty_sa.dialects.Dialect`
naming them with its URL facts (name, aliases, async driver, journal kind); and
one import line below. Nothing else changes: :func:`casty_sa.urls.to_async_url`,
:func:`~casty_sa.urls.kind_of`, :func:`casty_sa.engine.build_engine` and
:func:`backend_for` look it up in that registry. (A few choices outside the
package still name SQLite or PostgreSQL, and a new dialect takes their
other branch: ``schema=`` is PostgreSQL's, a journal migrates on start by
default on SQLite, a migration on SQLite begins ``IMMEDIATE``, an import
upserts with PostgreSQL's ``insert`` on PostgreSQL and SQLite's elsewhere.)

::

    backend = backend_for(engine, schema=None, hold_writes=True, hold_linger=0.01)
"""

from __future__ import annotations

from typing import cast

from sqlalchemy.ext.asyncio import AsyncEngine

from casty_sa.backends.base import Backend, BackendSettings
from casty_sa.backends.failures import (
    ConnectionLost,
    Contended,
    WriteRefused,
    classify_write_failure,
)

# Each dialect module registers its dialect when imported. Importing them here makes every
# dialect known once anything in casty_sa is imported: a submodule's import runs the
# package's __init__ first, which imports the journal, which imports this package; so
# to_async_url, kind_of and build_engine find them without a journal being built. SQLite
# first: messages name the supported databases in registration order.
# isort: off
from casty_sa.backends.sqlite import SqliteBackend
from casty_sa.backends.postgresql import PostgresBackend
from casty_sa.backends.mysql import MySQLBackend

# isort: on
from casty_sa.dialects import Timeouts, find, supported
from casty_sa.errors import UnsupportedDatabase

__all__ = [
    "Backend",
    "ConnectionLost",
    "Contended",
    "MySQLBackend",
    "PostgresBackend",
    "SqliteBackend",
    "WriteRefused",
    "backend_for",
    "classify_write_failure",
]

_DEFAULTS = BackendSettings()


def backend_for(
    engine: AsyncEngine,
    schema: str | None,
    timeouts: Timeouts | None = None,
    *,
    hold_writes: bool = _DEFAULTS.hold_writes,
    hold_linger: float = _DEFAULTS.hold_linger,
) -> Backend:
    """The backend for an engine's dialect, with the journal's settings.

    Parameters
    ----------
    engine : AsyncEngine
        The journal's engine.
    schema : str | None
        The schema of the tables (``None``: the default).
    timeouts : Timeouts | None
        Bound PostgreSQL's statements and liveness pings (``None``: the defaults).
    hold_writes, hold_linger
        See :class:`~casty_sa.backends.base.BackendSettings`.

    Raises
    ------
    UnsupportedDatabase
        No backend is registered for the engine's dialect.
    """
    name = engine.dialect.name
    dialect = find(name)
    if dialect is None:
        raise UnsupportedDatabase(
            f"casty-sa has no backend for the {name!r} dialect (of {engine.url.drivername!r}); "
            f"it supports {supported(names=True)}"
        )
    settings = BackendSettings(
        timeouts=timeouts or Timeouts(), hold_writes=hold_writes, hold_linger=hold_linger
    )
    return cast(Backend, dialect.backend(engine, schema, settings))
