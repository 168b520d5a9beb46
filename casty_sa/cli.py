"""The ``casty-sa`` command: migrations, import/export of casty journal files, inspection.

This module only parses arguments, calls :mod:`casty_sa.migrate`,
:mod:`casty_sa.transfer` and :mod:`casty_sa.inspection`, and prints. Results go
to stdout, messages and the progress bar to stderr. No output, error or log
line ever shows a database password: URLs are printed masked, and every
message is scrubbed of the password before it is written.

Examples
--------
>>> main(["heads"])  # doctest: +ELLIPSIS
0... (head)
0
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn, TextIO

from alembic import command
from alembic.script import Script, ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import URL, Connection, func, make_url, select
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from casty_sa import inspection, migrate
from casty_sa.diagnosis import database_error, describe
from casty_sa.engine import open_engine, read_connection
from casty_sa.errors import InvalidEventError, JournalError, SchemaError
from casty_sa.models import EventRecord
from casty_sa.transfer import (
    DEFAULT_BATCH_SIZE,
    JournalFileError,
    Progress,
    TransferReport,
    export_casty_file,
    import_casty_file,
    require_existing_database,
)
from casty_sa.urls import mask_secrets, safe_url, to_async_url, url_secrets

__all__ = ["ExitCode", "build_parser", "main"]

log = logging.getLogger("casty_sa.cli")

URL_ENV = "CASTY_SA_URL"
SCHEMA_ENV = "CASTY_SA_SCHEMA"


class ExitCode(IntEnum):
    """Exit codes of ``casty-sa``; a script can act on each.

    Examples
    --------
    >>> int(ExitCode.NOT_AT_HEAD)
    1
    """

    OK = 0
    #: ``check``: the database is not at head.
    NOT_AT_HEAD = 1
    #: ``inspect ENTITY_ID``: the entity has no events and no snapshot.
    NO_SUCH_ENTITY = 1
    #: The database failed: unreachable, refused the login, missing tables, a failed statement.
    DATABASE_ERROR = 2
    #: ``import``/``export``: the target holds another history under the source's keys
    #: (refused, nothing written), or does not hold the source's content after the copy.
    NOT_VERIFIED = 3
    #: ``import``/``export``: the file is missing, or not in casty's SqliteJournal format.
    BAD_FILE = 4
    #: Wrong or missing arguments (no URL, unknown revision, ``downgrade`` without ``--yes``).
    USAGE = 64
    #: A bug in casty-sa: please report it (``-v`` shows the traceback).
    INTERNAL = 70
    #: Interrupted (Ctrl-C); an interrupted ``import``/``export`` resumes when run again.
    INTERRUPTED = 130


EPILOG = f"""\
The database URL comes from --url or the {URL_ENV} environment variable (prefer the
variable for URLs with a password: command lines are visible to other users).
Plain sqlite:///file.db and postgresql://user@host/db URLs get their async driver.

exit codes:
  0    success (check: the database is at head)
  1    check: not at head; inspect ENTITY_ID: no such entity
  2    database error: unreachable, login refused, tables missing, statement failed
  3    import/export: the target holds another history (refused, nothing written),
       or its content differs from the source's after the copy
  4    import/export: the file is missing or not a casty SqliteJournal file
  64   usage error: bad or missing arguments (e.g. no URL), unknown revision
  70   internal error (a bug: run with -v and report the traceback)
  130  interrupted; an interrupted import/export resumes when run again
"""


class UsageError(Exception):
    """Bad or missing command-line arguments (exit code 64).

    Parameters
    ----------
    message : str
        What is wrong and how to do it right.
    prog : str
        The (sub-)command it is about.
    usage : str
        Its usage line, printed before the message; empty for none.
    """

    def __init__(self, message: str, *, prog: str = "casty-sa", usage: str = "") -> None:
        super().__init__(message)
        self.prog = prog
        self.usage = usage

    def __str__(self) -> str:
        return f"{self.usage}{self.prog}: error: {self.args[0]}"


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are raised, so ``main`` can scrub and code them."""

    def error(self, message: str) -> NoReturn:
        """Raise ``UsageError`` instead of printing and exiting with argparse's 2."""
        raise UsageError(message, prog=self.prog, usage=self.format_usage())


