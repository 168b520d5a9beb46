"""The checks of the read side's arguments: offsets, prefixes, type names (no I/O).

Every one raises at the call with a message that says what is wrong, so a reader's
bad input never reaches the database.

Examples
--------
>>> check_text("entity_prefix", "acct-")
'acct-'
>>> check_types(["app.Deposited"])
frozenset({'app.Deposited'})
"""

from __future__ import annotations

from collections.abc import Collection

from casty_sa.backends.read_statements import Place
from casty_sa.models import MAX_ENTITY_ID_LENGTH
from casty_sa.ordering import (
    MAX_ERA,
    MAX_TRANSACTION_ID,
    InvalidOffset,
    format_offset,
    parse_offset,
)

__all__ = ["check_offset", "check_text", "check_types", "refuse_ahead"]


def check_offset(after: object) -> Place:
    """The place an ``after=`` offset names; InvalidOffset when no database holds it."""
    era, transaction_id, position = parse_offset(after)
    if era > MAX_ERA or transaction_id > MAX_TRANSACTION_ID:
        raise InvalidOffset(
            f"offset {after!r} names era {era} and transaction id {transaction_id}, beyond "
            f"what any casty-sa database holds (era <= {MAX_ERA}, transaction id < 2**63)"
        )
    return era, transaction_id, position


def refuse_ahead(after: Place, ceiling: Place | None) -> None:
    """Refuse an offset this database cannot have handed out (see ``SAJournal.events``)."""
    if ceiling is not None and after <= ceiling:
        return
    offset = format_offset(*after)
    if ceiling is None:
        where = "this database holds no event at all"
    else:
        where = f"the highest place this database can have handed out is {format_offset(*ceiling)}"
    raise InvalidOffset(
        f"offset {offset} is ahead of everything this database holds ({where}): it comes "
        "from another database, or this one was restored from an older copy. Reading on "
        "from it would wait for events that never come, or skip some; resume from an "
        "offset this database gave, or from the start (after=None)"
    )


def check_text(name: str, value: object) -> str | None:
    """A prefix or an entity id to compare with: a str any backend can hold, or None."""
    if value is None:
        return None
    if type(value) is not str:
        raise TypeError(f"{name} must be a str or None, not {type(value).__name__}")
    if len(value) > MAX_ENTITY_ID_LENGTH:
        raise ValueError(
            f"{name} is {len(value)} characters long; no entity id is longer than "
            f"{MAX_ENTITY_ID_LENGTH}"
        )
    if "\x00" in value or not _encodable(value):
        raise ValueError(f"{name} {value[:60]!r} holds a NUL or is not valid Unicode text")
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_types(event_types: object) -> frozenset[str] | None:
    """The wanted type names (:func:`casty_sa.ordering.event_type_name`), or None for all."""
    if event_types is None:
        return None
    if isinstance(event_types, str | bytes) or not isinstance(event_types, Collection):
        raise TypeError(
            "event_types must be a collection of type names (like {'app.Deposited'}), "
            f"not {type(event_types).__name__}"
        )
    names = frozenset(event_types)
    if not names:
        raise ValueError("event_types is empty: no event would match (None means every type)")
    for name in names:
        if type(name) is not str or not name or not _encodable(name) or "\x00" in name:
            raise ValueError(f"event_types holds {name!r}, which is not a type name")
    return names
