"""A writer process for the read side's tests (not a test module).

Persists ``EVENTS`` events to each of ``ENTITIES`` entities named ``PREFIX-<n>``, all
entities at once with group commit on; the event of ``PREFIX-<n>`` at sequence number
``s`` is ``"PREFIX-<n>:s"``. Prints ``done`` when every call returned.

Usage::

    python tests/support/event_writer.py URL PREFIX ENTITIES EVENTS
"""

from __future__ import annotations

import asyncio
import sys

from casty import PersistedEvent

from casty_sa import SAJournal


async def main(url: str, prefix: str, entities: int, events: int) -> None:
    async with SAJournal(url, group_commit=True) as journal:

        async def write(entity_id: str) -> None:
            for seq in range(1, events + 1):
                event = PersistedEvent(seq, f"{entity_id}:{seq}", float(seq))
                await journal.persist(entity_id, [event])

        await asyncio.gather(*(write(f"{prefix}-{n:03d}") for n in range(entities)))
    print("done", flush=True)


if __name__ == "__main__":
    url, prefix, entities, events = sys.argv[1:5]
    asyncio.run(main(url, prefix, int(entities), int(events)))
