"""What every ``casty-sa`` command shares: exit codes, usage errors, the sub-command
plumbing, the database options (``--url``, ``--schema``, ``--connect-timeout``) and
the one line a failure is told in.

Each command module registers its sub-commands on a :class:`Commands` and
resolves its database with :func:`url` (a usage error when none is given).

Examples
--------
>>> int(ExitCode.USAGE)
64
>>> str(UsageError("no database URL"))
'casty-sa: error: no database URL'
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Callable
from enum import IntEnum
from typing import Any, NoReturn

from sqlalchemy import make_url
from sqlalchemy.exc import ArgumentError

from casty_sa.diagnosis import describe
from casty_sa.errors import JournalError
from casty_sa.migrate import unsupported_schema
from casty_sa.urls import safe_url, to_async_url, url_secrets

__all__ = [
    "EPILOG",
    "SCHEMA_ENV",
    "URL_ENV",
    "Commands",
    "ExitCode",
    "Parser",
    "UsageError",
    "add_offsets_options",
    "add_payload_options",
    "describe_failure",
    "error",
    "offsets_place",
    "optional_url",
    "positive_int",
    "url",
    "where",
]

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
    #: ``projections reset NAME``: no such projection (nothing was run).
    NO_SUCH_PROJECTION = 1
    #: The database failed: unreachable, refused the login, missing tables, a failed statement.
    DATABASE_ERROR = 2
    #: ``import``/``export``: the target holds another history under the source's keys
    #: (refused, nothing written), or does not hold the source's content after the copy.
    NOT_VERIFIED = 3
    #: ``import``/``export``: the file is missing, or not in casty's SqliteJournal format.
    BAD_FILE = 4
    #: Wrong or missing arguments (no URL, unknown revision, ``downgrade`` or
    #: ``projections reset`` without ``--yes``).
    USAGE = 64
    #: A bug in casty-sa: please report it (``-v`` shows the traceback).
    INTERNAL = 70
    #: Interrupted (Ctrl-C); an interrupted ``import``/``export``/``prune`` resumes when run again.
    INTERRUPTED = 130


EPILOG = f"""\
The database URL comes from --url or the {URL_ENV} environment variable (prefer the
variable for URLs with a password: command lines are visible to other users).
Plain sqlite:///file.db, postgresql://user@host/db and mysql://user@host/db (or
mariadb://) URLs get their async driver.

exit codes:
  0    success (check: the database is at head)
  1    check: not at head; inspect ENTITY_ID: no such entity;
       projections reset NAME: no such projection
  2    database error: unreachable, login refused, tables missing, statement failed
  3    import/export: the target holds another history (refused, nothing written),
       or its content differs from the source's after the copy
  4    import/export: the file is missing or not a casty SqliteJournal file
  64   usage error: bad or missing arguments (e.g. no URL), unknown revision
  70   internal error (a bug: run with -v and report the traceback)
  130  interrupted; an interrupted import/export/prune resumes when run again
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


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are raised, so ``main`` can scrub and code them."""

    def error(self, message: str) -> NoReturn:
        """Raise ``UsageError`` instead of printing and exiting with argparse's 2."""
        raise UsageError(message, prog=self.prog, usage=self.format_usage())


def positive_int(value: str) -> int:
    """Parse an argument that must be an integer >= 1 (argparse ``type=``)."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


class Commands:
    """The sub-commands of ``casty-sa``, as each command module adds its own.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The ``casty-sa`` parser to add them to.
    """

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self._commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
        self._quiet = Parser(add_help=False)
        self._quiet.add_argument(
            "-v",
            "--verbose",
            action="count",
            default=argparse.SUPPRESS,
            help="debug logs on stderr",
        )
        #: The options of a command that opens a database.
        self.database = Parser(add_help=False)
        self.database.add_argument(
            "--url", help=f"database URL (default: ${URL_ENV}); the password is never printed"
        )
        self.database.add_argument(
            "--schema",
            default=os.environ.get(SCHEMA_ENV) or None,
            help=f"PostgreSQL schema of the tables (default: ${SCHEMA_ENV}, else the search_path)",
        )
        self.database.add_argument(
            "--connect-timeout",
            type=float,
            default=None,
            metavar="SECONDS",
            help="give up connecting after this long (default: the URL's connect_timeout, else 10)",
        )

    def add(
        self, name: str, help: str, *parents: argparse.ArgumentParser
    ) -> argparse.ArgumentParser:
        """Add a sub-command sharing ``-v``, the epilog and ``parents``' options."""
        return self._commands.add_parser(
            name,
            help=help,
            description=help,
            parents=[self._quiet, *parents],
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )


# -- the database a command works on -----------------------------------------------------------


def url(args: argparse.Namespace) -> str:
    """The database URL from ``--url`` or ``CASTY_SA_URL``; a usage error when neither is set."""
    found = optional_url(args)
    if found is None:
        raise UsageError(
            f"no database URL: pass --url URL or set {URL_ENV} "
            "(e.g. sqlite:///journal.db, postgresql://user@host/dbname or mysql://user@host/dbname)"
        )
    return found


def optional_url(args: argparse.Namespace) -> str | None:
    """The database URL from ``--url`` or the environment, if any, checked for its dialect."""
    found: str | None = args.url or os.environ.get(URL_ENV) or None
    if found is None:
        return None
    try:
        make_url(found)
    except (ArgumentError, ValueError) as exc:  # e.g. a port that is not a number
        raise UsageError(f"the database URL does not parse: {exc}") from None
    async_url = to_async_url(found)
    args.url_value = found
    refused = unsupported_schema(async_url.get_backend_name(), args.schema, option="--schema ")
    if refused is not None:
        raise UsageError(refused)
    return found


def where(url: str) -> str:
    """The URL as every casty-sa message shows it: async driver named, password masked."""
    return safe_url(to_async_url(url))


# -- failures in one line ----------------------------------------------------------------------


def error(message: str) -> None:
    """Print one ``casty-sa: error: …`` line on stderr."""
    print(f"casty-sa: error: {message}", file=sys.stderr)


#: The library's advice in a ``SchemaError``, which means nothing on a command line.
_LIBRARY_MIGRATE_HINT = re.compile(r",? or pass migrate=True to SAJournal")


def describe_failure(exc: BaseException, args: argparse.Namespace) -> str:
    """One line: what failed and where, without SQL, parameters or password, and with
    the library's advice in the command line's words.

    Examples
    --------
    >>> from casty_sa.errors import SchemaError
    >>> text = SchemaError("Run `casty-sa upgrade`, or pass migrate=True to SAJournal.")
    >>> describe_failure(text, argparse.Namespace(command="import"))
    'Run `casty-sa upgrade`, or pass --migrate to casty-sa import.'
    >>> describe_failure(text, argparse.Namespace(command="export"))
    'Run `casty-sa upgrade`.'
    """
    if isinstance(exc, JournalError):
        message = str(exc)
    else:
        found = getattr(args, "url_value", None)
        at = f" on {safe_url(found)}" if found else ""
        secrets = url_secrets(found) if found else frozenset()
        message = f"database error{at}: {describe(exc, secrets)}"
    # --migrate where ``import`` has it, else nothing
    hint = ", or pass --migrate to casty-sa import" if args.command == "import" else ""
    return _LIBRARY_MIGRATE_HINT.sub(hint, message)


def add_offsets_options(parser: argparse.ArgumentParser) -> None:
    """``--offsets-url`` and ``--offsets-schema``: where a command finds the projections'
    offsets table when the read model lives in another database."""
    parser.add_argument(
        "--offsets-url",
        metavar="URL",
        help="the read model's database, holding casty_sa_projection_offsets "
        "(default: --url); the password is never printed",
    )
    parser.add_argument(
        "--offsets-schema", metavar="NAME", help="PostgreSQL schema of the offsets table"
    )


def offsets_place(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The offsets table's own database (``--offsets-url``; ``None``: the journal's) and its
    schema; a schema the URL's database cannot have is a usage error, before connecting."""
    if args.offsets_url is None:
        return None, args.offsets_schema or args.schema
    found: str = args.offsets_url
    backend = to_async_url(found).get_backend_name()
    refused = unsupported_schema(backend, args.offsets_schema, "--offsets-schema ")
    if refused is not None:
        raise UsageError(refused)
    return found, args.offsets_schema


def add_payload_options(parser: argparse.ArgumentParser) -> None:
    """``--raw`` and ``--decoder``: how a command that shows events turns payloads into objects."""
    parser.add_argument("--raw", action="store_true", help="show payload bytes, do not decode")
    parser.add_argument(
        "--decoder",
        default="pickle:loads",
        metavar="MODULE:FUNCTION",
        help="the journal's deserializer (default: pickle:loads, which runs code from the "
        "table: read only databases you trust, or use --raw)",
    )


def payload_decoder(args: argparse.Namespace) -> Callable[[bytes], Any] | None:
    """The deserializer ``--raw``/``--decoder`` ask for (``None``: show the bytes)."""
    return None if args.raw else _decoder(args.decoder)


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