# -- keeping passwords out of every line ---------------------------------------------------------


@dataclass
class Redactor:
    """Scrubs passwords out of text: those of the URLs it was told about, and any ``user:pw@``
    or ``?password=…`` (see :func:`casty_sa.urls.mask_secrets`).

    Examples
    --------
    >>> redact = Redactor()
    >>> redact.add_url("postgresql://app:s3cret@db/bank")
    >>> redact("login failed with s3cret for postgresql://app:s3cret@db/bank")
    'login failed with *** for postgresql://app:***@db/bank'
    """

    secrets: set[str] = field(default_factory=set)

    def add_url(self, url: str | URL) -> None:
        """Remember the secrets of ``url``: its password, ``?password=``, ``?sslpassword=``, …
        (as given, and as encoded in URL text).

        Parameters
        ----------
        url : str | URL
            A URL; one that does not parse contributes nothing here, and its
            ``user:password@`` part is still caught by the pattern.
        """
        self.secrets |= url_secrets(url)

    def __call__(self, text: str) -> str:
        """``text`` with every known secret and any URL password replaced by ``***``."""
        return mask_secrets(text, self.secrets)


class _RedactingFormatter(logging.Formatter):
    """A log formatter that runs the whole formatted record (traceback included) through a
    :class:`Redactor`."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        """Format the record, then scrub it."""
        return self._redact(super().format(record))


@contextmanager
def _logging(verbose: int, redact: Redactor) -> Iterator[None]:
    """Log ``casty_sa`` (and with ``-v`` alembic) to stderr for the command's duration."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter(redact))
    levels = {
        "casty_sa": logging.DEBUG if verbose else logging.WARNING,
        "alembic": logging.INFO if verbose else logging.WARNING,
    }
    saved = []
    for name, level in levels.items():
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(level)
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


# -- the parser --------------------------------------------------------------------------------


