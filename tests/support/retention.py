"""What the tests of retention share: the maintainer's role against the application's."""

from __future__ import annotations

import asyncio

import pytest
from casty import PersistedEvent, Snapshot

from casty_sa import DatabaseAccessDenied, Forgotten, SAJournal, SequenceConflict


async def maintainer_deletes(app: str, maintainer: str) -> None:
    """The application may not delete events nor forget an entity; the maintainer may."""
    async with asyncio.timeout(60), SAJournal(app) as journal:
        await journal.persist("old", [PersistedEvent(n, n, 1.0) for n in (1, 2, 3)])
        await journal.save_snapshot("old", Snapshot(2, "s", 1.0))
        with pytest.raises(DatabaseAccessDenied):
            await journal.delete_events("old", 2)
        with pytest.raises(DatabaseAccessDenied):
            await journal.forget("old")
        assert len(await journal.load("old")) == 3
    async with asyncio.timeout(60), SAJournal(maintainer) as journal:
        assert await journal.delete_events("old", 2) == 2
    async with asyncio.timeout(60), SAJournal(app) as journal:
        with pytest.raises(SequenceConflict):  # the application reads the tombstone
            await journal.persist("old", [PersistedEvent(2, "again", 1.0)])
        await journal.persist("old", [PersistedEvent(4, 4, 1.0)])
        assert await journal.highest_sequence_nr("old") == 4
    async with asyncio.timeout(60), SAJournal(maintainer) as journal:
        assert await journal.forget("old") == Forgotten("old", events=2, snapshots=1)
