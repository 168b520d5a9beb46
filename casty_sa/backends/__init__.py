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
- :mod:`~casty_sa.backends.sqlite` (with :mod:`~casty_sa.backends.sqlite_file`) and
  :mod:`~casty_sa.backends.postgresql`: one module per dialect.

A dialect is one module and one line in :data:`BACKENDS`, the registry
:func:`backend_for` looks the engine's dialect up in::

    backend = backend_for(engine, schema=None, hold_writes=True, hold_linger=0.01)
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from casty_sa.backends.base import Backend, BackendSettings
from casty_sa.backends.failures import (
    ConnectionLost,
    Contended,
    WriteRefused,
    classify_write_failure,
)
from casty_sa.backends.postgresql import PostgresBackend
from casty_sa.backends.sqlite import SqliteBackend
from casty_sa.engine import Timeouts
from casty_sa.errors import UnsupportedDatabase

__all__ = [
    "BACKENDS",
    "Backend",
    "ConnectionLost",
    "Contended",
    "PostgresBackend",
    "SqliteBackend",
    "WriteRefused",
    "backend_for",
    "classify_write_failure",
]

#: The backend of each SQLAlchemy dialect name casty-sa supports: a class taking the
#: engine, the schema and the settings.
BACKENDS: dict[str, Callable[[AsyncEngine, str | None, BackendSettings], Backend]] = {
    "postgresql": PostgresBackend,
    "sqlite": SqliteBackend,
}

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
    backend = BACKENDS.get(name)
    if backend is None:
        raise UnsupportedDatabase(
            f"casty-sa has no backend for the {name!r} dialect (of {engine.url.drivername!r}); "
            f"it supports {' and '.join(sorted(BACKENDS))}"
        )
    settings = BackendSettings(
        timeouts=timeouts or Timeouts(), hold_writes=hold_writes, hold_linger=hold_linger
    )
    return backend(engine, schema, settings)
