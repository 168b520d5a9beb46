"""Comparison by content: every source row looked up in the target by its key.

Payload bytes must be equal and timestamps equal bit for bit (``-0.0`` against ``0.0``
counts as equal only when a side, a casty file, cannot hold the sign of zero). Payloads are
never decoded. :func:`compare` runs before a copy (the shared entities, a key the target
lacks allowed) and after it (everything, nothing missing).

Examples
--------
>>> a, b = Row("acct-1", 1, 1.5, b"x"), Row("acct-1", 1, 1.5, b"y")
>>> difference(a, a, "event", zero_sign=True) is None
True
>>> difference(a, b, "event", zero_sign=True)
'event 1 (1 bytes, timestamp 1.5): payload differs'
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from casty_sa.transfer.endpoint import Endpoint
from casty_sa.transfer.values import MAX_REPORTED_MISMATCHES, Batch, Mismatch, Row

__all__ = ["Comparison", "compare", "difference"]


def _float_bits(value: float) -> bytes:
    """The IEEE 754 bits of a float: ``-0.0`` differs from ``0.0``, a NaN equals itself."""
    return struct.pack("<d", value)


def _zero_sign_only(ours: float, theirs: float) -> bool:
    """True when the two differ only in the sign of zero (``-0.0`` against ``0.0``)."""
    return ours == 0.0 and theirs == 0.0 and _float_bits(ours) != _float_bits(theirs)


def _describe_row(row: Row, kind: str) -> str:
    """A row for a mismatch message: its size and timestamp, never its payload."""
    return f"{kind} {row.sequence_nr} ({len(row.payload):,} bytes, timestamp {row.timestamp!r})"


def difference(ours: Row, theirs: Row | None, kind: str, *, zero_sign: bool) -> str | None:
    """What the target's row under a key has that the source's has not; ``None`` when equal.

    Timestamps are compared bit for bit; without ``zero_sign`` (a side cannot
    hold the sign of zero) ``-0.0`` and ``0.0`` are the same.
    """
    if theirs is None:
        return "none"
    payload_same = ours.payload == theirs.payload
    time_same = _float_bits(ours.timestamp) == _float_bits(theirs.timestamp) or (
        not zero_sign and _zero_sign_only(ours.timestamp, theirs.timestamp)
    )
    if payload_same and time_same:
        return None
    what = " and ".join(
        name for name, same in (("payload", payload_same), ("timestamp", time_same)) if not same
    )
    return f"{_describe_row(theirs, kind)}: {what} differ{'s' if ' and ' not in what else ''}"


@dataclass(slots=True)
class Comparison:
    """Differences found by :func:`compare`, one per entity and kind, in key order."""

    missing_ok: bool
    zero_sign: bool
    differences: list[Mismatch] = field(default_factory=list)
    entities: set[str] = field(default_factory=set)
    events_seen: int = 0
    snapshots_seen: int = 0
    events_compared: int = 0
    snapshots_compared: int = 0
    snapshots_newer: int = 0
    zero_signs_lost: int = 0
    #: per entity, the target's events found equal to the source's
    matched: Counter[str] = field(default_factory=Counter)
    _last: tuple[str, str] | None = None

    @property
    def count(self) -> int:
        """Number of entities with a difference."""
        return len(self.entities)

    def add(self, mismatch: Mismatch) -> None:
        """Record the first difference of an entity (later ones of it are skipped)."""
        key = (mismatch.entity_id, mismatch.what)
        if key == self._last:  # rows come in key order: an entity's rows are adjacent
            return
        self._last = key
        self.entities.add(mismatch.entity_id)
        if len(self.differences) < MAX_REPORTED_MISMATCHES:
            self.differences.append(mismatch)

    def equal(self, ours: Row, theirs: Row) -> None:
        """Count a target row found equal to the source's."""
        self.zero_signs_lost += _zero_sign_only(ours.timestamp, theirs.timestamp)


async def compare(
    source: Endpoint,
    target: Endpoint,
    batch: Batch,
    *,
    only: set[str] | None,
    missing_ok: bool,
) -> Comparison:
    """Compare, by content, every source row (of the entities ``only``) with the target's.

    The source is read in key order, a batch at a time; the target's rows under
    the same keys are looked up by primary key, so memory stays one batch
    whatever the sizes. A target row under a source key must have the same
    payload bytes and timestamp bits. A key the target lacks is a difference
    unless ``missing_ok`` (before a copy, which brings it). A target snapshot
    at a higher sequence number is newer, not different (a snapshot never moves
    backwards); one at a lower number is a difference unless ``missing_ok``.
    Timestamps are compared as both sides can hold them (see :func:`difference`).
    """
    result = Comparison(missing_ok, zero_sign=source.keeps_zero_sign and target.keeps_zero_sign)
    after: tuple[str, int] | None = None
    while rows := await source.read_events(after, batch.rows, batch.bytes):
        after = (rows[-1].entity_id, rows[-1].sequence_nr)
        result.events_seen += len(rows)
        if wanted := _wanted(rows, only):
            keys = [(row.entity_id, row.sequence_nr) for row in wanted]
            held = {
                (row.entity_id, row.sequence_nr): row for row in await target.fetch_events(keys)
            }
            for row, key in zip(wanted, keys, strict=True):
                _compare_event(result, row, held.get(key))
    entity_after: str | None = None
    while rows := await source.read_snapshots(entity_after, batch.rows, batch.bytes):
        entity_after = rows[-1].entity_id
        result.snapshots_seen += len(rows)
        if wanted := _wanted(rows, only):
            entities = [row.entity_id for row in wanted]
            held_snapshots = {row.entity_id: row for row in await target.fetch_snapshots(entities)}
            for row in wanted:
                _compare_snapshot(result, row, held_snapshots.get(row.entity_id))
    return result


def _wanted(rows: Sequence[Row], only: set[str] | None) -> Sequence[Row]:
    """The rows of the entities ``only`` (all of them for ``None``)."""
    return rows if only is None else [row for row in rows if row.entity_id in only]


def _compare_event(result: Comparison, ours: Row, theirs: Row | None) -> None:
    """Record how the target's event under a source event's key compares with it."""
    if theirs is None and result.missing_ok:
        return
    found = difference(ours, theirs, "event", zero_sign=result.zero_sign)
    if theirs is not None and found is None:
        result.events_compared += 1
        result.matched[ours.entity_id] += 1
        result.equal(ours, theirs)
    if found is not None:
        expected = _describe_row(ours, "event")
        result.add(Mismatch(ours.entity_id, "events", expected, found, ours.sequence_nr))


def _compare_snapshot(result: Comparison, ours: Row, theirs: Row | None) -> None:
    """Record how the target's snapshot of a source snapshot's entity compares with it."""
    if theirs is not None and theirs.sequence_nr > ours.sequence_nr:
        result.snapshots_newer += 1
        return
    if theirs is None or theirs.sequence_nr < ours.sequence_nr:
        if result.missing_ok:
            return
        found = "none" if theirs is None else f"an older snapshot at {theirs.sequence_nr}"
    else:
        found = difference(ours, theirs, "snapshot at", zero_sign=result.zero_sign) or ""
    if found:
        expected = _describe_row(ours, "snapshot at")
        result.add(Mismatch(ours.entity_id, "snapshot", expected, found, ours.sequence_nr))
    else:
        result.snapshots_compared += 1
        if theirs is not None:  # (always: equal content under the same position)
            result.equal(ours, theirs)
