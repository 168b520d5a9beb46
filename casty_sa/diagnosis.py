"""What a failed database call means, in casty-sa's errors: the one place that decides.

The journal, the migrations (:mod:`casty_sa.migrate`) and the reads of the
schema revision (:mod:`casty_sa.revisions`) turn a driver's or SQLAlchemy's exception into a
:class:`~casty_sa.errors.JournalError` here, so a refused login is
:class:`~casty_sa.errors.DatabaseAccessDenied` whichever of them met it, and
no message ever carries a password.
"""

from __future__ import annotations

import os
import re
import sqlite3

from sqlalchemy import URL
from sqlalchemy.exc import DBAPIError

from casty_sa.errors import DatabaseAccessDenied, DatabaseUnavailable, JournalError, SchemaError
from casty_sa.models import VERSION_TABLE
from casty_sa.urls import is_memory_sqlite, mask_secrets, safe_url, url_secrets

__all__ = [
    "Diagnosis",
    "access_denied",
    "database_error",
    "describe",
    "is_schema_mismatch",
    "migration_error",
    "mysql_code",
    "sqlstate",
    "upgrade_hint",
]

#: What to do about a refusal, by SQLSTATE (class 28: the login itself was refused).
ACCESS_HINTS = {
    "28": "check the user name and password of the URL, that the role exists and may log in, "
    "and the server's pg_hba.conf",
    "3D000": "create the database (then run `casty-sa upgrade`) or fix its name in the URL",
    "42501": "grant the role the privileges casty-sa needs (see the README's Privileges section)",
}


#: What to do about a refusal by MySQL/MariaDB, by error number: the login (1045, 1698 and
#: an account that may not use the server's authentication plugin), the database's
#: existence (1049) and privileges (1044 on the database, 1142/1143 on a table or column).
MYSQL_ACCESS_HINTS = {
    1045: "check the user name and password of the URL, and that the account exists for "
    "this client's host ('app'@'%' or 'app'@'10.0.0.5': CREATE USER)",
    1698: "check the user name and password of the URL, and that the account may log in "
    "with a password (not only through the server's unix socket)",
    1049: "create the database (then run `casty-sa upgrade`) or fix its name in the URL",
    1044: "grant the account the privileges casty-sa needs on this database (see the "
    "README's privileges per database)",
    1142: "grant the account the privileges casty-sa needs (see the README's privileges per "
    "database)",
    1143: "grant the account the privileges casty-sa needs (see the README's privileges per "
    "database)",
}
#: MySQL/MariaDB error numbers of a table or column that is not there: ER_NO_SUCH_TABLE,
#: ER_BAD_FIELD_ERROR
_MYSQL_SCHEMA_MISMATCH = frozenset({1146, 1054})
#: ... of a statement the server ended at its time limit (MariaDB ``max_statement_time``,
#: MySQL ``max_execution_time``) or a lock not granted in ``innodb_lock_wait_timeout``
_MYSQL_TIMED_OUT = frozenset({1969, 3024, 1205})
#: ... of a refused DDL (create, alter, drop, index: the migrations' statements)
_MYSQL_DDL_REFUSED = frozenset({1142, 1227})


#: The values MySQL/MariaDB quote in an error's text: ``Duplicate entry 'alice-1' for key``
#: (1062), ``Incorrect integer value: 'x' for column`` (1366), ``Truncated incorrect DOUBLE
#: value: 'x'`` (1292): data of the application's, where PostgreSQL puts it on a DETAIL line
_MYSQL_QUOTED_VALUE = (
    re.compile(r"(entry |value: )'.*'(?= for (?:key|column) )"),  # up to the last " for key"
    re.compile(r"(value: )'.*'(?=\W*$)"),  # or to the end
)


