"""The registry of the databases casty-sa supports: one :class:`Dialect` record each.

A dialect's module (``casty_sa/backends/<name>.py``) holds all casty-sa knows
about that database and registers it here when it is imported: the URL facts
:func:`casty_sa.urls.to_async_url` and :func:`~casty_sa.urls.kind_of` need, the
engine tuning :func:`casty_sa.engine.build_engine` hands over to, and the
backend :func:`casty_sa.backends.backend_for` builds. This module imports no
other part of casty-sa but its errors, so every layer can look a dialect up.

Examples
--------
>>> find("postgres").name
'postgresql'
>>> find("mariadb").name
'mysql'
>>> find("oracle") is None
True
>>> supported()
'SQLite, PostgreSQL or MySQL/MariaDB'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from casty import JournalKind
from sqlalchemy import URL
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_STATEMENT_TIMEOUT",
    "Dialect",
    "EngineRequest",
    "Timeouts",
    "dialects",
    "find",
    "register",
    "supported",
    "unregister",
]

#: Seconds before a connection attempt fails, and before a statement does (on the client
#: and on the server), unless the call or the URL says otherwise.
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_STATEMENT_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Timeouts:
    """A journal's timeouts in seconds, on a dialect that bounds its calls (PostgreSQL).

    A call's budget is derived from them.

    Parameters
    ----------
    connect : float
        Before a connection attempt fails.
    statement : float
        Before a statement fails.
    """

    connect: float = DEFAULT_CONNECT_TIMEOUT
    statement: float = DEFAULT_STATEMENT_TIMEOUT

    @property
    def budget(self) -> float:
        """A call's budget end to end: it may have to open a connection and run its statement."""
        return self.connect + self.statement

    @property
    def ping(self) -> float:
        """How long a liveness ping may take: a live server answers ``SELECT 1`` well within
        the shorter of the two."""
        return min(self.connect, self.statement)


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """What the caller asks of an engine casty-sa creates; each dialect reads its part.

    Parameters
    ----------
    busy_timeout : float
        SQLite: seconds a writer waits for another process's lock.
    sqlite_synchronous : str
        SQLite: the ``synchronous`` pragma.
    connect_timeout, statement_timeout : float | None
        PostgreSQL: ``None`` takes the URL's, else the default.
    options : dict
        Keyword arguments for ``create_async_engine`` (``connect_args`` excluded);
        they override every default the dialect chooses.
    connect_args : dict
        The caller's ``connect_args``, merged key by key over the dialect's.
    """

    busy_timeout: float
    sqlite_synchronous: str
    connect_timeout: float | None
    statement_timeout: float | None
    options: dict[str, Any] = field(default_factory=dict)
    connect_args: dict[str, Any] = field(default_factory=dict)


#: Creates a dialect's tuned engine for a normalized URL; returns it with the timeouts its
#: calls are bounded by (``None`` on a dialect without them).
type EngineFactory = Callable[[URL, EngineRequest], tuple[AsyncEngine, Timeouts | None]]

#: Builds a dialect's backend from ``(engine, schema, settings)``: a
#: :class:`~casty_sa.backends.base.Backend` (typed loosely here: the backends import this).
type BackendFactory = Callable[[AsyncEngine, str | None, Any], object]


@dataclass(frozen=True, slots=True)
class Dialect:
    """Everything casty-sa knows about one database.

    Parameters
    ----------
    name : str
        SQLAlchemy's name of the database (``engine.dialect.name``, a URL's backend name).
    label : str
        Its name in messages (``"PostgreSQL"``).
    example : str
        A URL shown in messages (``"postgresql://…"``).
    driver : str
        The async driver a plain URL gets (``asyncpg``).
    kind : JournalKind
        What casty learns of the journal: local (one process's) or centralized.
    engine : EngineFactory
        The engine tuned for a journal.
    backend : BackendFactory
        The journal's hot paths on this database.
    drivers : frozenset[str]
        The drivers a URL may name (default: only ``driver``).
    aliases : frozenset[str]
        Other names a URL may give (``postgres``).
    timed : bool
        The journal's calls are bounded by :class:`Timeouts`, on an application's
        engine too.
    url_names : frozenset[str]
        The aliases a URL keeps as it is written, because SQLAlchemy knows them and they
        mean something to it (``mariadb``: the server is MariaDB); other aliases are
        rewritten to ``name``.
    extras : Mapping[str, tuple[str, str]]
        For each driver: the module it imports and the extra of casty-sa that installs it
        (``{"psycopg": ("psycopg", "psycopg")}``), for the message of a missing driver.
    check_url : Callable[[URL], None] | None
        Refuses (with ``UnsupportedDatabase``) a URL of this database casty-sa cannot open.
    write_failure : Callable[[Exception, int | None], BaseException | bool] | None
        Reads the driver's error of a failed write (see
        :data:`casty_sa.backends.failures.WriteFailureRule`); without one, a failed
        write is not classified but refused with ``ValueError``.
    """

    name: str
    label: str
    example: str
    driver: str
    kind: JournalKind
    engine: EngineFactory
    backend: BackendFactory
    drivers: frozenset[str] = frozenset()
    aliases: frozenset[str] = frozenset()
    timed: bool = False
    url_names: frozenset[str] = frozenset()
    extras: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    check_url: Callable[[URL], None] | None = None
    write_failure: Callable[[Exception, int | None], BaseException | bool] | None = None

    def accepts(self, driver: str) -> bool:
        """Whether a URL may name ``driver`` (``""``: none named, the default one)."""
        return not driver or driver == self.driver or driver in self.drivers


#: Every registered dialect in registration order, under its name and each alias.
_REGISTRY: dict[str, Dialect] = {}


def register(dialect: Dialect) -> None:
    """Make ``dialect`` known to every layer; its name and aliases must be new."""
    names = (dialect.name, *sorted(dialect.aliases))
    taken = [name for name in names if name in _REGISTRY]
    if taken:
        raise ValueError(f"dialect name(s) already registered: {', '.join(taken)}")
    for name in names:
        _REGISTRY[name] = dialect


def unregister(name: str) -> Dialect:
    """Forget the dialect called ``name`` (and its aliases); returns it."""
    dialect = _REGISTRY[name]
    for key in (dialect.name, *dialect.aliases):
        del _REGISTRY[key]
    return dialect


def find(name: str) -> Dialect | None:
    """The dialect a URL's backend name (or an alias) or an engine's dialect name means."""
    return _REGISTRY.get(name)


def dialects() -> tuple[Dialect, ...]:
    """Every registered dialect once, in registration order."""
    return tuple({id(d): d for d in _REGISTRY.values()}.values())


def supported(*, examples: bool = False, names: bool = False) -> str:
    """The supported databases for a message: ``SQLite or PostgreSQL``.

    ``examples`` adds a URL to each label; ``names`` gives SQLAlchemy's names
    instead, sorted and joined by "and" (``postgresql and sqlite``).
    """
    if names:
        return _listing(sorted(d.name for d in dialects()), "and")
    labels = [f"{d.label} ('{d.example}')" if examples else d.label for d in dialects()]
    return _listing(labels, "or")


def _listing(items: list[str], conjunction: str) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    if len(items) < 2:
        return "".join(items)
    return f"{', '.join(items[:-1])} {conjunction} {items[-1]}"
