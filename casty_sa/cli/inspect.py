"""``casty-sa inspect``: a journal's totals and entities, or one entity's events.

The queries are :mod:`casty_sa.inspection`'s; this module parses the
arguments and renders what they find as aligned text (coloured on a terminal)
or as JSON.

Examples
--------
>>> from casty_sa.inspection import EntityDetail, Payload
>>> event = Payload(1, 0.0, b"x" * 21, "'opened'", None)
>>> detail = EntityDetail(
...     entity_id="acct-1", events=1, highest_sequence_nr=1, database="sqlite://",
...     snapshot=None, page=(event,), next_from=None,
... )
>>> print(render(detail, Style()))
entity    acct-1
events    1 (highest sequence number 1)
snapshot  none
<BLANKLINE>
SEQ  POSITION  TIMESTAMP (UTC)                   TYPE  BYTES  EVENT
  1         -  1970-01-01T00:00:00.000000+00:00  -        21  'opened'
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
from typing import Any

from casty_sa import inspection
from casty_sa.cli.common import (
    Commands,
    ExitCode,
    UsageError,
    add_payload_options,
    payload_decoder,
    positive_int,
    url,
)
from casty_sa.cli.text import (
    CYAN,
    DIM,
    RED,
    Cell,
    Style,
    add_color_option,
    fields,
    painted,
    printable,
    shell_quote,
    table,
    terminal_style,
    when,
)
from casty_sa.inspection import EntityDetail, JournalSummary, Payload

__all__ = ["as_dict", "register", "render"]


def register(commands: Commands) -> None:
    """Add ``inspect`` to ``casty-sa``."""
    inspect = commands.add(
        "inspect",
        "counts and per-entity positions; with ENTITY_ID, that entity's events",
        commands.database,
    )
    inspect.add_argument("entity_id", nargs="?", metavar="ENTITY_ID")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.add_argument(
        "--limit", type=positive_int, metavar="N", help="rows per page (default: 20 / 50)"
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
    add_payload_options(inspect)
    add_color_option(inspect)
    inspect.set_defaults(handler=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    """``casty-sa inspect [ENTITY_ID]``: totals and entities, or one entity."""
    database = url(args)
    if args.entity_id is None and args.from_sequence_nr:
        raise UsageError("--from pages through one entity's events: give an ENTITY_ID")
    if args.entity_id is not None and args.after is not None:
        raise UsageError("--after pages through entities: leave out the ENTITY_ID")
    options: dict[str, Any] = {"schema": args.schema, "connect_timeout": args.connect_timeout}
    found: JournalSummary | EntityDetail
    if args.entity_id is None:
        found = asyncio.run(
            inspection.summarize(
                database, after=args.after, limit=args.limit or 20, exact=args.exact, **options
            )
        )
        missing = False
    else:
        decode = payload_decoder(args)
        found = asyncio.run(
            inspection.entity_detail(
                database,
                args.entity_id,
                from_sequence_nr=args.from_sequence_nr,
                limit=args.limit or 50,
                decode=decode,
                **options,
            )
        )
        missing = not found.exists
    if args.json:
        print(json.dumps(as_dict(found), indent=2, ensure_ascii=False))
    else:
        print(render(found, terminal_style(args.color)))
    if missing:
        print(f"casty-sa: no events or snapshot for entity {args.entity_id!r}", file=sys.stderr)
        return ExitCode.NO_SUCH_ENTITY
    return ExitCode.OK


# -- rendering ----------------------------------------------------------------------------------


def render(found: JournalSummary | EntityDetail, style: Style) -> str:
    """What ``inspect`` prints as text: a summary's totals and a table of its page of
    entities, or an entity's counts and snapshot and a table of its events.

    Parameters
    ----------
    found : JournalSummary | EntityDetail
        What :func:`~casty_sa.inspection.summarize` or
        :func:`~casty_sa.inspection.entity_detail` returned.
    style : Style
        Colours and width.
    """
    if isinstance(found, JournalSummary):
        return _render_summary(found, style)
    return _render_entity(found, style)


def _render_summary(summary: JournalSummary, style: Style) -> str:
    """The summary as text: totals, then an aligned table of the page of entities."""
    revision = summary.revision or "none (tables made by the application's migrations)"
    if summary.revision == summary.head:
        revision += " (head)"
    lines = fields(
        [
            ("database", summary.database),
            ("revision", revision),
            ("entities", f"{'~' * summary.estimated}{summary.entities:,}"),
            ("events", f"{'~' * summary.estimated}{summary.events:,}"),
            ("snapshots", f"{'~' * summary.estimated}{summary.snapshots:,}"),
        ],
        style,
    )
    if summary.estimated:
        lines.append(
            "(totals are PostgreSQL's estimates, from its statistics; --exact counts them, "
            "reading the tables whole)"
        )
    if summary.page:
        lines.append("")
        lines += table(
            ["ENTITY", "EVENTS", "HIGHEST SEQ", "SNAPSHOT AT"],
            [
                [
                    printable(entity.entity_id),
                    f"{entity.events:,}",
                    _or_dash(entity.highest_sequence_nr),
                    _or_dash(entity.snapshot_sequence_nr),
                ]
                for entity in summary.page
            ],
            right={1, 2, 3},
            flex=0,
            style=style,
        )
    if summary.next_after is not None:
        lines.append("")
        lines.append(
            style.paint(
                f"(first {len(summary.page)} entities shown; next page: "
                f"--after {shell_quote(summary.next_after)})",
                DIM,
            )
        )
    return "\n".join(lines)


def _render_entity(detail: EntityDetail, style: Style) -> str:
    """One entity as text: counts, snapshot, then an aligned table of its events."""
    highest = detail.highest_sequence_nr
    events = f"{detail.events:,}" + (
        "" if highest is None else f" (highest sequence number {highest})"
    )
    snapshot = (
        style.paint("none", DIM)
        if detail.snapshot is None
        else f"at {detail.snapshot.sequence_nr}, {when(detail.snapshot.timestamp)}, "
        f"{len(detail.snapshot.raw):,} bytes: {painted(_shown(detail.snapshot), style)}"
    )
    lines = fields(
        [("entity", printable(detail.entity_id)), ("events", events), ("snapshot", snapshot)],
        style,
    )
    if detail.page:
        lines.append("")
        lines += table(
            ["SEQ", "POSITION", "TIMESTAMP (UTC)", "TYPE", "BYTES", "EVENT"],
            [
                [
                    str(e.sequence_nr),
                    _or_dash(e.position),
                    when(e.timestamp),
                    ("-", DIM) if e.event_type is None else printable(e.event_type),
                    f"{len(e.raw):,}",
                    _shown(e),
                ]
                for e in detail.page
            ],
            right={0, 1, 4},
            flex=5,
            style=style,
        )
    if detail.next_from is not None:
        lines.append("")
        lines.append(style.paint(f"(more events; next page: --from {detail.next_from})", DIM))
    return "\n".join(lines)


def as_dict(found: JournalSummary | EntityDetail) -> dict[str, Any]:
    """What ``--json`` prints: plain JSON types, payloads as text or base64.

    Parameters
    ----------
    found : JournalSummary | EntityDetail
        What :func:`~casty_sa.inspection.summarize` or
        :func:`~casty_sa.inspection.entity_detail` returned.
    """
    if isinstance(found, JournalSummary):
        return {
            "database": found.database,
            "revision": found.revision,
            "head": found.head,
            "entities": found.entities,
            "events": found.events,
            "snapshots": found.snapshots,
            "estimated": found.estimated,
            "page": [
                {
                    "entity_id": e.entity_id,
                    "events": e.events,
                    "highest_sequence_nr": e.highest_sequence_nr,
                    "snapshot_sequence_nr": e.snapshot_sequence_nr,
                }
                for e in found.page
            ],
            "next_after": found.next_after,
        }
    return {
        "database": found.database,
        "entity_id": found.entity_id,
        "events": found.events,
        "highest_sequence_nr": found.highest_sequence_nr,
        "snapshot": None if found.snapshot is None else _payload_dict(found.snapshot, "state"),
        "page": [_payload_dict(e, "event") for e in found.page],
        "next_from": found.next_from,
    }


def _payload_dict(payload: Payload, key: str) -> dict[str, Any]:
    """A payload for JSON: decoded text under ``key``, else base64 bytes."""
    item: dict[str, Any] = {
        "sequence_nr": payload.sequence_nr,
        "timestamp": payload.timestamp,
        "size": len(payload.raw),
    }
    if key == "event":  # its type and place in the global order (journal.events' offset)
        item |= {
            "event_type": payload.event_type,
            "position": payload.position,
            "offset": payload.offset,
        }
    if payload.decoded is not None:
        item[key] = payload.decoded
    else:
        item["payload_base64"] = base64.b64encode(payload.raw).decode("ascii")
        if payload.error is not None:
            item["error"] = payload.error
    return item


def _shown(payload: Payload) -> Cell:
    """The table cell of a payload: decoded text, a red error, or the bytes."""
    if payload.decoded is not None:
        return printable(payload.decoded)
    if payload.error is not None:
        return (printable(payload.error), RED)
    return (repr(payload.raw), CYAN)


def _or_dash(value: int | None) -> Cell:
    """A number, or a dim ``-`` for none."""
    return ("-", DIM) if value is None else str(value)
