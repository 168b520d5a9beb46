"""``casty-sa import`` and ``export``: casty SqliteJournal files in and out.

The copy is :mod:`casty_sa.transfer`'s; this module parses the arguments,
draws the progress bar on stderr and prints the report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, TextIO

from casty_sa.cli.common import Commands, ExitCode, Parser, positive_int, url
from casty_sa.cli.text import printable
from casty_sa.errors import InvalidEventError
from casty_sa.transfer import (
    DEFAULT_BATCH_SIZE,
    JournalFileError,
    Progress,
    TransferReport,
    export_casty_file,
    import_casty_file,
)

__all__ = ["ProgressBar", "register"]


def register(commands: Commands) -> None:
    """Add ``import`` and ``export`` to ``casty-sa``."""
    copying = Parser(add_help=False)
    copying.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"rows per batch and per transaction (default: {DEFAULT_BATCH_SIZE})",
    )
    copying.add_argument("--json", action="store_true", help="print the summary as JSON")
    copying.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    for name, help, option, handler in (
        (
            "import",
            "copy a casty SqliteJournal file into the database (resumable, idempotent)",
            "--from",
            _cmd_import,
        ),
        (
            "export",
            "copy the database into a casty SqliteJournal file (created, or completed)",
            "--to",
            _cmd_export,
        ),
    ):
        command = commands.add(name, help, commands.database, copying)
        command.add_argument(option, dest="path", required=True, metavar="PATH")
        if name == "import":
            command.add_argument(
                "--migrate",
                action="store_true",
                help="bring a server database to head first (a SQLite one always is)",
            )
        command.set_defaults(handler=handler)


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


Copy = Callable[[ProgressBar | None], Coroutine[Any, Any, TransferReport]]


def _copy(args: argparse.Namespace, verb: str, copy: Copy) -> int:
    """Run a copy with a progress bar on stderr (when asked, or when stderr is a TTY)."""
    show = sys.stderr.isatty() if args.progress is None else args.progress
    bar = ProgressBar(sys.stderr, args.command) if show else None
    try:
        report = asyncio.run(copy(bar))
    finally:
        if bar is not None:
            bar.close()
    return _summary(args, verb, report)


def _cmd_import(args: argparse.Namespace) -> int:
    """``casty-sa import --from PATH``: a casty SqliteJournal file into the database."""
    database = url(args)

    async def copy(bar: ProgressBar | None) -> TransferReport:
        try:
            return await import_casty_file(
                args.path,
                database,
                batch_size=args.batch_size,
                migrate=True if args.migrate else None,
                schema=args.schema,
                on_progress=bar,
                connect_timeout=args.connect_timeout,
            )
        except InvalidEventError as exc:
            raise JournalFileError(str(exc)) from exc

    return _copy(args, "imported", copy)


def _cmd_export(args: argparse.Namespace) -> int:
    """``casty-sa export --to PATH``: the database into a casty SqliteJournal file."""
    database = url(args)

    async def copy(bar: ProgressBar | None) -> TransferReport:
        return await export_casty_file(
            database,
            args.path,
            batch_size=args.batch_size,
            schema=args.schema,
            on_progress=bar,
            connect_timeout=args.connect_timeout,
        )

    return _copy(args, "exported", copy)


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
            print(f"    {printable(str(fork))}")
        print(
            "  Copying would mix two histories. Import into a new, empty database (or one "
            "holding only this source's rows), or find out which history is the right one first."
        )
    else:
        _print_copied(verb, report)
    return ExitCode.OK if report.verified else ExitCode.NOT_VERIFIED


def _print_copied(verb: str, report: TransferReport) -> None:
    """The summary of a copy that was made: counts, verification, notes."""
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
            print(f"    {printable(str(mismatch))}")
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
