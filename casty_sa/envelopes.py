"""Rows of the read side's pages as :class:`EventEnvelope` objects: decoded, typed, filtered.

A page's rows come as ``(era, transaction_id, position, entity_id, sequence_nr,
payload, timestamp, event_type)``. A row whose ``event_type`` is known and wanted
takes the fast way (a hundred thousand envelopes a second is the point of a
catch-up read); a row stored without a type (before migration ``0002``, or copied
from a casty file) or with a cut one is decoded first, and its type told by the
event itself.

Examples
--------
>>> import pickle
>>> stored = (0, 7, 3, "acct-1", 1, pickle.dumps("opened"), 0.5, None)
>>> [row] = envelopes([stored], pickle.loads, None)
>>> row.offset[:20], row.event, row.event_type
('00000000000000000007', 'opened', 'str')
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, NamedTuple

from casty_sa.errors import PayloadDecodeError
from casty_sa.ordering import (
    event_type_name,
    format_offset,
    full_type_name,
    offset_head,
    offset_tail,
)

__all__ = ["EventEnvelope", "envelopes"]


class EventEnvelope(NamedTuple):
    """One event as the read side delivers it (immutable; a named tuple, which costs the
    least to make a hundred thousand times a second).

    Attributes
    ----------
    offset : str
        Its place in the global order (36 hex digits, sortable as a string): store
        it and pass it as ``after=`` to resume after this event.
    entity_id, sequence_nr, event, timestamp
        As ``persist`` stored them (the event decoded by the journal's deserializer).
    event_type : str
        The event's type name (:func:`casty_sa.ordering.event_type_name`).
    """

    offset: str
    entity_id: str
    sequence_nr: int
    event: Any
    timestamp: float
    event_type: str


def envelopes(
    rows: list[Any], deserialize: Callable[[bytes], Any], types: Collection[str] | None
) -> list[EventEnvelope]:
    """The envelopes of a page's rows that are of a wanted type (``types``; ``None``: all).

    The database filters by type where it can; rows it could not judge (no type
    stored, a cut one, SQLite without ``json_each``) are judged here.
    """
    found: list[EventEnvelope] = []
    head_of, head = (-1, -1), ""
    for row in rows:
        era, transaction_id, position, entity_id, sequence_nr, payload, timestamp, stored = row
        if stored is None or stored[-1:] == "…" or (types is not None and stored not in types):
            envelope = _judged(row, deserialize, types)
            if envelope is not None:
                found.append(envelope)
            continue
        if (era, transaction_id) != head_of:  # one head per transaction, not per row
            head_of, head = (era, transaction_id), offset_head(era, transaction_id)
        try:
            event = deserialize(payload)
        except Exception as exc:
            raise PayloadDecodeError(entity_id, sequence_nr, exc) from exc
        offset = head + offset_tail(position)
        found.append(EventEnvelope(offset, entity_id, sequence_nr, event, timestamp, stored))
    return found


def _judged(
    row: Any, deserialize: Callable[[bytes], Any], types: Collection[str] | None
) -> EventEnvelope | None:
    """The envelope of a row whose type is to be told here, or None when it is not wanted."""
    era, transaction_id, position, entity_id, sequence_nr, payload, timestamp, stored = row
    known = stored is not None and not stored.endswith("…")
    if known and types is not None and stored not in types:
        return None  # where the database could not filter (SQLite without json_each)
    try:
        event = deserialize(payload)
    except Exception as exc:
        raise PayloadDecodeError(entity_id, sequence_nr, exc) from exc
    if not known:
        # stored before 0002 (NULL) or cut: the decoded event tells
        name = event_type_name(event)
        if types is not None and name not in types and full_type_name(event) not in types:
            return None
        stored = name if stored is None else stored
    offset = format_offset(era, transaction_id, position)
    return EventEnvelope(offset, entity_id, sequence_nr, event, timestamp, stored)
