"""The libpq parameters of a PostgreSQL URL, in asyncpg's terms.

Hosted PostgreSQL hands out URLs with libpq's parameters (``sslmode``,
``application_name``, ``connect_timeout``, ``options=-c …``), which asyncpg's
``connect()`` does not take as keywords: :func:`postgres_options` translates
them, and refuses one asyncpg cannot honour, so a setting is never silently
dropped. Messages name a parameter, never a secret's value.

Examples
--------
>>> from sqlalchemy import make_url
>>> options = postgres_options(make_url("postgresql://db/x?options=-c%20lock_timeout%3D5s"))
>>> options.server_settings
{'lock_timeout': '5s'}
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from sqlalchemy import URL

from casty_sa.errors import UnsupportedDatabase
from casty_sa.urls import is_secret_parameter, safe_url

__all__ = ["DEFAULT_APPLICATION_NAME", "PostgresOptions", "libpq_timeouts", "postgres_options"]

#: The ``application_name`` of casty-sa's PostgreSQL connections (``pg_stat_activity``),
#: unless the URL (``?application_name=``) or ``connect_args`` name another.
DEFAULT_APPLICATION_NAME = "casty-sa"

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
    >>> from sqlalchemy import make_url
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


def libpq_timeouts(url: URL) -> tuple[float | None, float | None]:
    """The URL's ``connect_timeout`` and ``options=-c statement_timeout=…``, in seconds.

    For psycopg, which takes every libpq parameter itself: casty-sa only needs to
    know the bounds they set (``None``: the URL sets none).

    Examples
    --------
    >>> from sqlalchemy import make_url
    >>> options = "options=-c%20statement_timeout%3D5s"
    >>> libpq_timeouts(make_url(f"postgresql://db/x?connect_timeout=3&{options}"))
    (3.0, 5.0)
    """
    query = dict(url.query)
    connect = query.get("connect_timeout")
    options = query.get("options")
    settings = {}
    if options is not None:
        try:
            settings = _parse_options(_single("options", options))
        except UnsupportedDatabase:
            settings = {}  # switches libpq passes on to the server: no timeout among them
    statement = settings.get("statement_timeout")
    if connect is not None:
        connect = _number("connect_timeout", _single("connect_timeout", connect), float)
    return connect, None if statement is None else _duration(statement)


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