def _package_version() -> str:
    """The installed casty-sa version, or ``unknown`` in a bare checkout."""
    try:
        return version("casty-sa")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The ``casty-sa`` argument parser, with one sub-command per job.

    Examples
    --------
    >>> build_parser().parse_args(["upgrade", "--sql", "--url", "sqlite://"]).revision
    'head'
    """
    parser = _Parser(
        prog="casty-sa",
        description="Manage casty-sa's journal tables, copy casty SqliteJournal files in and "
        "out, and look inside a journal.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"casty-sa {_package_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logs on stderr")
    quiet = _Parser(add_help=False)
    quiet.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="debug logs on stderr"
    )
    database = _Parser(add_help=False)
    database.add_argument(
        "--url", help=f"database URL (default: ${URL_ENV}); the password is never printed"
    )
    database.add_argument(
        "--schema",
        default=os.environ.get(SCHEMA_ENV) or None,
        help=f"PostgreSQL schema of the tables (default: ${SCHEMA_ENV}, else the search_path)",
    )
    database.add_argument(
        "--connect-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up connecting after this long (default: the URL's connect_timeout, else 10)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def sub(name: str, help: str, *parents: _Parser) -> argparse.ArgumentParser:
        """Add a sub-command sharing ``-v``, the epilog and ``parents``' options."""
        return commands.add_parser(
            name,
            help=help,
            description=help,
            parents=[quiet, *parents],
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    upgrade = sub("upgrade", "migrate the database up to REV (default: head)", database)
    upgrade.add_argument("revision", nargs="?", default="head", metavar="REV")
    upgrade.add_argument(
        "--sql",
        action="store_true",
        help="print the DDL for the URL's dialect instead of running it (no connection; "
        "--url postgresql:// or sqlite:// is enough); REV may be a FROM:TO range",
    )
    upgrade.set_defaults(handler=_cmd_upgrade)

    downgrade = sub(
        "downgrade",
        "migrate the database down to REV (default: base, which drops casty-sa's tables "
        "and nothing else)",
        database,
    )
    downgrade.add_argument("revision", nargs="?", default="base", metavar="REV")
    downgrade.add_argument(
        "--sql",
        action="store_true",
        help="print the DDL instead of running it; REV is a FROM:TO range (default head:base)",
    )
    downgrade.add_argument(
        "--yes", action="store_true", help="confirm dropping tables that hold events"
    )
    downgrade.set_defaults(handler=_cmd_downgrade)

    sub("current", "print the database's casty-sa revision", database).set_defaults(
        handler=_cmd_current
    )
    sub("check", "exit 0 when the database is at head, 1 when not", database).set_defaults(
        handler=_cmd_check
    )
    sub(
        "history", "list casty-sa's migrations (with --url: mark the current one)", database
    ).set_defaults(handler=_cmd_history)
    sub("heads", "print the newest revision this casty-sa knows").set_defaults(handler=_cmd_heads)

    transfer = _Parser(add_help=False)
    transfer.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"rows per batch and per transaction (default: {DEFAULT_BATCH_SIZE})",
    )
    transfer.add_argument("--json", action="store_true", help="print the summary as JSON")
    transfer.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    importer = sub(
        "import",
        "copy a casty SqliteJournal file into the database (resumable, idempotent)",
        database,
        transfer,
    )
    importer.add_argument("--from", dest="path", required=True, metavar="PATH")
    importer.add_argument(
        "--migrate",
        action="store_true",
        help="bring a server database to head first (a SQLite one always is)",
    )
    importer.set_defaults(handler=_cmd_import)
    exporter = sub(
        "export",
        "copy the database into a casty SqliteJournal file (created, or completed)",
        database,
        transfer,
    )
    exporter.add_argument("--to", dest="path", required=True, metavar="PATH")
    exporter.set_defaults(handler=_cmd_export)

    inspect = sub(
        "inspect",
        "counts and per-entity positions; with ENTITY_ID, that entity's events",
        database,
    )
    inspect.add_argument("entity_id", nargs="?", metavar="ENTITY_ID")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.add_argument(
        "--limit", type=_positive_int, metavar="N", help="rows per page (default: 20 / 50)"
    )
    inspect.add_argument("--after", metavar="ENTITY_ID", help="entities: start after this one")
    inspect.add_argument(
        "--from",
        dest="from_sequence_nr",
        type=int,
        default=0,
        metavar="SEQ",
        help="events: start at this sequence number",
    )
    inspect.add_argument(
        "--exact",
        action="store_true",
        help="count the totals; on PostgreSQL, big tables get estimates by default",
    )
    inspect.add_argument("--raw", action="store_true", help="show payload bytes, do not decode")
    inspect.add_argument(
        "--decoder",
        default="pickle:loads",
        metavar="MODULE:FUNCTION",
        help="the journal's deserializer (default: pickle:loads, which runs code from the "
        "table: inspect only databases you trust, or use --raw)",
    )
    inspect.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="auto: when stdout is a terminal and NO_COLOR is unset",
    )
    inspect.set_defaults(handler=_cmd_inspect)
    return parser


def _positive_int(value: str) -> int:
    """Parse an argument that must be an integer >= 1 (argparse ``type=``)."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


# -- the entry point ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``casty-sa`` with ``argv`` (default: the process's arguments); return the exit code.

    Parameters
    ----------
    argv : Sequence[str] | None
        Arguments without the program name.

    Returns
    -------
    int
        One of :class:`ExitCode`.
    """
    redact = Redactor()
    arguments = list(sys.argv[1:] if argv is None else argv)
    for argument in arguments:
        if "://" in argument:
            redact.add_url(argument.partition("=")[2] if argument.startswith("--") else argument)
    environment_url = os.environ.get(URL_ENV)
    if environment_url:
        redact.add_url(environment_url)
    try:
        args = build_parser().parse_args(arguments)
    except UsageError as exc:
        print(redact(str(exc)), file=sys.stderr)
        return int(ExitCode.USAGE)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else int(ExitCode.OK)
    with _logging(args.verbose, redact):
        return int(_run(args, redact))


