"""From a connection string to an async SQLAlchemy URL and a journal kind.

A plain ``sqlite:///f.db`` (or a :class:`~pathlib.Path` to a SQLite file)
picks ``aiosqlite``, a plain ``postgresql://`` picks ``asyncpg``. A sync-only
driver (``pysqlite``, ``psycopg2``) or another database is refused with
:class:`~casty_sa.errors.UnsupportedDatabase`. What each database accepts is
its :class:`~casty_sa.dialects.Dialect`'s (registered by its module in
:mod:`casty_sa.backends`, which importing any part of ``casty_sa`` imports).

Every URL a message, a log line or a ``repr`` shows goes through
:func:`safe_url`, which masks each credential the URL carries: the password of
its ``user:password@`` part and the value of every query parameter that holds
a secret (``?password=``, ``?sslpassword=``, which asyncpg honours).
The libpq parameters of a PostgreSQL URL are :mod:`casty_sa.libpq`'s.

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
>>> safe_url("postgresql://app@db/bank?sslmode=require&password=secret")
'postgresql://app@db/bank?password=***&sslmode=require'
"""

from __future__ import annotations

import importlib.util
import os
import re
from urllib.parse import quote, quote_plus

from casty import JournalKind
from sqlalchemy import URL, make_url
from sqlalchemy.exc import ArgumentError

from casty_sa.dialects import Dialect, find, supported
from casty_sa.errors import DriverNotInstalled, UnsupportedDatabase

__all__ = [
    "UrlLike",
    "dialect_of",
    "engine_secrets",
    "is_memory_sqlite",
    "is_secret_parameter",
    "kind_of",
    "mask_secrets",
    "require_driver",
    "safe_url",
    "to_async_url",
    "url_secrets",
]

#: What every public function taking a database accepts (besides an engine): a URL, or a
#: path to a SQLite file (casty's own ``SqliteJournal`` takes paths).
type UrlLike = str | URL | os.PathLike[str]

#: A query parameter named like this carries a secret: libpq's and asyncpg's ``password``
#: and ``sslpassword`` (the passphrase of the client key), and, to be safe, any parameter
#: whose name says it is one. (``passfile``, ``sslkey`` and ``sslcert`` are paths, shown.)
_SECRET_NAME = re.compile(r"pass(?:word|wd|phrase)|pwd|secret|token", re.IGNORECASE)
_MASK = "***"

#: ``scheme://user:password@`` in free text.
_USERINFO_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^\s:/@?#]*:)([^\s@/?#]+)(@)")
#: ``password=value`` in a URL query (``?``/``&``) or a libpq ``key=value`` string.
_QUERY_SECRET = re.compile(
    r"((?:^|[?&;\s])[\w.-]*(?:pass(?:word|wd|phrase)|pwd|secret|token)[\w.-]*\s*=\s*)"
    r"('[^']*'|[^&;\s'\"]*)",
    re.IGNORECASE,
)


def is_secret_parameter(name: str) -> bool:
    """True when the URL query parameter ``name`` holds a secret (its value is masked).

    Examples
    --------
    >>> [is_secret_parameter(n) for n in ("password", "sslpassword", "sslmode", "passfile")]
    [True, True, False, False]
    """
    return _SECRET_NAME.search(name) is not None


def _parse(url: str | URL | os.PathLike[str] | os.PathLike[bytes]) -> URL:
    """``url`` as a SQLAlchemy URL; a path is a SQLite file. Raises what ``make_url`` raises."""
    if isinstance(url, URL):
        return url
    if isinstance(url, os.PathLike):
        return URL.create("sqlite", database=os.fsdecode(url))
    return make_url(url)


