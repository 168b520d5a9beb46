"""From a connection string to an async SQLAlchemy URL and a journal kind.

A plain ``sqlite:///f.db`` (or a :class:`~pathlib.Path` to a SQLite file)
picks ``aiosqlite``, a plain ``postgresql://`` picks ``asyncpg``. A sync-only
driver (``pysqlite``, ``psycopg2``) or another database is refused with
:class:`~casty_sa.errors.UnsupportedDatabase`.

Every URL a message, a log line or a ``repr`` shows goes through
:func:`safe_url`, which masks each credential the URL carries: the password of
its ``user:password@`` part and the value of every query parameter that holds
a secret (``?password=``, ``?sslpassword=``, which asyncpg honours).

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

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus

from casty import JournalKind
from sqlalchemy import URL, make_url
from sqlalchemy.exc import ArgumentError

from casty_sa.errors import UnsupportedDatabase

__all__ = [
    "DEFAULT_APPLICATION_NAME",
    "PostgresOptions",
    "UrlLike",
    "is_memory_sqlite",
    "is_secret_parameter",
    "kind_of",
    "mask_secrets",
    "postgres_options",
    "safe_url",
    "to_async_url",
    "url_secrets",
]

#: What every public function taking a database accepts (besides an engine): a URL, or a
#: path to a SQLite file (casty's own ``SqliteJournal`` takes paths).
type UrlLike = str | URL | os.PathLike[str]

#: The ``application_name`` of casty-sa's PostgreSQL connections (``pg_stat_activity``),
#: unless the URL (``?application_name=``) or ``connect_args`` name another.
DEFAULT_APPLICATION_NAME = "casty-sa"

#: backend name -> (async driver to use, drivers accepted, journal kind)
_BACKENDS: dict[str, tuple[str, frozenset[str], JournalKind]] = {
    "sqlite": ("aiosqlite", frozenset({"aiosqlite"}), JournalKind.local),
    "postgresql": ("asyncpg", frozenset({"asyncpg"}), JournalKind.centralized),
}
_ALIASES = {"postgres": "postgresql"}

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
    # rendered by hand: render_as_string would percent-encode the mask itself
    pairs = [
        f"{quote_plus(key)}={_MASK if is_secret_parameter(key) else quote_plus(value)}"
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
    if backend == "sqlite" and (parsed.host or parsed.port or parsed.username):
        # sqlite://j.db parses with j.db as a host name, which SQLite has no use for
        name = (parsed.database or parsed.host or "journal.db").lstrip("/")
        raise UnsupportedDatabase(
            f"{safe_url(parsed)} is not a SQLite URL casty-sa can open: a SQLite URL has no "
            f"host, user or port. For a file use three slashes, 'sqlite:///{name}' (relative "
            f"to the working directory) or four for an absolute path, 'sqlite:////path/{name}'"
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


# -- libpq options in a PostgreSQL URL -----------------------------------------------------------

#: Parameters SQLAlchemy's asyncpg dialect hands to ``asyncpg.connect`` as they are
#: (``host`` also carries SQLAlchemy's multi-host and unix-socket forms).
_PASSED_AS_IS = frozenset(
    {
        "host",
        "port",
        "user",
        "password",
        "passfile",
        "service",
        "servicefile",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
        "ssl",
        "prepared_statement_cache_size",
    }
)
#: libpq's TLS parameters, which asyncpg reads only from a DSN: they go to it as one.
_TLS_PARAMETERS = frozenset(
    {
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslcrl",
        "sslpassword",
        "sslnegotiation",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
    }
)
_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
#: asyncpg's integer settings, accepted in the query as text.
_INTEGER_PARAMETERS = frozenset(
    {"statement_cache_size", "max_cached_statement_lifetime", "max_cacheable_statement_size"}
)
_TRANSLATED = frozenset(
    {"application_name", "fallback_application_name", "connect_timeout", "options", "dbname"}
)
_SUPPORTED = sorted(_PASSED_AS_IS | _TLS_PARAMETERS | _INTEGER_PARAMETERS | _TRANSLATED)

#: PostgreSQL's time units, in seconds (a bare number of ``statement_timeout`` is ms).
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass
class PostgresOptions:
    """What a PostgreSQL URL's query asks of the connection, in asyncpg's terms.

    Attributes
    ----------
    url : URL
        The URL without the parameters translated here (the rest go to
        ``asyncpg.connect`` as they are).
    connect_args : dict
        Keyword arguments for ``asyncpg.connect``: ``dsn`` carrying the TLS
        parameters, integer settings.
    server_settings : dict
        Server settings: ``application_name`` and those of ``options=-c …``.
    connect_timeout : float | None
        ``connect_timeout`` in seconds, when the URL gives one.
    statement_timeout : float | None
        ``options=-c statement_timeout=…`` in seconds, when the URL gives one.
    """

    url: URL
    connect_args: dict[str, Any] = field(default_factory=dict)
    server_settings: dict[str, str] = field(default_factory=dict)
    connect_timeout: float | None = None
    statement_timeout: float | None = None


def postgres_options(url: URL) -> PostgresOptions:
    """Translate the libpq parameters of a PostgreSQL URL's query for asyncpg.

    Hosted PostgreSQL hands out URLs with libpq's parameters (``sslmode``,
    ``application_name``, ``connect_timeout``, ``options``), which asyncpg's
    ``connect()`` does not take as keywords. They become: the TLS parameters
    a DSN asyncpg parses itself, ``application_name`` and ``options=-c
    name=value`` server settings, ``connect_timeout`` the connect timeout.
    Any other parameter is refused, so a setting is never silently dropped.

    Raises
    ------
    UnsupportedDatabase
        Naming the parameters (never their values) asyncpg cannot honour, or
        one whose value is malformed.

    Examples
    --------
    >>> options = postgres_options(make_url("postgresql://db/x?sslmode=require&connect_timeout=5"))
    >>> options.connect_args["dsn"], options.connect_timeout, options.url.query
    ('postgresql://?sslmode=require', 5.0, immutabledict({}))
    """
    query = dict(url.query)
    unknown = sorted(set(query) - set(_SUPPORTED))
    if unknown:
        raise UnsupportedDatabase(
            f"the PostgreSQL URL {safe_url(url.set(query={}))} carries "
            f"{_plural(unknown, 'parameter')} {', '.join(map(repr, unknown))}, which "
            "asyncpg (casty-sa's PostgreSQL driver) cannot honour; remove "
            f"{'it' if len(unknown) == 1 else 'them'} from the URL, or pass asyncpg's own "
            "settings in connect_args. Supported: " + ", ".join(_SUPPORTED)
        )
    single = {key: _single(key, value) for key, value in query.items() if key != "host"}
    options = PostgresOptions(url)
    tls = {key: single[key] for key in sorted(_TLS_PARAMETERS & set(single))}
    if "sslmode" in tls and tls["sslmode"] not in _SSL_MODES:
        raise UnsupportedDatabase(
            f"sslmode={tls['sslmode']!r} in the PostgreSQL URL is not one of "
            f"{', '.join(_SSL_MODES)}"
        )
    if tls:
        # asyncpg parses libpq's TLS parameters only from a DSN; its keyword arguments
        # (host, user, database, … from the URL) take precedence over the DSN's
        options.connect_args["dsn"] = "postgresql://?" + "&".join(
            f"{key}={quote(value, safe='')}" for key, value in tls.items()
        )
    for key in sorted(_INTEGER_PARAMETERS & set(single)):
        options.connect_args[key] = _number(key, single[key], int, zero=True)
    if "options" in single:
        options.server_settings.update(_parse_options(single["options"]))
    if "fallback_application_name" in single:
        options.server_settings.setdefault("application_name", single["fallback_application_name"])
    if "application_name" in single:
        options.server_settings["application_name"] = single["application_name"]
    if "connect_timeout" in single:
        options.connect_timeout = _number("connect_timeout", single["connect_timeout"], float)
    if "statement_timeout" in options.server_settings:
        options.statement_timeout = _duration(options.server_settings.pop("statement_timeout"))
    if "dbname" in single:
        if url.database and url.database != single["dbname"]:
            raise UnsupportedDatabase(
                f"the PostgreSQL URL {safe_url(url)} names two databases, "
                f"{url.database!r} in its path and {single['dbname']!r} in ?dbname=; keep one"
            )
        url = url.set(database=single["dbname"])
    options.url = url.difference_update_query(_TLS_PARAMETERS | _INTEGER_PARAMETERS | _TRANSLATED)
    return options


def _plural(items: list[str], word: str) -> str:
    return word if len(items) == 1 else word + "s"


def _single(key: str, value: str | tuple[str, ...]) -> str:
    if isinstance(value, str):
        return value
    if len(set(value)) > 1:
        raise UnsupportedDatabase(f"the PostgreSQL URL gives {key!r} more than once; keep one")
    return value[0]


def _number(key: str, text: str, kind: type[float] | type[int], *, zero: bool = False) -> Any:
    """A number greater than 0 (or at least 0, with ``zero``) from a URL parameter."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        bound = "of at least 0" if zero else "greater than 0"
        why = (
            " (casty-sa bounds every connection attempt: give the seconds to wait)"
            if key == "connect_timeout"
            else ""
        )
        raise UnsupportedDatabase(
            f"{key}={text!r} in the PostgreSQL URL is not a number {bound}{why}"
        )
    return value


