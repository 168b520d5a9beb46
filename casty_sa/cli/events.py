"""``casty-sa events``: every event in the global order, a DBA's and developer's ``tail -f``.

Reads :meth:`SAJournal.events <casty_sa.SAJournal.events>` and prints one line per
event (offset, entity, sequence number, type, timestamp, a short repr of the event)
or, with ``--json``, one JSON object per line. ``--follow`` waits for new events
until Ctrl-C (exit status 130, as every interrupted command). A payload that does
not decode is shown as such, never ends the listing. Pass the last offset printed
as ``--after`` to go on from there.

Examples
--------
>>> from casty_sa.envelopes import EventEnvelope
>>> envelope = EventEnvelope("0" * 36, "acct-1", 1, "opened", 0.0, "str")
>>> print(line(envelope))
000000000000000000000000000000000000  acct-1  1  str  1970-01-01T00:00:00.000000+00:00  'opened'
>>> as_dict(envelope)["event"]
"'opened'"
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from casty_sa.cli.common import (
    Commands,
    ExitCode,
    UsageError,
    add_payload_options,
    payload_decoder,
    positive_int,
    url,
)
from casty_sa.cli.text import printable, when
from casty_sa.envelopes import EventEnvelope
from casty_sa.journal import SAJournal
from casty_sa.ordering import InvalidOffset, event_type_name
from casty_sa.payloads import cannot_decode

__all__ = ["as_dict", "line", "register"]

#: Characters of an event's repr on a line.
_SHOWN = 120


def register(commands: Commands) -> None:
    """Add ``events`` to ``casty-sa``."""
    events = commands.add(
        "events", "every event in the global order; --follow waits for new ones", commands.database
    )
    events.add_argument("--after", metavar="OFFSET", help="start after this offset")
    events.add_argument(
        "--follow", action="store_true", help="wait for new events until Ctrl-C (like tail -f)"
    )
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.add_argument("--prefix", metavar="P", help="only entities whose id starts with P")
    events.add_argument(
        "--type",
        dest="types",
        action="append",
        metavar="T",
        help="only events of type T (module.QualName, or int, str, …); repeat for more",
    )
    events.add_argument("--limit", type=positive_int, metavar="N", help="stop after N events")
    add_payload_options(events)
    events.set_defaults(handler=_cmd_events)


@dataclass(frozen=True, slots=True)
class _Undecoded:
    """A payload shown as it is stored: ``--raw``, or a decoder that failed on it."""

    payload: bytes
    error: str | None = None

    def __repr__(self) -> str:
        return self.error if self.error is not None else repr(self.payload)


def _forgiving(decode: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """A deserializer that never fails: a payload it cannot decode stays bytes, with why."""

    def deserialize(payload: bytes) -> Any:
        if decode is None:
            return _Undecoded(payload)
        try:
            return decode(payload)
        except Exception as exc:  # noqa: BLE001 - shown on the event's line instead
            return _Undecoded(payload, cannot_decode(exc))

    return deserialize


def _cmd_events(args: argparse.Namespace) -> int:
    """``casty-sa events``: print the events, following new ones with ``--follow``."""
    database = url(args)
    decode = payload_decoder(args)
    journal = SAJournal(
        database,
        schema=args.schema,
        connect_timeout=args.connect_timeout,
        migrate=False,
        deserialize=_forgiving(decode),
    )
    types = args.types
    if types:
        # a row stored without a type whose payload is not decoded (--raw, or the decoder
        # failed) has a type nobody can tell: it is shown ("-"), never silently left out
        types = [*types, event_type_name(_Undecoded(b""))]
    # the arguments are checked before anything is opened (a bad offset is a usage error)
    try:
        stream = journal.events(
            args.after,
            live=args.follow,
            entity_prefix=args.prefix,
            event_types=types,
        )
    except (TypeError, ValueError) as exc:
        raise UsageError(f"casty-sa events: {exc}") from None
    show = _json_line if args.json else line
    try:
        asyncio.run(_print(journal, stream, show, args.limit))
    except InvalidOffset as exc:  # an offset of another database: found at the first read
        raise UsageError(f"casty-sa events: {exc}") from None
    return ExitCode.OK


async def _print(
    journal: SAJournal, stream: Any, show: Callable[[EventEnvelope], str], limit: int | None
) -> None:
    """Print each envelope as it comes (flushed: a pipe sees it at once), up to ``limit``."""
    printed = 0
    async with journal, stream:
        if limit is None or limit > 0:
            async for envelope in stream:
                print(show(envelope), flush=True)
                printed += 1
                if printed == limit:
                    break


def line(envelope: EventEnvelope) -> str:
    """One event as a line of text: offset, entity, sequence number, type, time, event."""
    shown = printable(repr(envelope.event))
    if len(shown) > _SHOWN:
        shown = shown[: _SHOWN - 1] + "…"
    return "  ".join(
        [
            envelope.offset,
            printable(envelope.entity_id),
            str(envelope.sequence_nr),
            printable(_event_type(envelope) or "-"),
            when(envelope.timestamp),
            shown,
        ]
    )


def as_dict(envelope: EventEnvelope) -> dict[str, Any]:
    """What ``--json`` prints of one event: the event as its repr, or the raw payload."""
    found: dict[str, Any] = {
        "offset": envelope.offset,
        "entity_id": envelope.entity_id,
        "sequence_nr": envelope.sequence_nr,
        "event_type": _event_type(envelope),
        "timestamp": envelope.timestamp,
    }
    event = envelope.event
    if isinstance(event, _Undecoded):
        found["payload_base64"] = base64.b64encode(event.payload).decode()
        if event.error is not None:
            found["error"] = event.error
    else:
        found["event"] = repr(event)
    return found


def _event_type(envelope: EventEnvelope) -> str | None:
    """The envelope's type, unless it only names the stand-in of a payload not decoded
    (a row stored without a type, shown raw)."""
    event = envelope.event
    if isinstance(event, _Undecoded) and envelope.event_type == event_type_name(event):
        return None
    return envelope.event_type


def _json_line(envelope: EventEnvelope) -> str:
    return json.dumps(as_dict(envelope), ensure_ascii=False)