def _run(args: argparse.Namespace, redact: Redactor) -> int:
    """Run the chosen command, turning every failure into a scrubbed line and an exit code."""
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except UsageError as exc:
        print(redact(str(exc)), file=sys.stderr)
        return ExitCode.USAGE
    except BrokenPipeError:  # stdout piped into `head` and closed: not an error of ours
        _silence_stdout()
        return ExitCode.OK
    except JournalFileError as exc:
        _error(redact(str(exc)))
        return ExitCode.BAD_FILE
    except CommandError as exc:
        _error(redact(f"alembic: {exc}"))
        return ExitCode.USAGE
    except (JournalError, SQLAlchemyError, OSError, TimeoutError) as exc:
        log.debug("%s failed", args.command, exc_info=True)
        _error(redact(_for_the_command_line(_describe(exc, args), args.command)))
        return ExitCode.DATABASE_ERROR
    except KeyboardInterrupt:
        transfer = args.command in ("import", "export")
        _error("interrupted" + (" (run the same command again to copy the rest)" * transfer))
        return ExitCode.INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a raw traceback
        _error(redact(f"internal error: {type(exc).__name__}: {exc} (run with -v for details)"))
        if args.verbose:
            sys.stderr.write(redact("".join(traceback.format_exception(exc))))
        return ExitCode.INTERNAL


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush raises nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (captured output): nothing to flush
        pass
    finally:
        os.close(devnull)


def _error(message: str) -> None:
    """Print one ``casty-sa: error: …`` line on stderr."""
    print(f"casty-sa: error: {message}", file=sys.stderr)


#: The library's advice in a ``SchemaError``, which means nothing on a command line.
_LIBRARY_MIGRATE_HINT = re.compile(r",? or pass migrate=True to SAJournal")


def _for_the_command_line(message: str, command: str) -> str:
    """A library message in the CLI's words: ``--migrate`` where ``import`` has it, else nothing.

    Examples
    --------
    >>> text = "Run `casty-sa upgrade`, or pass migrate=True to SAJournal."
    >>> _for_the_command_line(text, "import")
    'Run `casty-sa upgrade`, or pass --migrate to casty-sa import.'
    >>> _for_the_command_line(text, "export")
    'Run `casty-sa upgrade`.'
    """
    hint = ", or pass --migrate to casty-sa import" if command == "import" else ""
    return _LIBRARY_MIGRATE_HINT.sub(hint, message)


def _describe(exc: BaseException, args: argparse.Namespace) -> str:
    """One line: what failed and where, without SQL, parameters or password."""
    if isinstance(exc, JournalError):
        return str(exc)
    url = getattr(args, "url_value", None)
    where = f" on {safe_url(url)}" if url else ""
    return f"database error{where}: {describe(exc, url_secrets(url) if url else frozenset())}"


# -- resolving arguments -----------------------------------------------------------------------


def _url(args: argparse.Namespace) -> str:
    """The database URL from ``--url`` or ``CASTY_SA_URL``; a usage error when neither is set."""
    url = _optional_url(args)
    if url is None:
        raise UsageError(
            f"no database URL: pass --url URL or set {URL_ENV} "
            "(e.g. sqlite:///journal.db or postgresql://user@host/dbname)"
        )
    return url


def _optional_url(args: argparse.Namespace) -> str | None:
    """The database URL from ``--url`` or the environment, if any, checked for its dialect."""
    url: str | None = args.url or os.environ.get(URL_ENV) or None
    if url is None:
        return None
    try:
        make_url(url)
    except (ArgumentError, ValueError) as exc:  # e.g. a port that is not a number
        raise UsageError(f"the database URL does not parse: {exc}") from None
    async_url = to_async_url(url)
    args.url_value = url
    if args.schema is not None and async_url.get_backend_name() != "postgresql":
        raise UsageError(
            f"--schema {args.schema!r} needs PostgreSQL; {async_url.get_backend_name()} has "
            "no schemas"
        )
    return url


def _where(url: str) -> str:
    """The URL as every casty-sa message shows it: async driver named, password masked."""
    return safe_url(to_async_url(url))


def _engine(args: argparse.Namespace, url: str) -> AsyncEngine:
    """An engine for ``url`` with the command's connect timeout; the caller disposes it."""
    engine, _owned = open_engine(url, connect_timeout=args.connect_timeout)
    return engine