def _duration(text: str) -> float:
    """A PostgreSQL time setting (``5000``, ``5s``, ``1min``) in seconds; bare numbers are ms."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(us|ms|s|min|h|d)?\s*", text)
    seconds = float(match[1]) * _TIME_UNITS[match[2] or "ms"] if match else 0.0
    if not seconds > 0:
        raise UnsupportedDatabase(
            f"statement_timeout={text!r} in the PostgreSQL URL's options is not a positive "
            "duration (e.g. 5000, 5s, 1min); casty-sa bounds every statement, so 0 (no "
            "limit) is refused"
        )
    return seconds


def _parse_options(options: str) -> dict[str, str]:
    """Server settings from libpq's ``options`` (``-c name=value``, ``--name=value``).

    Arguments are separated by spaces; a backslash makes the next character
    literal (``-c search_path=a\\ b``), as in libpq. Any other command-line
    switch of the server is refused: asyncpg sends settings, not switches.
    """
    words: list[str] = []
    current: list[str] = []
    escaped = started = False
    for char in options:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = started = True
        elif char.isspace():
            if started:
                words.append("".join(current))
            current, started = [], False
        else:
            current.append(char)
            started = True
    if started:
        words.append("".join(current))
    settings: dict[str, str] = {}
    position = 0
    while position < len(words):
        word = words[position]
        position += 1
        if word == "-c" and position < len(words):
            setting = words[position]
            position += 1
        elif word.startswith("-c") and len(word) > 2:
            setting = word[2:]
        elif word.startswith("--") and len(word) > 2:
            setting = word[2:]
            name, equals, value = setting.partition("=")
            setting = name.replace("-", "_") + equals + value
        else:
            raise UnsupportedDatabase(
                f"options={'…' if is_secret_parameter(word) else repr(word)} in the PostgreSQL "
                "URL is not a setting casty-sa can pass on: asyncpg sends server settings "
                "only, written '-c name=value' (e.g. options=-c%20search_path%3Dapp)"
            )
        name, equals, value = setting.partition("=")
        if not equals or not re.fullmatch(r"[A-Za-z_][\w.]*", name):
            raise UnsupportedDatabase(
                f"the PostgreSQL URL's options hold {name!r} without a valid 'name=value'"
            )
        settings[name.lower()] = value
    return settings
