"""Projections: read models in the application's own tables, updated exactly once.

A :class:`~casty_sa.projections.projection.Projection` follows a journal's events
(:meth:`SAJournal.events <casty_sa.SAJournal.events>`) and hands each to the
application's handler with an ``AsyncSession``; the handler's writes and the
projection's new offset (:mod:`casty_sa.projections.offsets`) commit in one
transaction per batch, so a crash at any moment neither loses an event nor
applies one twice.
"""

from casty_sa.projections.offsets import Lease, OffsetRow, OffsetTable, SliceCountChanged
from casty_sa.projections.projection import Projection
from casty_sa.projections.status import ProjectionStatus, SliceStatus
from casty_sa.projections.worker import LEASE_KEY, slice_of

__all__ = [
    "LEASE_KEY",
    "Lease",
    "OffsetRow",
    "OffsetTable",
    "Projection",
    "ProjectionStatus",
    "SliceCountChanged",
    "SliceStatus",
    "slice_of",
]