def _check_revision(revision: str) -> None:
    """Refuse, before touching anything, a revision casty-sa's migrations do not have."""
    if "://" in revision:
        raise UsageError("the revision looks like a database URL; pass the URL with --url")
    for part in revision.split(":"):
        if part in ("", "head", "heads", "base") or re.fullmatch(r"[+-]\d+", part):
            continue
        try:
            ScriptDirectory.from_config(migrate.alembic_config()).get_revisions(part)
        except CommandError:
            raise UsageError(
                f"unknown revision {part!r}; casty-sa's revisions: "
                f"{', '.join(_revision_ids())} (or head, base, +N, -N)"
            ) from None


def _revision_ids() -> list[str]:
    """The ids of casty-sa's migrations, newest first."""
    script = ScriptDirectory.from_config(migrate.alembic_config())
    return [rev.revision for rev in script.walk_revisions()]


# -- migrations --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SchemaState:
    """Where a database stands: revision, application-made tables, event count."""

    revision: str | None
    app_managed: bool
    events: int | None


async def _state(engine: AsyncEngine, schema: str | None, *, count: bool = False) -> _SchemaState:
    """Where a database stands: its revision, whether an app made the tables, its event count."""

    def read(connection: Connection) -> _SchemaState:
        """Read the revision, app-made tables and (when asked) the event count."""
        revision = migrate.current_revision(connection, schema)
        app_managed = revision is None and migrate.tables_match_models(connection, schema)
        events = None
        if count and (revision is not None or app_managed):
            bound = connection.execution_options(schema_translate_map={None: schema})
            table = EventRecord.__table__
            events = bound.execute(select(func.count()).select_from(table)).scalar_one()
        return _SchemaState(revision, app_managed, events)

    try:
        async with read_connection(engine) as connection:
            return await connection.run_sync(read)
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        # the library's words for it: a refused login is DatabaseAccessDenied here too
        raise database_error(
            exc, engine.url, "read the schema revision", secrets=url_secrets(engine.url)
        ) from exc


def _describe_revision(revision: str | None) -> str:
    """A revision for people: ``0001 (head)``, ``base (…)``, or unknown."""
    head = migrate.head_revision()
    if revision is None:
        return "base (no casty-sa tables)"
    if revision == head:
        return f"{revision} (head)"
    if not migrate.known_revision(revision):
        return f"{revision} (unknown to casty-sa {_package_version()}: a newer casty-sa wrote it)"
    return revision


def _require_known(url: str, revision: str | None) -> None:
    """Raise ``SchemaError`` for a database a newer casty-sa migrated."""
    if revision is not None and not migrate.known_revision(revision):
        raise SchemaError(
            f"{_where(url)} is at casty-sa revision {revision!r}, which casty-sa "
            f"{_package_version()} does not know (its newest is {migrate.head_revision()!r}); "
            "upgrade the casty-sa package"
        )


def _offline(args: argparse.Namespace, url: str, verb: str, revision: str) -> int:
    """Print the DDL of a migration for the URL's dialect; connects to nothing."""
    to_async_url(url)  # an unsupported dialect fails here, with its own message
    config = migrate.alembic_config(url, schema=args.schema, stdout=sys.stdout)
    action = command.upgrade if verb == "upgrade" else command.downgrade
    try:
        action(config, revision, sql=True)
    except SystemExit as exc:  # migrations/env.py refuses with SystemExit(message)
        raise UsageError(str(exc.code)) from None
    return ExitCode.OK


def _cmd_upgrade(args: argparse.Namespace) -> int:
    """``casty-sa upgrade [REV] [--sql]``."""
    _check_revision(args.revision)
    url = _url(args)
    if args.sql:
        return _offline(args, url, "upgrade", args.revision)
    before, after = asyncio.run(_migrate(args, url, migrate.upgrade, args.revision))
    verb = "already at" if before == after else f"upgraded from {_describe_revision(before)} to"
    print(f"{_where(url)}: {verb} {_describe_revision(after)}")
    return ExitCode.OK


