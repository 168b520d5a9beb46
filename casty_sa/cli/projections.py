"""``casty-sa projections``: where each projection stands, and ``projections reset NAME``.

The work is :mod:`casty_sa.projections.admin`'s; this module parses the
arguments and prints. The list shows one line per slice: its offset, the events
handled, the lag (events stored after its offset, "100,000+" past the count's
limit, and the age of the oldest of them), the worker holding its lease and the
failure holding it back. ``--offsets-url`` names the read model's database when
it is not the journal's. A reset refuses to run without ``--yes``: a projection
that starts over applies every event again, so its read model must be cleared in
the same transaction (``--clear SQL``), or by a DBA running the script ``--sql``
prints.

Examples
--------
>>> from casty_sa.projections.admin import SliceReport
>>> report = SliceReport("balances", 0, 1, "0" * 36, 12, "web-1:42:a1", True, 4.5, 0.0,
...                      None, None, 3, 1.25)
>>> print("\\n".join(render([report], Style())))  # doctest: +NORMALIZE_WHITESPACE
PROJECTION  SLICE  OFFSET  HANDLED  LAG  LAG (S)  OWNER  LEASE  LAST ERROR
balances    0/1    000000000000000000000000000000000000  12  3  1.2  web-1:42:a1  live 4.5s  -
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from typing import Any

from casty_sa.cli.common import (
    Commands,
    ExitCode,
    UsageError,
    add_offsets_options,
    offsets_place,
    url,
    where,
)
from casty_sa.cli.text import (
    DIM,
    RED,
    Cell,
    Style,
    add_color_option,
    printable,
    table,
    terminal_style,
)
from casty_sa.projections.admin import (
    SliceReport,
    reset_projection,
    reset_script,
    slice_reports,
)
from casty_sa.projections.status import LAG_LIMIT
from casty_sa.transfer import require_existing_database

__all__ = ["as_dict", "register", "render"]


def register(commands: Commands) -> None:
    """Add ``projections`` to ``casty-sa``."""
    projections = commands.add(
        "projections",
        "list projections per slice: offset, handled, lag, lease, last error; "
        "`projections reset NAME --yes` starts one over",
        commands.database,
    )
    projections.add_argument("action", nargs="?", choices=["reset"], help="reset NAME")
    projections.add_argument("name", nargs="?", metavar="NAME", help="the projection to reset")
    add_offsets_options(projections)
    projections.add_argument("--json", action="store_true", help="print JSON")
    projections.add_argument(
        "--no-lag", action="store_true", help="do not read the journal to measure the lag"
    )
    add_color_option(projections)
    reset = projections.add_argument_group("reset")
    reset.add_argument(
        "--yes", action="store_true", help="confirm: the projection starts over from the start"
    )
    reset.add_argument(
        "--clear",
        action="append",
        default=[],
        metavar="SQL",
        help="a statement that clears the read model, run in the reset's transaction "
        "(repeat for more)",
    )
    reset.add_argument(
        "--sql",
        action="store_true",
        help="print the reset as a script for a DBA instead of running it (connects to nothing)",
    )
    projections.set_defaults(handler=_cmd_projections)


def _cmd_projections(args: argparse.Namespace) -> int:
    """``casty-sa projections [reset NAME]``."""
    if args.action == "reset":
        return _reset(args)
    if args.name is not None:
        raise UsageError(f"unknown action {args.name!r}: casty-sa projections [reset NAME]")
    if args.yes or args.clear or args.sql:
        raise UsageError("--yes, --clear and --sql belong to `casty-sa projections reset NAME`")
    offsets, schema = _offsets(args)
    # the journal is read for the lag only
    journal = None if args.no_lag else url(args)
    for database in (journal, offsets):
        if database is not None:
            require_existing_database(database)
    reports = asyncio.run(
        slice_reports(
            journal,
            offsets_url=offsets,
            schema=args.schema,
            offsets_schema=schema,
            connect_timeout=args.connect_timeout,
        )
    )
    if args.json:
        found = {"offsets": where(offsets), "slices": [as_dict(report) for report in reports]}
        print(json.dumps(found, indent=2, ensure_ascii=False))
    elif not reports:
        print(f"no projections in {where(offsets)}")
    else:
        print("\n".join(render(reports, terminal_style(args.color))))
    return ExitCode.OK


def _reset(args: argparse.Namespace) -> int:
    """``casty-sa projections reset NAME``: refused without ``--yes``; ``--sql`` prints it."""
    name = args.name
    if not name:
        raise UsageError("casty-sa projections reset NAME: which projection?")
    offsets, schema = _offsets(args)
    if args.sql:
        print(reset_script(offsets, name, args.clear, schema=schema))
        return ExitCode.OK
    if not args.yes:
        raise UsageError(
            f"resetting {name!r} makes it start over from the first event, so its read model "
            "must be emptied in the same transaction, or every event is applied again over "
            "the rows already there. Pass the statements that empty it, --clear 'DELETE FROM "
            "table' (repeatable), or print a script for a DBA with --sql; then pass --yes"
        )
    require_existing_database(offsets)
    slices, changed = asyncio.run(
        reset_projection(
            offsets, name, clear=args.clear, schema=schema, connect_timeout=args.connect_timeout
        )
    )
    if not slices:
        print(f"casty-sa: no projection {name!r} in {where(offsets)}", file=sys.stderr)
        return ExitCode.NO_SUCH_PROJECTION
    print(f"reset {name!r} in {where(offsets)}: {slices} slice(s) start over from the first event")
    for sql, rows in zip(args.clear, changed, strict=True):
        print(f"  cleared: {printable(sql)} ({rows if rows >= 0 else '?'} rows)")
    if not args.clear:
        print(
            "casty-sa: warning: no --clear given: empty the read model before the projection "
            "runs again, or it applies every event over the rows already there",
            file=sys.stderr,
        )
    return ExitCode.OK


def _offsets(args: argparse.Namespace) -> tuple[str, str | None]:
    """The offsets table's database (``--offsets-url``, else the journal's) and schema."""
    found, schema = offsets_place(args)
    return found or url(args), schema


# -- output ------------------------------------------------------------------------------------


def render(reports: list[SliceReport], style: Style) -> list[str]:
    """One line per slice, aligned; the last error shortened to the terminal's width."""
    rows: list[list[Cell]] = []
    for report in reports:
        rows.append(
            [
                printable(report.projection),
                f"{report.slice}/{report.slice_count}",
                report.offset or ("-", DIM),
                f"{report.handled:,}",
                _lag(report.lag_events),
                ("?", DIM) if report.lag_seconds is None else f"{report.lag_seconds:.1f}",
                printable(report.owner) if report.owner else ("-", DIM),
                _lease(report),
                (printable(report.last_error), RED) if report.last_error else ("-", DIM),
            ]
        )
    headers = ["PROJECTION", "SLICE", "OFFSET", "HANDLED", "LAG", "LAG (S)", "OWNER", "LEASE"]
    return table([*headers, "LAST ERROR"], rows, right={3, 4, 5}, flex=len(headers), style=style)


def _lag(events: int | None) -> Cell:
    if events is None:
        return ("?", DIM)
    return f"{events:,}+" if events >= LAG_LIMIT else f"{events:,}"


def _lease(report: SliceReport) -> Cell:
    if report.held and report.lease_left is not None:
        return f"live {report.lease_left:.1f}s"
    return ("expired", DIM) if report.owner else ("-", DIM)


def as_dict(report: SliceReport) -> dict[str, Any]:
    """What ``--json`` prints of one slice."""
    return dataclasses.asdict(report)
