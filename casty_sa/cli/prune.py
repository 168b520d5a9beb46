"""``casty-sa prune``: delete the events snapshots cover, in bounded batches, resumable.

The work is :mod:`casty_sa.prune`'s; this module parses the arguments, draws the
progress on stderr (a bar on a terminal, a line every few seconds otherwise) and
prints what was deleted, or with ``--dry-run`` what would be, and which projections
keep events they have not handled yet. A run stopped anywhere (Ctrl-C, ``kill -9``,
a lost connection) left whole batches only: the same command again finishes the job.

Examples
--------
>>> from casty_sa.prune import HeldBack, PruneReport
>>> report = PruneReport(False, entities=3, pruned=2, events=40, batches=2, no_snapshot=1)
>>> report.held["balances"] = HeldBack(5, 1, {(0, 2, None)})
>>> print("\\n".join(summary(report)))  # doctest: +NORMALIZE_WHITESPACE
deleted 40 events of 2 entities in 2 batches (3 entities looked at, 1 without a snapshot)
kept for projections that have not handled them yet (run them, or pass --ignore-projections):
  'balances': 5 events of 1 entity (slice 0/2 has handled nothing)
>>> parse_time("2024-03-01") == parse_time("2024-03-01T00:00:00+00:00") == 1709251200.0
True
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from casty_sa.cli.common import (
    Commands,
    ExitCode,
    UsageError,
    add_offsets_options,
    offsets_place,
    positive_int,
    url,
)
from casty_sa.cli.text import printable
from casty_sa.journal import SAJournal
from casty_sa.prune import (
    DEFAULT_BATCH_SIZE,
    Holds,
    Progress,
    PruneReport,
    Rule,
    projection_holds,
    prune,
)

__all__ = ["ProgressLine", "as_dict", "parse_time", "register", "summary"]

#: ``--before 30d``: days (or hours, ``12h``) before now.
_AGO = re.compile(r"(\d+)([dh])")
#: Seconds between two progress lines when stderr is not a terminal.
_LINE_EVERY = 5.0


def register(commands: Commands) -> None:
    """Add ``prune`` to ``casty-sa``."""
    command = commands.add(
        "prune",
        "delete events the latest snapshot covers (--snapshot) or older than a date "
        "(--before), in batches; --dry-run counts first",
        commands.database,
    )
    which = command.add_mutually_exclusive_group(required=True)
    which.add_argument("--entity", metavar="ID", help="this entity only")
    which.add_argument("--all", action="store_true", help="every entity with events")
    rule = command.add_mutually_exclusive_group(required=True)
    rule.add_argument(
        "--snapshot", action="store_true", help="the events the entity's latest snapshot covers"
    )
    rule.add_argument(
        "--before",
        metavar="DATE",
        type=_time_argument,
        help="the first events older than DATE (2024-03-01, an ISO 8601 time, UTC unless it "
        "says; or 30d, 12h ago) that the latest snapshot covers (all of them with --force)",
    )
    command.add_argument(
        "--force",
        action="store_true",
        help="with --before: delete old events beyond the snapshot too (the entity then "
        "recovers from its snapshot, or from nothing: only for entities no longer used)",
    )
    command.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"rows per delete and per transaction (default: {DEFAULT_BATCH_SIZE})",
    )
    command.add_argument(
        "--max-rows", type=positive_int, metavar="N", help="stop after deleting N rows in all"
    )
    command.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    _add_projection_options(command)
    command.add_argument("--json", action="store_true", help="print the summary as JSON")
    command.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal; a bar counts "
        "first, as --dry-run does)",
    )
    command.set_defaults(handler=_cmd_prune)


def _add_projection_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--ignore-projections",
        action="store_true",
        help="delete events projections have not handled yet too",
    )
    command.add_argument(
        "--ignore-projection",
        action="append",
        default=[],
        metavar="NAME",
        help="leave this projection out (one that will never run again, or whose filters "
        "skip the entities); repeat for more",
    )
    add_offsets_options(command)


def parse_time(text: str, now: float | None = None) -> float:
    """``--before``'s DATE as seconds since 1970: an ISO 8601 date or time (UTC unless it
    names a zone), or ``30d``/``12h`` before ``now``."""
    ago = _AGO.fullmatch(text.strip())
    if ago is not None:
        unit = 86400 if ago.group(2) == "d" else 3600
        return (time.time() if now is None else now) - int(ago.group(1)) * unit
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _time_argument(text: str) -> float:
    try:
        return parse_time(text)
    except (ValueError, OverflowError):  # OverflowError: more days ago than a float holds
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date: give 2024-03-01, 2024-03-01T12:00:00+02:00, 30d or 12h"
        ) from None


def _cmd_prune(args: argparse.Namespace) -> int:
    """``casty-sa prune``: plan, (count,) delete, report."""
    database = url(args)
    if args.force and args.before is None:
        raise UsageError("--force goes with --before (--snapshot deletes only what it covers)")
    if args.ignore_projections and args.ignore_projection:
        raise UsageError("--ignore-projections already leaves every projection out")
    rule = Rule(before=args.before, force=args.force)
    show = sys.stderr.isatty() if args.progress is None else args.progress
    line = ProgressLine(sys.stderr, "prune", bar=show)
    try:
        report = asyncio.run(_run(args, database, rule, line))
    except BaseException:
        line.close()
        if line.last is not None and line.last.events and not args.dry_run:
            print(
                f"casty-sa: prune: {line.last.events:,} events were deleted before it stopped "
                "(each batch commits on its own); run the same command again to go on",
                file=sys.stderr,
            )
        raise
    line.close()
    if args.json:
        print(json.dumps(as_dict(report), indent=2, ensure_ascii=False))
    else:
        print("\n".join(summary(report)))
    return ExitCode.OK


async def _run(
    args: argparse.Namespace, database: str, rule: Rule, line: ProgressLine
) -> PruneReport:
    journal = SAJournal(
        database,
        schema=args.schema,
        connect_timeout=args.connect_timeout,
        migrate=False,
        deserialize=bytes,  # nothing is decoded: never unpickle what a table holds
    )
    async with journal:
        holds = await _holds(args, journal)
        settings: dict[str, Any] = {
            "entity_id": args.entity,
            "holds": holds,
            "batch_size": args.batch_size,
            "max_rows": args.max_rows,
        }
        total = None
        if line.bar and not args.dry_run:  # a bar needs the total: counted first
            total = (await prune(journal, rule, dry_run=True, **settings)).events
        return await prune(
            journal, rule, dry_run=args.dry_run, on_progress=line, total=total, **settings
        )


async def _holds(args: argparse.Namespace, journal: SAJournal) -> Holds | None:
    """The projections whose unhandled events stay (``None``: ``--ignore-projections``)."""
    if args.ignore_projections:
        return None
    offsets, schema = offsets_place(args)  # (an unsupported URL refused before connecting)
    if offsets is None:
        return await projection_holds(journal.engine, schema=schema, ignore=args.ignore_projection)
    return await projection_holds(
        offsets, schema=schema, ignore=args.ignore_projection, connect_timeout=args.connect_timeout
    )


class ProgressLine:
    """Progress on stderr: a bar redrawn at most ten times a second (``bar``), else a line
    every ``every`` seconds. ``last`` is the latest progress it was given.

    Examples
    --------
    >>> import io
    >>> stream = io.StringIO()
    >>> line = ProgressLine(stream, "prune", bar=False, every=0.0)
    >>> line(Progress(entities=3, events=1200))
    >>> stream.getvalue()  # doctest: +ELLIPSIS
    'casty-sa: prune: 1,200 events, 3 entities, ...s\\n'
    """

    def __init__(
        self, stream: TextIO, label: str, *, bar: bool, every: float = _LINE_EVERY
    ) -> None:
        self.bar = bar
        self.last: Progress | None = None
        self._stream = stream
        self._label = label
        self._every = min(0.1, every) if bar else every
        self._started = self._drawn = time.monotonic()
        self._open = False

    def __call__(self, progress: Progress) -> None:
        self.last = progress
        now = time.monotonic()
        if now - self._drawn < self._every:
            return
        self._drawn = now
        counts = f"{progress.events:,} events, {progress.entities:,} entities"
        elapsed = f"{now - self._started:.1f}s"
        if not self.bar:
            self._stream.write(f"casty-sa: {self._label}: {counts}, {elapsed}\n")
        elif progress.total:
            fraction = min(1.0, progress.events / progress.total)
            width = max(10, min(40, shutil.get_terminal_size().columns - 60))
            filled = "#" * int(width * fraction)
            shown = f"[{filled:-<{width}}] {fraction:4.0%} {progress.events:,}/{progress.total:,}"
            self._stream.write(f"\r{self._label} {shown} events {elapsed}\x1b[K")
            self._open = True
        else:
            self._stream.write(f"\r{self._label} {counts} {elapsed}\x1b[K")
            self._open = True
        self._stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self._open:
            self._stream.write("\n")
            self._stream.flush()
            self._open = False


def summary(report: PruneReport) -> list[str]:
    """The report in lines of text."""
    verb = "would delete" if report.dry_run else "deleted"
    batches = "" if report.dry_run else f" in {_n(report.batches, 'batch', 'batches')}"
    looked = f"{_n(report.entities, 'entity', 'entities')} looked at"
    if report.no_snapshot:
        looked += f", {report.no_snapshot:,} without a snapshot"
    lines = [
        f"{verb} {_n(report.events, 'event')} of {_n(report.pruned, 'entity', 'entities')}"
        f"{batches} ({looked})"
    ]
    if report.held:
        lines.append(
            "kept for projections that have not handled them yet (run them, or pass "
            "--ignore-projections):"
        )
        for name, held in sorted(report.held.items()):
            slices = "; ".join(
                f"slice {index}/{count} "
                + ("has handled nothing" if offset is None else f"at offset {offset}")
                for index, count, offset in sorted(held.slices, key=_slice_order)
            )
            lines.append(
                f"  {printable(repr(name))}: {_n(held.events, 'event')} of "
                f"{_n(held.entities, 'entity', 'entities')} ({slices})"
            )
    if report.refused:
        lines.append(
            f"{_n(report.refused, 'entity', 'entities')} lost their snapshot while the prune "
            "ran (refused: nothing of them deleted)"
        )
    if report.capped:
        lines.append("stopped at --max-rows: run the same command again to go on")
    return lines


def as_dict(report: PruneReport) -> dict[str, Any]:
    """What ``--json`` prints."""
    found: dict[str, Any] = {
        name: getattr(report, name)
        for name in ("dry_run", "entities", "pruned", "events", "batches", "no_snapshot")
    }
    found.update(refused=report.refused, capped=report.capped)
    found["held"] = {
        name: {
            "events": held.events,
            "entities": held.entities,
            "slices": [
                {"slice": index, "slice_count": count, "offset": offset}
                for index, count, offset in sorted(held.slices, key=_slice_order)
            ],
        }
        for name, held in sorted(report.held.items())
    }
    return found


def _slice_order(found: tuple[int, int, str | None]) -> tuple[int, int]:
    return found[1], found[0]


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count:,} {one if count == 1 else (many or one + 's')}"