def _cmd_downgrade(args: argparse.Namespace) -> int:
    """``casty-sa downgrade [REV] [--sql] [--yes]``."""
    revision = args.revision
    if args.sql and ":" not in revision:
        revision = f"head:{revision}"
    _check_revision(revision)
    url = _url(args)
    if args.sql:
        return _offline(args, url, "downgrade", revision)
    require_existing_database(url)
    before, after = asyncio.run(_migrate(args, url, migrate.downgrade, revision, confirm=args.yes))
    verb = "already at" if before == after else f"downgraded from {_describe_revision(before)} to"
    print(f"{_where(url)}: {verb} {_describe_revision(after)}")
    return ExitCode.OK


async def _migrate(
    args: argparse.Namespace,
    url: str,
    action: Callable[..., Any],
    revision: str,
    *,
    confirm: bool | None = None,
) -> tuple[str | None, str | None]:
    """Run one migration command online; return the revisions before and after."""
    engine = _engine(args, url)
    try:
        state = await _state(engine, args.schema, count=confirm is not None)
        _require_known(url, state.revision)
        if confirm is False and state.events and _lands_on_base(state.revision, revision):
            raise UsageError(
                f"{_where(url)} holds {state.events:,} events; downgrading to base drops "
                "casty-sa's tables and every event in them. Export them first "
                "(casty-sa export), then pass --yes to proceed"
            )
        await action(engine, revision, schema=args.schema)
        after = await migrate.current(engine, schema=args.schema)
    finally:
        await engine.dispose()
    return state.revision, after


def _lands_on_base(current: str | None, revision: str) -> bool:
    """True when downgrading from ``current`` to ``revision`` ends with no revision at all."""
    if revision == "base":
        return True
    relative = re.fullmatch(r"-(\d+)", revision)
    if relative is None or current is None:
        return False
    script = ScriptDirectory.from_config(migrate.alembic_config())
    steps = int(relative.group(1))
    at: Script | None = script.get_revision(current)
    while steps and at is not None:
        down = at.down_revision
        at = script.get_revision(down) if isinstance(down, str) else None
        steps -= 1
    return at is None


def _cmd_current(args: argparse.Namespace) -> int:
    """``casty-sa current``: print the database's revision."""
    url = _url(args)
    require_existing_database(url)
    state = asyncio.run(_read_state(args, url))
    if state.app_managed:
        print("none (casty-sa's tables were made by the application's own migrations)")
    else:
        print(_describe_revision(state.revision))
    return ExitCode.OK


async def _read_state(args: argparse.Namespace, url: str) -> _SchemaState:
    """Read a database's :class:`_SchemaState` on a short-lived engine."""
    engine = _engine(args, url)
    try:
        return await _state(engine, args.schema)
    finally:
        await engine.dispose()


def _cmd_check(args: argparse.Namespace) -> int:
    """``casty-sa check``: exit 0 at head, 1 otherwise, saying what to run."""
    url = _url(args)
    require_existing_database(url)
    state = asyncio.run(_read_state(args, url))
    head = migrate.head_revision()
    where = _where(url)
    if state.revision == head:
        print(f"{where}: at head ({head})")
        return ExitCode.OK
    if state.app_managed:
        print(
            f"{where}: casty-sa's tables match this casty-sa's models (made by the "
            "application's own migrations)"
        )
        return ExitCode.OK
    if state.revision is None:
        print(f"{where}: no casty-sa tables; head is {head}. Run: casty-sa upgrade")
    elif not migrate.known_revision(state.revision):
        print(f"{where}: at {_describe_revision(state.revision)}; upgrade the casty-sa package")
    else:
        print(f"{where}: at {state.revision}, head is {head}. Run: casty-sa upgrade")
    return ExitCode.NOT_AT_HEAD


def _cmd_history(args: argparse.Namespace) -> int:
    """``casty-sa history``: the migrations, newest first, marking the current."""
    url = _optional_url(args)
    current = None
    if url is not None:
        require_existing_database(url)
        current = asyncio.run(_read_state(args, url)).revision
    script = ScriptDirectory.from_config(migrate.alembic_config())
    heads = set(script.get_heads())
    for rev in script.walk_revisions():
        down = rev.down_revision if isinstance(rev.down_revision, str) else "<base>"
        marks = (" (head)" if rev.revision in heads else "") + (
            " (current)" if rev.revision == current else ""
        )
        doc = (rev.doc or "").strip().splitlines()[0] if rev.doc else ""
        print(f"{down} -> {rev.revision}{marks}, {doc}")
    return ExitCode.OK


