"""What is checked before anything is written: entity ids, and one history per shared entity.

Rule 1 of :mod:`casty_sa.transfer` (equal content under every shared key) is the
comparison's (:func:`casty_sa.transfer.compare.compare`); this module adds rules 2 to 4
from the two sides' statistics and the comparison's counts of equal events, and refuses
an entity id the journal would refuse (:func:`casty_sa.codec.check_entity_id`).

Examples
--------
>>> check_entity_ids(JournalStats({}, {"": 3}))  # doctest: +ELLIPSIS
Traceback (most recent call last):
casty_sa.errors.InvalidEventError: the source holds entity id '' (length 0), which ... empty; ...
"""

from __future__ import annotations

from casty_sa.codec import check_entity_id
from casty_sa.errors import InvalidEventError
from casty_sa.transfer.compare import Comparison
from casty_sa.transfer.endpoint import Endpoint
from casty_sa.transfer.values import EntityStats, JournalStats, Mismatch

__all__ = ["check_entity_ids", "check_one_history"]

#: (entity id, position) to how many of the target's events of the entity are at or below it
_Counts = dict[tuple[str, int], int | None]


def check_entity_ids(stats: JournalStats) -> None:
    """Refuse, before copying anything, an entity id the journal refuses.

    Raises
    ------
    InvalidEventError
        Naming the first such id and :func:`casty_sa.codec.check_entity_id`'s reason.
    """
    for entity in stats.events.keys() | stats.snapshots.keys():
        try:
            check_entity_id(entity)
        except InvalidEventError as exc:
            raise InvalidEventError(
                f"the source holds entity id {entity[:60]!r} (length {len(entity)}), which "
                f"casty-sa cannot store: {exc}; nothing was copied"
            ) from None


async def check_one_history(
    target: Endpoint,
    src: JournalStats,
    dst: JournalStats,
    shared: set[str],
    compared: Comparison,
) -> None:
    """Add to ``compared`` every shared entity not proven to be one history on both sides.

    ``compared`` is the comparison of the shared entities' source rows with the
    target's (rule 1); this checks rules 2 to 4 with its per-entity counts of
    equal events and the two sides' statistics, counting the target's events
    only for entities whose statistics have gaps.
    """
    candidates = sorted(shared - compared.entities)
    counts = await _target_counts(target, src, dst, candidates)
    for entity in candidates:
        why = _unproven(entity, src, dst, counts, compared.matched[entity])
        if why is not None:
            ours = _holding(src.events.get(entity), src.snapshots.get(entity))
            compared.add(Mismatch(entity, "history", ours, why))


async def _target_counts(
    target: Endpoint, src: JournalStats, dst: JournalStats, candidates: list[str]
) -> _Counts:
    """The target's events of each candidate at or below the positions the rules look at.

    Those are the source's highest position and the target's snapshot; the
    statistics tell most counts, the target counts the others (gaps).
    """
    counts: _Counts = {}
    for entity in candidates:
        theirs, snapshot = dst.events.get(entity), dst.snapshots.get(entity)
        highest = _highest(src, entity)
        counts[entity, highest] = _events_up_to(theirs, highest)
        if snapshot is not None:
            counts[entity, snapshot] = _events_up_to(theirs, snapshot)
    unknown = [key for key, count in counts.items() if count is None]
    if unknown:
        counts.update(zip(unknown, await target.count_events(unknown), strict=True))
    return counts


def _unproven(
    entity: str, src: JournalStats, dst: JournalStats, counts: _Counts, matched: int
) -> str | None:
    """Why an entity is not proven one history (rules 2 to 4), or ``None`` when it is."""
    theirs = dst.events.get(entity)
    our_snapshot, their_snapshot = src.snapshots.get(entity), dst.snapshots.get(entity)
    highest = _highest(src, entity)
    same_snapshot = their_snapshot is not None and their_snapshot == our_snapshot
    unvouched = (counts[entity, highest] or 0) - matched
    if unvouched > 0 and theirs is not None:  # rule 2
        return (
            f"{_span(theirs)}, {unvouched} of them at or below {highest} not in the source: "
            "they cannot be compared"
            + (" (a snapshot cannot be compared with events)" if our_snapshot else "")
        )
    if (
        their_snapshot is not None
        and not same_snapshot
        and not (
            theirs is not None
            and theirs.first <= 1
            and counts[entity, their_snapshot] == their_snapshot - theirs.first + 1
        )
    ):  # rule 3
        return (
            f"a snapshot at {their_snapshot} without its events 1..{their_snapshot}: it "
            "cannot be compared with the source's rows and may summarize another history"
        )
    if matched == 0 and not same_snapshot:  # rule 4
        return f"{_holding(theirs, their_snapshot)}: no row in common to compare"
    return None


def _events_up_to(stats: EntityStats | None, bound: int) -> int | None:
    """How many of an entity's events are at or below ``bound``, when its statistics tell."""
    if stats is None or bound < stats.first:
        return 0
    if stats.last <= bound:
        return stats.events
    if stats.contiguous:
        return bound - stats.first + 1
    return None  # a gap: only a count can tell


def _span(stats: EntityStats) -> str:
    """An entity's events for a message: ``events 1..9``, or a count when there are gaps."""
    if stats.contiguous:
        return f"events {stats.first}..{stats.last}"
    return f"{stats.events} events from {stats.first} to {stats.last}"


def _holding(stats: EntityStats | None, snapshot: int | None) -> str:
    """What one side holds of an entity, for a message."""
    events = "no events" if stats is None else _span(stats)
    return events if snapshot is None else f"a snapshot at {snapshot} and {events}"


def _highest(stats: JournalStats, entity: str) -> int:
    """An entity's highest position on one side: its last event or its snapshot."""
    events = stats.events.get(entity)
    return max(events.last if events is not None else 0, stats.snapshots.get(entity, 0))
