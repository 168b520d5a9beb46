"""A stored event or snapshot as ``inspect`` shows it: its bytes, decoded when asked, and an
event's type and place in the global order.

Examples
--------
>>> import pickle
>>> shown = stored_payload(3, 1.5, pickle.dumps("opened"), pickle.loads, "str", 0, 0, -2)
>>> shown.decoded, shown.event_type, shown.position, shown.offset
("'opened'", 'str', -2, '000000000000000000007ffffffffffffffe')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from casty_sa.ordering import format_offset

__all__ = ["Decoder", "Payload", "cannot_decode", "stored_payload"]

#: turns a payload's bytes back into the object (the journal's deserializer, or the user's)
Decoder = Callable[[bytes], Any]


@dataclass(frozen=True, slots=True)
class Payload:
    """A stored event or snapshot, with its payload decoded when asked.

    Parameters
    ----------
    sequence_nr : int
        Its sequence number.
    timestamp : float
        casty's ``time.time()`` when it was written.
    raw : bytes
        The stored bytes.
    decoded : str | None
        ``repr`` of the decoded object; ``None`` when not decoded or on failure.
    error : str | None
        Why decoding failed, if it did.
    event_type, position, offset : str | None, int | None, str | None
        An event's type (``None`` when stored before migration 0002 or copied from a
        casty file), its position and its offset in the global order (see
        :mod:`casty_sa.ordering`); all ``None`` for a snapshot.
    """

    sequence_nr: int
    timestamp: float
    raw: bytes
    decoded: str | None
    error: str | None
    event_type: str | None = None
    position: int | None = None
    offset: str | None = None


def stored_payload(
    seq: int, timestamp: float, raw: bytes, decode: Decoder | None, *place: Any
) -> Payload:
    """A stored row, decoded when a decoder is given (a failure is recorded, not raised).

    An event's row comes with ``place``: its ``event_type``, ``era``,
    ``transaction_id`` and ``position`` (``casty_sa.inspection.PLACE``).
    """
    event_type, era, transaction_id, position = place or (None, None, None, None)
    offset = format_offset(era, transaction_id, position) if place else None
    decoded = error = None
    if decode is not None:
        try:
            decoded = repr(decode(raw))
        except Exception as exc:  # noqa: BLE001 - whatever the decoder raises is shown
            error = cannot_decode(exc)
    return Payload(seq, timestamp, raw, decoded, error, event_type, position, offset)


def cannot_decode(exc: Exception) -> str:
    """Why a payload did not decode, with what to do when its class cannot be found.

    Examples
    --------
    >>> error = AttributeError("Can't get attribute 'Deposited' on <module '__main__'>")
    >>> "--decoder MODULE:FUNCTION" in cannot_decode(error)
    True
    """
    text = f"cannot decode: {type(exc).__name__}: {exc}"
    if "__main__" in str(exc):
        return text + (
            " (the event's class was defined in the writing script's __main__, which this "
            "process is not: move the classes into a module this process can import, or pass "
            "--decoder MODULE:FUNCTION, or --raw)"
        )
    if isinstance(exc, ImportError | AttributeError):  # pickle looks classes up by module
        return text + (
            " (the payload names a class this process cannot import: run inspect where the "
            "application's modules are importable, or pass --decoder MODULE:FUNCTION, or --raw)"
        )
    return text
