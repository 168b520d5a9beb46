"""Events in and out of rows: validation, encoding with the journal's serializer, decoding.

Every check runs before anything is sent, so a caller's bad input fails that caller alone
("nothing was stored") and never the group its write would have joined. Transfer and the
journal share these rules: an entity id the journal refuses is refused by an import too.

Examples
--------
>>> import pickle
>>> from casty import PersistedEvent
>>> rows = encode_events("alice", [PersistedEvent(1, "opened", 0.5)], pickle.dumps)
>>> rows[0][:3], rows[0][4]
(('alice', 1, 0.5), 'str')
>>> decode_events("alice", [(1, rows[0][3], 0.5)], pickle.loads)
[PersistedEvent(sequence_nr=1, event='opened', timestamp=0.5)]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from casty import PersistedEvent, Snapshot

from casty_sa.errors import InvalidEventError, PayloadDecodeError, PayloadEncodeError
from casty_sa.models import MAX_ENTITY_ID_LENGTH
from casty_sa.ordering import event_type_name

__all__ = [
    "MAX_SEQUENCE_NR",
    "ROW_COLUMNS",
    "EventRow",
    "Row",
    "Stored",
    "check_entity_id",
    "check_sequence_nr",
    "decode_events",
    "decode_snapshot",
    "encode_events",
    "encode_snapshot",
    "load_key",
]

#: Highest sequence number a 64-bit signed column holds.
MAX_SEQUENCE_NR = 2**63 - 1

#: (entity_id, sequence_nr, timestamp, payload) of a snapshot (and the first four
#: columns of both tables)
Row = tuple[str, int, float, bytes]
#: the names of a :data:`Row`'s columns
ROW_COLUMNS = ("entity_id", "sequence_nr", "timestamp", "payload")
#: a :data:`Row` of an event, with its ``event_type`` (see
#: :func:`casty_sa.ordering.event_type_name`)
EventRow = tuple[str, int, float, bytes, str]
#: (sequence_nr, payload, timestamp) of a stored event or snapshot, as reads return it
Stored = tuple[int, bytes, float]


def check_entity_id(entity_id: object) -> None:
    """Refuse an entity id no backend can store exactly as given."""
    if type(entity_id) is not str:
        raise InvalidEventError(f"entity_id must be a str, not {type(entity_id).__name__}")
    if not entity_id:
        raise InvalidEventError("entity_id must not be empty")
    if len(entity_id) > MAX_ENTITY_ID_LENGTH:
        raise InvalidEventError(
            f"entity_id is {len(entity_id)} characters long; casty-sa stores at most "
            f"{MAX_ENTITY_ID_LENGTH} ({entity_id[:40]!r}…)"
        )
    if not entity_id.isascii():
        try:
            entity_id.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidEventError(
                f"entity_id {entity_id[:60]!r} is not valid Unicode text ({exc.reason} at "
                f"position {exc.start}); use a string that encodes to UTF-8"
            ) from None
    if "\x00" in entity_id:
        raise InvalidEventError(
            f"entity_id {entity_id[:60]!r} contains a NUL character, which PostgreSQL text "
            "cannot hold; casty-sa refuses it on every backend"
        )


def check_sequence_nr(entity_id: str, seq: object) -> int:
    """``seq`` when it is an int a signed 64-bit column holds, from 1 up."""
    if type(seq) is not int or not 1 <= seq <= MAX_SEQUENCE_NR:
        raise InvalidEventError(
            f"sequence number {seq!r} of entity {entity_id!r} is not an int from 1 to "
            f"{MAX_SEQUENCE_NR}; nothing was stored"
        )
    return seq


def load_key(entity_id: str, from_sequence_nr: int) -> tuple[str, int] | None:
    """The key a ``load`` reads by; ``None`` when no event can be stored from there on."""
    check_entity_id(entity_id)
    if type(from_sequence_nr) is not int:
        raise InvalidEventError(
            f"from_sequence_nr must be an int, not {type(from_sequence_nr).__name__}"
        )
    if from_sequence_nr > MAX_SEQUENCE_NR:
        return None
    return (entity_id, max(from_sequence_nr, 0))


def _check_timestamp(entity_id: str, seq: int, timestamp: object) -> float:
    if type(timestamp) is float and timestamp == timestamp:
        return timestamp
    if isinstance(timestamp, int | float) and not isinstance(timestamp, bool):
        try:
            value = float(timestamp)
        except OverflowError:
            value = math.nan
        if value == value:  # not NaN: SQLite would store NULL, and NaN never equals itself
            return value
    raise InvalidEventError(
        f"timestamp {str(timestamp)[:40]} of entity {entity_id!r} at sequence number {seq} "
        "is not a number a float holds (casty uses time.time()); nothing was stored"
    )


def _encode(entity_id: str, seq: int, value: Any, serialize: Callable[[Any], bytes]) -> bytes:
    try:
        payload = serialize(value)
    except Exception as exc:
        raise PayloadEncodeError(entity_id, seq, exc) from exc
    if not isinstance(payload, bytes):
        raise PayloadEncodeError(
            entity_id,
            seq,
            TypeError(f"the serializer returned {type(payload).__name__}, not bytes"),
        )
    return payload


def encode_events(
    entity_id: str, events: Sequence[PersistedEvent[Any]], serialize: Callable[[Any], bytes]
) -> list[EventRow]:
    """The rows of one ``persist`` call, after checking every event of it."""
    check_entity_id(entity_id)
    rows: list[EventRow] = []
    previous = 0
    for event in events:
        seq = check_sequence_nr(entity_id, event.sequence_nr)
        if seq <= previous:
            raise InvalidEventError(
                f"sequence numbers of one persist call must increase: {seq} follows "
                f"{previous} for entity {entity_id!r}; nothing was stored"
            )
        previous = seq
        payload = _encode(entity_id, seq, event.event, serialize)
        timestamp = _check_timestamp(entity_id, seq, event.timestamp)
        rows.append((entity_id, seq, timestamp, payload, event_type_name(event.event)))
    return rows


def encode_snapshot(
    entity_id: str, snapshot: Snapshot[Any], serialize: Callable[[Any], bytes]
) -> Row:
    """The row of one ``save_snapshot`` call."""
    check_entity_id(entity_id)
    seq = check_sequence_nr(entity_id, snapshot.sequence_nr)
    payload = _encode(entity_id, seq, snapshot.state, serialize)
    return (entity_id, seq, _check_timestamp(entity_id, seq, snapshot.timestamp), payload)


def decode_events(
    entity_id: str, rows: Sequence[Stored], deserialize: Callable[[bytes], Any]
) -> list[PersistedEvent[Any]]:
    """Stored rows as events; a payload that fails is named by its sequence number."""
    try:
        return [PersistedEvent(seq, deserialize(payload), ts) for seq, payload, ts in rows]
    except Exception:
        # the fast path above cannot say which row failed: find it
        for seq, payload, _ts in rows:
            try:
                deserialize(payload)
            except Exception as exc:
                raise PayloadDecodeError(entity_id, seq, exc) from exc
        raise


def decode_snapshot(
    entity_id: str, row: Stored | None, deserialize: Callable[[bytes], Any]
) -> Snapshot[Any] | None:
    """A stored snapshot row as a ``Snapshot`` (``None`` stays ``None``)."""
    if row is None:
        return None
    seq, payload, ts = row
    try:
        state = deserialize(payload)
    except Exception as exc:
        raise PayloadDecodeError(entity_id, seq, exc, what="snapshot") from exc
    return Snapshot(seq, state, ts)
