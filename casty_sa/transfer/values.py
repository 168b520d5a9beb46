"""The values a copy passes around and reports: rows, statistics, progress, mismatches, the report.

Examples
--------
>>> Progress(events_done=5, events_total=10, snapshots_done=0, snapshots_total=0).fraction
0.5
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

#: Rows per batch (and per target transaction) unless told otherwise.
DEFAULT_BATCH_SIZE = 1000

#: Mismatching entities kept in a :class:`TransferReport` (the count covers all).
MAX_REPORTED_MISMATCHES = 20


@dataclass(frozen=True, slots=True)
class Row:
    """One event or snapshot row, with its payload as stored (serializer bytes).

    Both sides of a copy read and write rows in this one shape.

    Parameters
    ----------
    entity_id : str
        The entity the row belongs to.
    sequence_nr : int
        The event's sequence number, or the one a snapshot covers.
    timestamp : float
        casty's ``time.time()`` of the event or snapshot.
    payload : bytes
        The serializer's bytes, never decoded by a copy.
    event_type : str | None
        An event's ``event_type`` as the source stores it; ``None`` for a
        snapshot, a row stored before migration ``0002``, or one from a casty
        file (which has no such column). Its place in the global order is not
        carried: that belongs to one database, and the target gives it its own.
    """

    entity_id: str
    sequence_nr: int
    timestamp: float
    payload: bytes
    event_type: str | None = None


@dataclass(frozen=True, slots=True)
class EntityStats:
    """How many events one entity has, and its lowest and highest sequence numbers.

    Parameters
    ----------
    events : int
        Number of stored events.
    first, last : int
        Lowest and highest stored sequence number.

    Examples
    --------
    >>> EntityStats(events=3, first=1, last=3).contiguous
    True
    >>> EntityStats(events=2, first=1, last=3).contiguous
    False
    """

    events: int
    first: int
    last: int

    @property
    def contiguous(self) -> bool:
        """True when every sequence number from ``first`` to ``last`` is stored."""
        return self.events == self.last - self.first + 1


@dataclass(frozen=True, slots=True)
class JournalStats:
    """Per-entity event statistics and snapshot positions of one side of a copy.

    Parameters
    ----------
    events : dict[str, EntityStats]
        Entity id to its event statistics (entities with events only).
    snapshots : dict[str, int]
        Entity id to the sequence number its snapshot covers.
    """

    events: dict[str, EntityStats]
    snapshots: dict[str, int]

    @property
    def event_count(self) -> int:
        """Total number of events."""
        return sum(stats.events for stats in self.events.values())

    @property
    def entity_count(self) -> int:
        """Number of distinct entities having events or a snapshot."""
        return len(self.events.keys() | self.snapshots.keys())


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a copy is, handed to the ``on_progress`` callback after every batch.

    Parameters
    ----------
    events_done, events_total : int
        Source events handled so far (copied or already present), and in all.
    snapshots_done, snapshots_total : int
        The same for snapshots.
    """

    events_done: int
    events_total: int
    snapshots_done: int
    snapshots_total: int

    @property
    def fraction(self) -> float:
        """Share of all rows handled, from 0.0 to 1.0."""
        total = self.events_total + self.snapshots_total
        return 1.0 if total == 0 else (self.events_done + self.snapshots_done) / total