def describe(exc: BaseException, secrets: frozenset[str] = frozenset()) -> str:
    """A short, password-free description of a driver error (no SQL, no parameters).

    The one way a driver's error text gets into casty-sa's messages and log lines.
    A driver may quote its DSN (``user:password@…``, ``?password=…``): masked
    whatever the secret. ``secrets`` (see :func:`casty_sa.urls.url_secrets`) are
    masked wherever they appear, in whatever form the driver put them (a server
    echoing a value, a libpq-style ``key=value`` string).

    Examples
    --------
    >>> describe(ValueError("login as app with hunter2 refused"), frozenset({"hunter2"}))
    'ValueError: login as app with *** refused'
    >>> import pymysql
    >>> print(describe(pymysql.err.IntegrityError(1062, "Duplicate entry 'a-1' for key 'PRIMARY'")))
    IntegrityError: (1062, "Duplicate entry '…' for key 'PRIMARY'")
    """
    original = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    first = str(original).strip().splitlines()[0] if str(original).strip() else ""
    if mysql_code(original) is not None:  # MySQL quotes the row's values in its first line
        for quoted in _MYSQL_QUOTED_VALUE:
            first, found = quoted.subn(r"\1'…'", first)
            if found:
                break
    text = mask_secrets(first, secrets)
    if len(text) > 300:
        text = text[:300] + "…"
    return f"{type(original).__name__}: {text}" if text else type(original).__name__


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL error, wrapped by SQLAlchemy or raised by asyncpg."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        state = getattr(current, "sqlstate", None)
        if isinstance(state, str):
            return state
        login = _refused_login(current)
        if login is not None:
            return login
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return None