def safe_url(url: str | URL | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """Render a URL for messages and logs, with every credential masked.

    The password of ``user:password@`` and the value of every query parameter
    holding a secret (see :func:`is_secret_parameter`) become ``***``.

    Parameters
    ----------
    url : str | URL | os.PathLike
        The URL to render (a path: a SQLite file). A string that does not
        parse is reduced to its scheme, since it may hold a password in a
        form we cannot find.
    """
    try:
        parsed = _parse(url)
    except (ArgumentError, ValueError, TypeError):
        text = str(url)
        scheme = text.split(":", 1)[0] if ":" in text else ""
        return f"{scheme}://…" if re.fullmatch(r"[a-zA-Z][\w+.-]*", scheme) else "<unparseable URL>"
    if not parsed.query:
        return parsed.render_as_string(hide_password=True)
    rendered = parsed.set(query={}).render_as_string(hide_password=True)
    # rendered by hand: render_as_string would percent-encode the mask itself; a value may
    # itself be a libpq conninfo or URI with a password (``?dbname=…``): masked before its
    # ``=`` and ``@`` are percent-encoded out of the mask's sight
    pairs = [
        f"{quote_plus(key)}="
        f"{_MASK if is_secret_parameter(key) else quote_plus(mask_secrets(value), safe='*')}"
        for key in sorted(parsed.query)
        for value in _values(parsed.query[key])
    ]
    return f"{rendered}?{'&'.join(pairs)}"


def _values(value: str | tuple[str, ...]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def url_secrets(url: str | URL | os.PathLike[str] | os.PathLike[bytes]) -> frozenset[str]:
    """Every secret ``url`` carries, as given and as encoded in URL text.

    For scrubbing free text (a driver's error message, a traceback) of them,
    with :func:`mask_secrets`. A URL that does not parse gives none: its
    ``user:password@`` part is still caught by the pattern of
    :func:`mask_secrets`.
    """
    try:
        parsed = _parse(url)
    except (ArgumentError, ValueError, TypeError):
        return frozenset()
    found = [str(parsed.password)] if parsed.password else []
    for key, value in parsed.query.items():
        if is_secret_parameter(key):
            found.extend(_values(value))
    return frozenset(
        form
        for secret in found
        if secret
        for form in (secret, quote(secret, safe=""), quote_plus(secret))
    )


def engine_secrets(engine_url: URL, target: object) -> frozenset[str]:
    """Every secret of an engine's URL and of the target it was opened from, when that is a
    URL too (the engine's URL may lack some of the given one's: TLS parameters go to asyncpg
    apart)."""
    given = url_secrets(target) if isinstance(target, str | URL) else frozenset()
    return url_secrets(engine_url) | given


def mask_secrets(text: str, secrets: frozenset[str] | set[str] = frozenset()) -> str:
    """``text`` with ``secrets`` and every URL-shaped credential replaced by ``***``.

    Catches ``scheme://user:password@`` and ``password=…`` (in a URL query
    or a libpq ``key=value`` string) whatever the secret, plus each string of
    ``secrets`` (see :func:`url_secrets`) wherever it appears.

    Examples
    --------
    >>> mask_secrets("no route to postgresql://app:pw@db/x?sslpassword=k&sslmode=require")
    'no route to postgresql://app:***@db/x?sslpassword=***&sslmode=require'
    >>> mask_secrets("login failed: hunter2", frozenset({"hunter2"}))
    'login failed: ***'
    """
    text = _USERINFO_PASSWORD.sub(rf"\1{_MASK}\3", text)
    text = _QUERY_SECRET.sub(rf"\1{_MASK}", text)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, _MASK)
    return text


def to_async_url(url: str | URL | os.PathLike[str] | os.PathLike[bytes]) -> URL:
    """Return the URL with its async driver, or raise ``UnsupportedDatabase``.

    Parameters
    ----------
    url : str | URL | os.PathLike
        ``sqlite:///path``, ``sqlite://`` (memory), ``postgresql://…``, the
        same with an explicit async driver (``+aiosqlite``, ``+asyncpg``), or
        a path (``pathlib.Path``) to a SQLite file.

    Raises
    ------
    UnsupportedDatabase
        For another database, a sync-only driver or an unparseable URL.
    """
    try:
        parsed = _parse(url)
    except (ArgumentError, ValueError, TypeError) as exc:
        # the text itself is not repeated: it may be a password pasted in the wrong place
        hint = (
            "; for a SQLite file write 'sqlite:///path/to/file.db' or pass a pathlib.Path"
            if isinstance(url, str) and "://" not in url
            else ""
        )
        raise UnsupportedDatabase(
            f"{safe_url(url)} is not a database URL ({mask_secrets(str(exc))}); expected e.g. "
            f"'sqlite:///journal.db' or 'postgresql://user@host/dbname'{hint}"
        ) from None
    backend, _, driver = parsed.drivername.partition("+")
    dialect = find(backend)
    if dialect is None:
        raise UnsupportedDatabase(
            f"database {backend!r} (in {safe_url(parsed)}) is not supported by casty-sa; "
            f"use {supported(examples=True)}"
        )
    backend = backend if backend in dialect.url_names else dialect.name
    if not dialect.accepts(driver):
        others = "".join(f", '{backend}+{name}://…'" for name in sorted(dialect.drivers))
        raise UnsupportedDatabase(
            f"driver {driver!r} for {backend} is not supported: casty-sa needs an "
            f"async driver; use '{backend}+{dialect.driver}://…'{others} or plain "
            f"'{backend}://…'"
        )
    if dialect.check_url is not None:
        dialect.check_url(parsed)
    return parsed.set(drivername=f"{backend}+{driver or dialect.driver}")


def require_driver(url: URL) -> None:
    """Raise ``DriverNotInstalled`` when the (normalized) URL's driver cannot be imported,
    naming the extra of casty-sa that installs it.

    Examples
    --------
    >>> require_driver(to_async_url("sqlite:///journal.db"))  # aiosqlite comes with casty-sa
    """
    dialect = dialect_of(url)
    driver = url.get_driver_name()
    module, extra = dialect.extras.get(driver, (driver, ""))
    if importlib.util.find_spec(module) is not None:
        return
    install = f"pip install 'casty-sa[{extra}]'" if extra else f"pip install {module}"
    raise DriverNotInstalled(
        f"{safe_url(url)} needs the {driver} driver, which is not installed: {install}"
    )


def dialect_of(url: URL) -> Dialect:
    """The dialect of a (normalized) URL, or ``UnsupportedDatabase``."""
    dialect = find(url.get_backend_name())
    if dialect is None:
        raise UnsupportedDatabase(
            f"database {url.get_backend_name()!r} is not supported by casty-sa; use {supported()}"
        )
    return dialect


def kind_of(url: URL) -> JournalKind:
    """The journal kind of a (normalized) URL: SQLite is local, PostgreSQL centralized."""
    return dialect_of(url).kind


def is_memory_sqlite(url: URL) -> bool:
    """True for an in-memory SQLite URL (``sqlite://`` or ``:memory:``)."""
    if url.get_backend_name() != "sqlite":
        return False
    database = url.database or ""
    return database in ("", ":memory:") or "mode=memory" in database