@dataclass(frozen=True, slots=True)
class Mismatch:
    """An entity whose target does not hold what its source holds.

    One type for both findings: a fork (found before a copy, which is then
    refused) and a mismatch (found by the verification after it).

    Parameters
    ----------
    entity_id : str
        The entity whose two sides differ.
    what : str
        ``"events"`` or ``"snapshot"`` (content differs under a key), or
        ``"history"`` (the two sides cannot be proven one history: see
        rules 2 to 4 of :mod:`casty_sa.transfer`).
    expected : str
        What the source holds (e.g. ``"event 3 (41 bytes, timestamp 1.5)"``).
    found : str
        What the target holds under the same key.
    sequence_nr : int | None
        The first sequence number at which the two sides differ (for
        ``"events"``), or the source snapshot's (for ``"snapshot"``).

    Examples
    --------
    >>> print(Mismatch("acct-1", "events", "event 2 (5 bytes)", "none", 2))
    'acct-1': events: first differs at sequence number 2: source has event 2 (5 bytes), target none
    """

    entity_id: str
    what: str
    expected: str
    found: str
    sequence_nr: int | None = None

    def __str__(self) -> str:
        at = (
            ""
            if self.sequence_nr is None
            else f"first differs at sequence number {self.sequence_nr}: "
        )
        return (
            f"{self.entity_id!r}: {self.what}: {at}source has {self.expected}, target {self.found}"
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return asdict(self)


@dataclass(frozen=True)
class TransferReport:
    """The outcome of a copy, with the verification by content at its end.

    Parameters
    ----------
    source, target : str
        Where the copy read and wrote (passwords masked).
    entities, events, snapshots : int
        What the source holds at the end of the copy.
    events_copied : int
        Events written to the target by this run.
    events_present : int
        Source events the target already held (an earlier run, or skipped).
    snapshots_copied : int
        Snapshots written (new, or replacing an older one).
    snapshots_present : int
        Source snapshots the target held at the same or a higher sequence number.
    mismatches : tuple[Mismatch, ...]
        Entities failing the verification (empty when verified); at most
        :data:`MAX_REPORTED_MISMATCHES` are kept, ``mismatch_count`` has them all.
    mismatch_count : int
        Number of entities failing the verification.
    target_ahead : int
        Entities for which the target holds more events than the source (the
        target was in use already); not an error.
    source_changed : bool
        The source was written to during the copy: rerun to pick up the rest.
    seconds : float
        Wall-clock duration.
    forks : tuple[Mismatch, ...]
        Entities for which the target already held other content under the
        source's keys (another history): the copy was refused and nothing
        written. At most :data:`MAX_REPORTED_MISMATCHES`; ``fork_count`` has them all.
    fork_count : int
        Number of such entities.
    events_compared, snapshots_compared : int
        Source events and snapshots whose content the final verification
        compared with the target's (every one of the source, unless refused).
    snapshots_newer : int
        Source snapshots for which the target holds a newer one (a higher
        sequence number), kept because a snapshot never moves backwards; its
        content has nothing to be compared with, and it is not a fork.
    zero_signs_lost : int
        Timestamps compared equal although one side holds ``-0.0`` and the
        other, a casty file, ``0.0``: casty's file format cannot hold the sign
        of zero (an export writes ``-0.0`` as ``0.0``).
    """

    source: str
    target: str
    entities: int
    events: int
    snapshots: int
    events_copied: int
    events_present: int
    snapshots_copied: int
    snapshots_present: int
    mismatches: tuple[Mismatch, ...] = ()
    mismatch_count: int = 0
    target_ahead: int = 0
    source_changed: bool = False
    seconds: float = field(default=0.0, compare=False)
    forks: tuple[Mismatch, ...] = ()
    fork_count: int = 0
    events_compared: int = 0
    snapshots_compared: int = 0
    snapshots_newer: int = 0
    zero_signs_lost: int = 0

    @property
    def refused(self) -> bool:
        """True when the target held another history and nothing was copied."""
        return self.fork_count > 0

    @property
    def verified(self) -> bool:
        """True when content was compared and the target holds every event and snapshot.

        Every source event is in the target with the same payload bytes and
        timestamp; every source snapshot is there the same, or the target's
        is newer (``snapshots_newer``).
        """
        return (
            not self.refused
            and self.mismatch_count == 0
            and self.events_compared == self.events
            and self.snapshots_compared + self.snapshots_newer == self.snapshots
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the report (for ``--json``): its fields and verdicts."""
        fields = asdict(self)  # nested Mismatch values become dicts too
        return {
            **fields,
            "forks": list(fields["forks"]),
            "mismatches": list(fields["mismatches"]),
            "refused": self.refused,
            "verified": self.verified,
            "seconds": round(self.seconds, 3),
        }


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True, slots=True)
class Batch:
    """How much one batch of a copy carries at most: rows, and bytes of rows."""

    rows: int
    bytes: int
