"""The ``casty-sa`` command: migrations, import/export of casty journal files, inspection.

The package only parses arguments, calls :mod:`casty_sa.migrate`,
:mod:`casty_sa.revisions`, :mod:`casty_sa.transfer` and
:mod:`casty_sa.inspection`, and prints. Results go to stdout, messages and the
progress bar to stderr. No output, error or log line ever shows a database
password: URLs are printed masked, and every message is scrubbed of the
password before it is written.

Each command group is a module that registers its sub-commands and holds
their handlers: ``migrations`` (upgrade, downgrade, current, check, history,
heads), ``transfer`` (import, export), ``inspect``, ``events``, ``projections``
(list, reset), ``prune``; ``common`` holds what they
share, ``secrecy`` the scrubbing of passwords, ``text`` the terminal output.

Examples
--------
>>> main(["heads"])  # doctest: +ELLIPSIS
0... (head)
0
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from alembic.util.exc import CommandError
from sqlalchemy.exc import SQLAlchemyError

from casty_sa.cli import events, inspect, migrations, projections, prune, transfer
from casty_sa.cli.common import (
    EPILOG,
    URL_ENV,
    Commands,
    ExitCode,
    Parser,
    UsageError,
    describe_failure,
    error,
)
from casty_sa.cli.secrecy import Redactor, logging_to_stderr
from casty_sa.errors import JournalError
from casty_sa.revisions import package_version
from casty_sa.transfer import JournalFileError

__all__ = ["ExitCode", "build_parser", "main"]

log = logging.getLogger("casty_sa.cli")


def build_parser() -> argparse.ArgumentParser:
    """The ``casty-sa`` argument parser, with one sub-command per job.

    Examples
    --------
    >>> build_parser().parse_args(["upgrade", "--sql", "--url", "sqlite://"]).revision
    'head'
    """
    parser = Parser(
        prog="casty-sa",
        description="Manage casty-sa's journal tables, copy casty SqliteJournal files in and "
        "out, and look inside a journal.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"casty-sa {package_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logs on stderr")
    commands = Commands(parser)
    for group in (migrations, transfer, inspect, events, projections, prune):
        group.register(commands)
    return parser


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
    with logging_to_stderr(args.verbose, redact):
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
        error(redact(str(exc)))
        return ExitCode.BAD_FILE
    except CommandError as exc:
        error(redact(f"alembic: {exc}"))
        return ExitCode.USAGE
    except (JournalError, SQLAlchemyError, OSError, TimeoutError) as exc:
        log.debug("%s failed", args.command, exc_info=True)
        error(redact(describe_failure(exc, args)))
        return ExitCode.DATABASE_ERROR
    except KeyboardInterrupt:
        again = {"import": "copy", "export": "copy", "prune": "delete"}.get(args.command)
        error("interrupted" + (f" (run the same command again to {again} the rest)" * bool(again)))
        return ExitCode.INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a raw traceback
        error(redact(f"internal error: {type(exc).__name__}: {exc} (run with -v for details)"))
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
