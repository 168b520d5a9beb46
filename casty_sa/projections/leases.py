"""The leases one ``Projection`` object holds: taking slices, renewing, giving them back.

Each step is a short transaction of its own on the read model's database
(:mod:`casty_sa.projections.offsets` holds the statements). A lease counts as
held here only while its last renewal started less than ``lease_seconds`` ago on
this process's monotonic clock: the database lets another worker take the slice
``lease_seconds`` after that renewal at the earliest, so a worker that checks
:meth:`Leases.valid` before each batch never applies one after it could have been
taken over (what the at-least-once mode relies on; the exactly-once mode is
guarded by the fence as well).

Examples
--------
>>> owner_tag().count(":")
2
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from casty_sa.diagnosis import describe
from casty_sa.models import OWNER_LENGTH
from casty_sa.projections.offsets import Lease, OffsetRow, OffsetTable
from casty_sa.projections.tasks import settled

__all__ = ["Held", "Leases", "owner_tag"]

log = logging.getLogger("casty_sa.projections")


def owner_tag() -> str:
    """``host:pid:random``: who holds a lease, for people (host, pid) and for the table."""
    tag = f":{os.getpid()}:{secrets.token_hex(4)}"
    return socket.gethostname()[: OWNER_LENGTH - len(tag)] + tag


@dataclass(slots=True)
class Held:
    """A lease held, and when (monotonic) its last successful renewal started."""

    lease: Lease
    renewed: float


class Leases:
    """The slices of projection ``name`` this object holds (see the module docstring)."""

    def __init__(
        self,
        table: OffsetTable,
        sessions: async_sessionmaker[AsyncSession],
        name: str,
        lease_seconds: float,
    ) -> None:
        self.table = table
        self.sessions = sessions
        self.name = name
        self.owner = owner_tag()
        self.lease_seconds = lease_seconds
        self.lease_ms = max(1, round(lease_seconds * 1000))
        self.held: dict[int, Held] = {}

    def valid(self, index: int) -> Lease | None:
        """The lease of slice ``index`` if it is surely still this object's, else ``None``."""
        held = self.held.get(index)
        if held is None or time.monotonic() - held.renewed >= self.lease_seconds:
            return None
        return held.lease

    def extended(self, lease: Lease, started: float) -> None:
        """A batch that started at ``started`` (monotonic) committed: it renewed ``lease``."""
        held = self.held.get(lease.slice)
        if held is not None and held.lease == lease:
            held.renewed = max(held.renewed, started)

    async def acquire(self, index: int) -> OffsetRow | None:
        """Take slice ``index`` if nobody holds it: its row, or ``None``."""
        return await settled(self._acquire(index))

    async def revived(self, index: int) -> Lease | None:
        """The lease of slice ``index``, renewed at once if it lapsed here (a batch as long
        as a lease kept the renewals off its row): ``None`` if the database says it is lost
        (or it is not held). The renewal holds only while owner and fence match: nobody
        took the slice meanwhile."""
        lease, held = self.valid(index), self.held.get(index)
        if lease is not None or held is None:
            return lease
        started = time.monotonic()
        if not await settled(self._renew(held.lease)):
            return None
        held.renewed = max(held.renewed, started)
        return held.lease

    async def rows(self, index: int | None = None) -> list[OffsetRow]:
        """The projection's rows (or slice ``index``'s), read in a transaction of their own."""
        return await settled(self._rows(index))

    async def install(self, slices: int) -> None:
        """Make the projection's rows if it has none (see :meth:`OffsetTable.install`)."""
        await settled(self._install(slices))

    async def _rows(self, index: int | None) -> list[OffsetRow]:
        async with self.sessions() as session:
            return await self.table.rows(session, self.name, index)

    async def _install(self, slices: int) -> None:
        async with self.sessions() as session:
            await self.table.install(session, self.name, slices)
            await session.commit()

    async def _acquire(self, index: int) -> OffsetRow | None:
        started = time.monotonic()
        async with self.sessions() as session:
            row = await self.table.acquire(session, self.name, index, self.owner, self.lease_ms)
            await session.commit()
        if row is not None:  # noted here: a caller cancelled meanwhile still releases it
            self.held[index] = Held(row.lease(), started)
        return row

    async def _renew(self, lease: Lease) -> bool:
        async with self.sessions() as session:
            renewed = await self.table.renew(session, lease, self.lease_ms)
            await session.commit()
        return renewed

    async def _release(self, lease: Lease) -> None:
        async with self.sessions() as session:
            await self.table.release(session, lease)
            await session.commit()

    async def renew(self, older_than: float = 0.0) -> list[int]:
        """Renew every lease held (those renewed within ``older_than`` seconds, by a batch's
        commit, are left alone); the slices found lost (taken over, reset) are dropped and
        returned. A renewal that fails is logged and tried at the next round."""
        lost = []
        for index, held in list(self.held.items()):
            started = time.monotonic()
            if started - held.renewed < older_than:
                continue  # a batch renewed it: on SQLite a renewal would queue behind the next
            try:
                renewed = await settled(self._renew(held.lease))
            except Exception as exc:  # noqa: BLE001 - a lease that is not renewed expires; next round
                log.warning(
                    "projection %r: renewing the lease of slice %d failed: %s",
                    self.name,
                    index,
                    describe(exc),
                )
                continue
            if renewed:
                held.renewed = max(held.renewed, started)
            elif self.held.get(index) is held:
                del self.held[index]
                lost.append(index)
        return lost

    async def renewing(self) -> None:
        """Renew the leases every third of ``lease_seconds``, until cancelled."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            await self.renew(older_than=self.lease_seconds / 3)

    async def release(self, index: int) -> None:
        """Give slice ``index`` up, so that another worker takes it at once (a failure is
        logged: the lease then expires on its own)."""
        held = self.held.pop(index, None)
        if held is None:
            return
        try:
            await settled(self._release(held.lease))
        except Exception as exc:  # noqa: BLE001 - the lease expires on its own
            log.warning(
                "projection %r: releasing slice %d failed (it is free again once its lease "
                "expires): %s",
                self.name,
                index,
                describe(exc),
            )

    async def release_all(self) -> None:
        """Give up every slice held."""
        for index in list(self.held):
            await self.release(index)