def mysql_code(exc: BaseException) -> int | None:
    """The error number of a MySQL/MariaDB driver's error (asyncmy, PyMySQL/aiomysql),
    wrapped by SQLAlchemy or not; ``None`` for anything else.

    Both drivers raise ``Error(number, message)``; their SQLSTATE (``42000``) is too
    coarse to tell a missing privilege from a syntax error, so the number decides.

    Examples
    --------
    >>> import pymysql
    >>> mysql_code(pymysql.err.OperationalError(1146, "Table 'bank.x' doesn't exist"))
    1146
    >>> mysql_code(ValueError(1146)) is None
    True
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        module = type(current).__module__.partition(".")[0]
        if module in _MYSQL_DRIVERS and current.args and isinstance(current.args[0], int):
            return current.args[0]
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return None


#: The modules whose errors carry MySQL's error numbers (aiomysql raises PyMySQL's)
_MYSQL_DRIVERS = frozenset({"asyncmy", "pymysql", "aiomysql"})


#: What a server's refusal of a login says (in English, the default), by SQLSTATE: psycopg
#: raises it without one (libpq keeps only the message of a failed connection)
_LOGIN_REFUSALS = (
    ("password authentication failed", "28P01"),
    ("no pg_hba.conf entry", "28000"),
    ('role "', "28000"),  # role "x" does not exist
    ('database "', "3D000"),  # database "x" does not exist
)


def _refused_login(exc: BaseException) -> str | None:
    """The SQLSTATE of psycopg's failed connection, read from the server's FATAL message."""
    if not type(exc).__module__.startswith("psycopg") or "FATAL:" not in str(exc):
        return None
    fatal = str(exc).partition("FATAL:")[2]
    for says, state in _LOGIN_REFUSALS:
        if says in fatal and (not says.endswith('"') or "does not exist" in fatal):
            return state
    return None


#: PostgreSQL SQLSTATEs of a table, column, schema or ON CONFLICT key that is not there
_PG_SCHEMA_MISMATCH = frozenset({"42P01", "42703", "42P10", "3F000"})
#: SQLite's messages (SQLITE_ERROR) for the same
_SQLITE_SCHEMA_MISMATCH = (
    "no such table",
    "no such column",
    "has no column named",
    "does not match any primary key or unique constraint",
)


def is_schema_mismatch(exc: BaseException) -> bool:
    """Whether ``exc`` says a table, column or key casty-sa uses is not there.

    Not worth retrying: the statement will fail the same way until an operator
    restores the schema.
    """
    original = getattr(exc, "orig", None) or exc
    if isinstance(original, sqlite3.OperationalError):
        text = str(original).lower()
        return any(marker in text for marker in _SQLITE_SCHEMA_MISMATCH)
    if sqlstate(exc) in _PG_SCHEMA_MISMATCH or mysql_code(exc) in _MYSQL_SCHEMA_MISMATCH:
        return True
    # a driver's error without a code (or one wrapped twice) naming one of casty-sa's tables
    text = describe(exc).lower()
    return ("no such table" in text or "does not exist" in text) and "casty_sa_" in text


def upgrade_hint(schema: str | None) -> str:
    """The sentence that says how to bring a database to head from a shell."""
    # no URL in the command: a masked password (***) would not log in, and a real one on a
    # command line is visible to every user of the machine
    flag = f" --schema {schema}" if schema is not None else ""
    return (
        f"Run `casty-sa upgrade{flag}` with the environment variable CASTY_SA_URL set to this "
        "database's URL (the variable keeps its password off the command line)"
    )


def access_denied(
    exc: BaseException, url: URL, what: str, secrets: frozenset[str] = frozenset()
) -> DatabaseAccessDenied | None:
    """A ``DatabaseAccessDenied`` when ``exc`` is a refusal calling again cannot fix.

    A login the server refused (SQLSTATE class 28: wrong password, unknown
    role, pg_hba.conf; MySQL's 1045), a database that does not exist, a missing
    privilege, or a SQLite file whose directory is missing or not writable;
    ``None`` for anything else.
    """
    text = describe(exc, secrets)
    code = mysql_code(exc)
    state = None if code is not None else sqlstate(exc)  # MySQL's SQLSTATEs are too coarse
    if code in MYSQL_ACCESS_HINTS:
        cause = f"{safe_url(url)} refused casty-sa ({text})"
        hint = MYSQL_ACCESS_HINTS[code]
    elif state is not None and (state.startswith("28") or state in ACCESS_HINTS):
        cause = f"{safe_url(url)} refused casty-sa ({text})"
        hint = ACCESS_HINTS.get(state[:2] if state.startswith("28") else state, "")
    else:
        sqlite = _sqlite_file_refused(url, text)
        if sqlite is None:
            return None
        cause, hint = sqlite
    return DatabaseAccessDenied(
        mask_secrets(
            f"could not {what}: {cause}. Nothing was stored, and calling again will fail the "
            f"same way: {hint}.",
            secrets,
        )
    )


def _sqlite_file_refused(url: URL, text: str) -> tuple[str, str] | None:
    """What keeps a SQLite file from being opened for good, and what to do; ``None`` if
    nothing does (e.g. too many open files: transient, reported as it is)."""
    if url.get_backend_name() != "sqlite" or "unable to open database file" not in text:
        return None
    database = url.database or ""
    if is_memory_sqlite(url) or database.startswith("file:"):
        return None
    directory = os.path.dirname(os.path.abspath(database))
    if not os.path.isdir(directory):
        problem = f"its directory {directory} does not exist"
        hint = "create the directory (casty-sa creates the file, not its directories)"
    elif not os.access(directory, os.W_OK | os.X_OK):
        problem = f"this process may not create files in its directory {directory}"
        hint = (
            "give the process write permission on the directory (or remount a read-only "
            "file system read-write), or fix the URL"
        )
    else:
        return None
    return f"cannot open the SQLite file {os.path.abspath(database)}, {problem} ({text})", hint


def database_error(
    exc: BaseException,
    url: URL,
    what: str,
    *,
    secrets: frozenset[str] = frozenset(),
    schema: str | None = None,
    nothing: str = "nothing of a failed write was stored",
) -> JournalError:
    """casty-sa's error for a failed call: refused, tables missing or altered, or unavailable.

    Parameters
    ----------
    exc : BaseException
        What the driver or SQLAlchemy raised (a ``JournalError`` is returned as is).
    url : URL
        The database (shown with its password masked).
    what : str
        What failed, after "could not" (``"load events of 'acct-1'"``).
    secrets : frozenset[str]
        Secrets of the URL to scrub from the driver's text as well.
    schema : str | None
        PostgreSQL schema of the tables, for the ``casty-sa upgrade`` hint.
    nothing : str
        What the failure left undone, in lower case (a deletion: "nothing was deleted").
    """
    if isinstance(exc, JournalError):
        return exc
    denied = access_denied(exc, url, what, secrets)
    if denied is not None:
        return denied
    text = describe(exc, secrets)
    if is_schema_mismatch(exc):
        return SchemaError(
            f"casty-sa's tables on {safe_url(url)} are missing or altered (could "
            f"not {what}: {text}); {nothing}. "
            f"{upgrade_hint(schema)} to create missing tables; a dropped or changed column "
            "must be restored by hand (casty_sa.metadata describes the expected tables)."
        )
    if (
        isinstance(exc, TimeoutError)
        or isinstance(getattr(exc, "orig", None), TimeoutError)
        or sqlstate(exc) == "57014"  # the server's statement_timeout
        or mysql_code(exc) in _MYSQL_TIMED_OUT
    ):
        hint = (
            "it timed out: check the database's load and reachability, or raise "
            "connect_timeout / statement_timeout (or pool_timeout) on SAJournal"
        )
    else:
        hint = "check that the database is reachable, then call again"
    return DatabaseUnavailable(
        mask_secrets(
            f"could not {what} on {safe_url(url)}: {text}. {nothing[:1].upper()}{nothing[1:]}; "
            f"{hint}.",
            secrets,
        )
    )


class Diagnosis:
    """One database's error text: its URL shown masked, its secrets scrubbed everywhere.

    Examples
    --------
    >>> from sqlalchemy import make_url
    >>> url = make_url("postgresql+asyncpg://app:hunter2@db/bank")
    >>> Diagnosis(url, frozenset({"hunter2"})).describe(OSError("hunter2 rejected"))
    'OSError: *** rejected'
    """

    __slots__ = ("schema", "secrets", "url")

    def __init__(
        self, url: URL, secrets: frozenset[str] = frozenset(), schema: str | None = None
    ) -> None:
        self.url = url
        self.secrets = secrets
        self.schema = schema

    def describe(self, exc: BaseException) -> str:
        """``exc`` for a message or a log line (see :func:`describe`)."""
        return describe(exc, self.secrets)

    def error(
        self, exc: BaseException, what: str, nothing: str = "nothing of a failed write was stored"
    ) -> JournalError:
        """casty-sa's error for a failed call (see :func:`database_error`)."""
        return database_error(
            exc, self.url, what, secrets=self.secrets, schema=self.schema, nothing=nothing
        )


def migration_error(exc: BaseException, url: URL, what: str) -> JournalError:
    """casty-sa's error for a failed Alembic command: no DDL, no password in it.

    A role without DDL rights gets a ``SchemaError`` saying which rights the
    migrations and the journal need; a refusal is ``DatabaseAccessDenied``,
    anything else ``DatabaseUnavailable``.
    """
    secrets = url_secrets(url)
    text = describe(exc, secrets)
    code = mysql_code(exc)
    if code in _MYSQL_DDL_REFUSED:
        return SchemaError(
            f"the account connecting to {safe_url(url)} may not change casty-sa's tables "
            f"({text}). Run the migrations (`casty-sa upgrade`) with an account that may "
            "(SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, ALTER, INDEX on the database); the "
            "journal itself "
            "needs only SELECT and INSERT on casty_sa_events, SELECT and UPDATE on "
            "casty_sa_event_counter, SELECT, INSERT and UPDATE on casty_sa_snapshots, and "
            f"SELECT on casty_sa_tombstones and {VERSION_TABLE}. Nothing was changed."
        )
    if sqlstate(exc) == "42501" or "permission denied" in text or "must be owner" in text:
        return SchemaError(
            f"the role connecting to {safe_url(url)} may not change casty-sa's tables "
            f"({text}). Run the migrations (`casty-sa upgrade`) with a DDL-capable role, "
            "such as the owner of the database or schema; the journal itself needs only "
            "SELECT and INSERT on casty_sa_events, SELECT, INSERT and UPDATE on "
            f"casty_sa_snapshots, and SELECT on casty_sa_tombstones and {VERSION_TABLE}. "
            "Nothing was changed."
        )
    # a refused login, a missing database or directory: not transient, whoever met it
    return access_denied(exc, url, what, secrets) or DatabaseUnavailable(
        f"could not {what} on {safe_url(url)}: {text}"
    )