def _cmd_heads(args: argparse.Namespace) -> int:
    """``casty-sa heads``: the newest revision this casty-sa knows."""
    for head in ScriptDirectory.from_config(migrate.alembic_config()).get_heads():
        print(f"{head} (head)")
    return ExitCode.OK


# -- import / export ---------------------------------------------------------------------------


class ProgressBar:
    """A one-line progress bar on a terminal stream, redrawn at most ten times a second.

    Parameters
    ----------
    stream : TextIO
        Where to draw (stderr).
    label : str
        Shown before the bar.
    """

    def __init__(self, stream: TextIO, label: str) -> None:
        self._stream = stream
        self._label = label
        self._drawn = 0.0
        self._started = time.monotonic()

    def __call__(self, progress: Progress) -> None:
        """Redraw for ``progress`` (skipped when the last redraw is very recent)."""
        now = time.monotonic()
        done = progress.fraction >= 1.0
        if now - self._drawn < 0.1 and not done:
            return
        self._drawn = now
        width = max(10, min(40, shutil.get_terminal_size().columns - 60))
        filled = int(width * progress.fraction)
        counts = (
            f"{progress.events_done:,}/{progress.events_total:,} events, "
            f"{progress.snapshots_done:,}/{progress.snapshots_total:,} snapshots"
        )
        bar = "#" * filled + "-" * (width - filled)
        self._stream.write(
            f"\r{self._label} [{bar}] {progress.fraction:4.0%} {counts} "
            f"{now - self._started:.1f}s\x1b[K"
        )
        self._stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()


def _progress_bar(args: argparse.Namespace, label: str) -> ProgressBar | None:
    """A progress bar on stderr when asked, or by default when stderr is a TTY."""
    show = sys.stderr.isatty() if args.progress is None else args.progress
    return ProgressBar(sys.stderr, label) if show else None


def _cmd_import(args: argparse.Namespace) -> int:
    """``casty-sa import --from PATH``: a casty SqliteJournal file into the database."""
    url = _url(args)
    bar = _progress_bar(args, "import")
    try:
        report = asyncio.run(
            import_casty_file(
                args.path,
                url,
                batch_size=args.batch_size,
                migrate=True if args.migrate else None,
                schema=args.schema,
                on_progress=bar,
                connect_timeout=args.connect_timeout,
            )
        )
    except InvalidEventError as exc:
        raise JournalFileError(str(exc)) from exc
    finally:
        if bar is not None:
            bar.close()
    return _summary(args, "imported", report)


def _cmd_export(args: argparse.Namespace) -> int:
    """``casty-sa export --to PATH``: the database into a casty SqliteJournal file."""
    url = _url(args)
    bar = _progress_bar(args, "export")
    try:
        report = asyncio.run(
            export_casty_file(
                url,
                args.path,
                batch_size=args.batch_size,
                schema=args.schema,
                on_progress=bar,
                connect_timeout=args.connect_timeout,
            )
        )
    finally:
        if bar is not None:
            bar.close()
    return _summary(args, "exported", report)


