"""What a projection reports about itself: each slice's offset, owner, lag and last error.

The lag of a slice is what the journal holds after its offset
(:meth:`SAJournal.backlog <casty_sa.SAJournal.backlog>`): how many events
(counted up to :data:`LAG_LIMIT`, so a status costs a bounded index walk) and
how old the oldest of them is. A slice's offset moves over every event it reads,
its own entities' and the others', so a slice that is caught up has no lag.

Examples
--------
>>> row = SliceStatus(0, None, 0, None, False, False, 0, 0.0, None, None)
>>> ProjectionStatus("balances", "stopped", (row,)).lag_events
0
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from casty_sa.event_stream import Backlog
from casty_sa.projections.offsets import OffsetRow

__all__ = ["LAG_LIMIT", "ProjectionStatus", "SliceStatus", "State", "never_ran", "slice_status"]

#: Most events a status counts after a slice's offset (the count says "at least" then).
LAG_LIMIT = 100_000

#: What this ``Projection`` object is doing: ``"stopped"`` (neither running nor catching
#: up), ``"catching up"``, ``"running"``, ``"stopping"``, ``"failed"`` (it stopped on an
#: error with ``on_error="stop"``, or on one it cannot retry).
State = Literal["stopped", "catching up", "running", "stopping", "failed"]


@dataclass(frozen=True, slots=True)
class SliceStatus:
    """One slice as the offsets table and the journal show it.

    Attributes
    ----------
    slice : int
        Its number (entities go to ``zlib.crc32(entity_id) % slices``).
    offset : str | None
        The offset of the last event it read (``None``: none yet).
    handled : int
        Events its handler applied since the last reset.
    owner : str | None
        The worker (``host:pid:tag``) that holds or last held its lease.
    held : bool
        Whether that worker's lease was unexpired when read (database clock).
    mine : bool
        Whether this ``Projection`` object holds it.
    lag_events : int
        Events in the journal after ``offset`` that the projection reads (at most
        :data:`LAG_LIMIT`).
    lag_seconds : float
        Age of the oldest of those events (by its ``timestamp``), 0.0 when none.
    last_error : str | None
        The failure that holds the slice back, until a batch passes it.
    last_error_at : float | None
        When it was recorded (seconds since 1970, database clock).
    """

    slice: int
    offset: str | None
    handled: int
    owner: str | None
    held: bool
    mine: bool
    lag_events: int
    lag_seconds: float
    last_error: str | None
    last_error_at: float | None


@dataclass(frozen=True, slots=True)
class ProjectionStatus:
    """A projection's slices and the state of the ``Projection`` object asked."""

    name: str
    state: State
    slices: tuple[SliceStatus, ...]

    @property
    def lag_events(self) -> int:
        """The largest lag of its slices, in events."""
        return max((s.lag_events for s in self.slices), default=0)

    @property
    def lag_seconds(self) -> float:
        """The largest lag of its slices, in seconds."""
        return max((s.lag_seconds for s in self.slices), default=0.0)

    @property
    def last_error(self) -> str | None:
        """The most recent error of any slice (``None``: no slice is held back)."""
        failed = [s for s in self.slices if s.last_error is not None]
        latest = max(failed, key=lambda s: s.last_error_at or 0.0, default=None)
        return None if latest is None else latest.last_error


def slice_status(row: OffsetRow, backlog: Backlog, mine: Collection[int]) -> SliceStatus:
    """The status of the slice ``row`` describes, ``backlog`` being what follows its offset."""
    oldest = backlog.oldest_timestamp
    return SliceStatus(
        slice=row.slice,
        offset=row.last_offset,
        handled=row.handled,
        owner=row.owner,
        held=row.held,
        mine=row.slice in mine,
        lag_events=backlog.events,
        lag_seconds=0.0 if oldest is None else max(0.0, time.time() - oldest),
        last_error=row.last_error,
        last_error_at=None if row.last_error_ms is None else row.last_error_ms / 1000,
    )


def never_ran(name: str, slices: int) -> list[OffsetRow]:
    """The rows of a projection whose rows are not made yet: each slice at the start,
    unowned (its lag is the whole journal)."""
    return [
        OffsetRow(name, index, slices, None, 0, 0, None, None, 0, None, None, 0)
        for index in range(slices)
    ]