def _summary(args: argparse.Namespace, verb: str, report: TransferReport) -> int:
    """Print a copy's summary (text or JSON); the exit code says whether it verified."""
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
    elif report.refused:
        print(f"{verb} nothing: {report.source} -> {report.target}")
        print(
            f"  REFUSED: the target already holds another history for {report.fork_count:,} "
            "entities (different content under the same keys, or rows the source cannot "
            "vouch for by content); nothing was written. E.g.:"
        )
        for fork in report.forks:
            print(f"    {inspection.printable(str(fork))}")
        print(
            "  Copying would mix two histories. Import into a new, empty database (or one "
            "holding only this source's rows), or find out which history is the right one first."
        )
    else:
        print(f"{verb} {report.source} -> {report.target} in {report.seconds:.2f}s")
        print(
            f"  events     {report.events_copied:,} copied, {report.events_present:,} already "
            f"there ({report.events:,} in the source, {report.entities:,} entities)"
        )
        print(
            f"  snapshots  {report.snapshots_copied:,} copied, {report.snapshots_present:,} "
            "already there (same or newer)"
        )
        if report.verified:
            print(
                f"  verified   content compared: all {report.events:,} events and "
                f"{report.snapshots:,} snapshots of the source are in the target, byte for byte"
            )
        else:
            print(f"  NOT VERIFIED: {report.mismatch_count:,} entities differ, e.g.:")
            for mismatch in report.mismatches:
                print(f"    {inspection.printable(str(mismatch))}")
        if report.snapshots_newer:
            print(
                f"  note       the target holds a newer snapshot than the source for "
                f"{report.snapshots_newer:,} entities (kept: a snapshot never moves backwards)"
            )
        if report.target_ahead:
            print(
                f"  note       the target holds more events than the source for "
                f"{report.target_ahead:,} entities (it was in use already)"
            )
        if report.zero_signs_lost:
            plural = "s" if report.zero_signs_lost > 1 else ""
            held = "written as" if verb == "exported" else "held as"
            print(
                f"  note       {report.zero_signs_lost:,} timestamp{plural} -0.0 {held} 0.0: "
                "casty's file format cannot hold the sign of zero (every other bit compared)"
            )
        if report.source_changed:
            print("  note       the source changed during the copy; run again for the rest")
    return ExitCode.OK if report.verified else ExitCode.NOT_VERIFIED


# -- inspect -----------------------------------------------------------------------------------


def _decoder(spec: str) -> Callable[[bytes], Any]:
    """Resolve ``--decoder MODULE:FUNCTION`` to the function."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"--decoder wants MODULE:FUNCTION (like pickle:loads), not {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"--decoder {spec}: {exc}") from None
    if not callable(target):
        raise UsageError(f"--decoder {spec} is not callable")
    decode: Callable[[bytes], Any] = target
    return decode


def _style(choice: str) -> inspection.Style:
    """How ``inspect`` prints: colour and width from ``--color``, the TTY and NO_COLOR."""
    tty = sys.stdout.isatty()
    color = choice == "always" or (
        choice == "auto"
        and tty
        and not os.environ.get("NO_COLOR")
        and os.environ.get("TERM") != "dumb"
    )
    return inspection.Style(color=color, width=shutil.get_terminal_size().columns if tty else None)


def _cmd_inspect(args: argparse.Namespace) -> int:
    """``casty-sa inspect [ENTITY_ID]``: totals and entities, or one entity."""
    url = _url(args)
    if args.entity_id is None and args.from_sequence_nr:
        raise UsageError("--from pages through one entity's events: give an ENTITY_ID")
    if args.entity_id is not None and args.after is not None:
        raise UsageError("--after pages through entities: leave out the ENTITY_ID")
    options: dict[str, Any] = {"schema": args.schema, "connect_timeout": args.connect_timeout}
    found: inspection.JournalSummary | inspection.EntityDetail
    if args.entity_id is None:
        found = asyncio.run(
            inspection.summarize(
                url, after=args.after, limit=args.limit or 20, exact=args.exact, **options
            )
        )
        missing = False
    else:
        decode = None if args.raw else _decoder(args.decoder)
        found = asyncio.run(
            inspection.entity_detail(
                url,
                args.entity_id,
                from_sequence_nr=args.from_sequence_nr,
                limit=args.limit or 50,
                decode=decode,
                **options,
            )
        )
        missing = not found.exists
    if args.json:
        print(json.dumps(inspection.as_dict(found), indent=2, ensure_ascii=False))
    elif isinstance(found, inspection.JournalSummary):
        print(inspection.render_summary(found, _style(args.color)))
    else:
        print(inspection.render_entity(found, _style(args.color)))
    if missing:
        print(f"casty-sa: no events or snapshot for entity {args.entity_id!r}", file=sys.stderr)
        return ExitCode.NO_SUCH_ENTITY
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
