"""Writers that keep persisting through a fault, and the check of what they were told.

Each batch carries a unique attempt id, so a batch sent again is told apart. After a
fault the check reloads every entity: an acknowledged batch is stored whole, one
reported as not stored (any error but :class:`~casty_sa.CommitOutcomeUnknown`) is
absent, an unknown one is whole or absent, and nothing is half there.

::

    outcomes = await run_writers_through(journal, fault, ["w0", "w1"])
    await check_outcomes(journal, ["w0", "w1"], outcomes)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from casty import PersistedEvent

from casty_sa import CommitOutcomeUnknown, JournalError, SAJournal

__all__ = ["Outcomes", "check_outcomes", "keep_writing", "run_writers_through"]

type Key = tuple[str, int, int, int]  # entity, attempt, first sequence number, size


@dataclass
class Outcomes:
    """What the writers saw: acknowledged, failed (nothing stored), unknown attempts."""

    acked: set[Key] = field(default_factory=set)
    failed: set[Key] = field(default_factory=set)
    unknown: set[Key] = field(default_factory=set)
    errors: list[BaseException] = field(default_factory=list)
    acked_after: int = 0  # acknowledged after the fault ended
    recovered_at: int = 1  # how many of those prove the journal recovered
    recovered: asyncio.Event = field(default_factory=asyncio.Event)


_attempts = itertools.count()


def attempt_batch(entity_id: str, first: int, size: int) -> tuple[int, list[PersistedEvent[Any]]]:
    """A batch whose events carry a unique attempt id."""
    attempt = next(_attempts)
    events = [PersistedEvent(first + i, (entity_id, attempt, size, i), 1.0) for i in range(size)]
    return attempt, events


async def keep_writing(
    journal: SAJournal,
    entity_id: str,
    outcomes: Outcomes,
    stop: asyncio.Event,
    fault_over: asyncio.Event,
) -> None:
    """Persist batches until ``stop``; after an error, reload to learn where to go on."""
    rng = random.Random(entity_id)
    next_seq = 1
    while not stop.is_set():
        size = rng.randint(1, 4)
        attempt, events = attempt_batch(entity_id, next_seq, size)
        key = (entity_id, attempt, next_seq, size)
        try:
            await journal.persist(entity_id, events)
        except JournalError as exc:
            outcomes.errors.append(exc)
            unknown = isinstance(exc, CommitOutcomeUnknown)
            (outcomes.unknown if unknown else outcomes.failed).add(key)
            while not stop.is_set():  # resynchronise like casty: reload the entity
                try:
                    stored = await journal.load(entity_id)
                except JournalError:
                    await asyncio.sleep(0.05)
                    continue
                next_seq = stored[-1].sequence_nr + 1 if stored else 1
                break
            continue
        outcomes.acked.add(key)
        if fault_over.is_set():
            outcomes.acked_after += 1
            if outcomes.acked_after >= outcomes.recovered_at:
                outcomes.recovered.set()
        next_seq += size


async def check_outcomes(journal: SAJournal, entities: list[str], outcomes: Outcomes) -> None:
    """Acknowledged: stored whole. Failed: absent. Unknown: whole or absent. No partials."""
    stored: set[Key] = set()
    for entity_id in entities:
        events = await journal.load(entity_id)
        seqs = [e.sequence_nr for e in events]
        assert seqs == list(range(1, len(seqs) + 1)), f"{entity_id}: {seqs[:20]}"
        i = 0
        while i < len(events):
            owner, attempt, size, index = events[i].event
            members = events[i : i + size]
            assert (owner, index) == (entity_id, 0), f"{entity_id}: partial batch at {i + 1}"
            assert [e.event for e in members] == [
                (entity_id, attempt, size, k) for k in range(size)
            ]
            stored.add((entity_id, attempt, events[i].sequence_nr, size))
            i += size
    assert outcomes.acked <= stored, f"acknowledged batches lost: {outcomes.acked - stored}"
    assert not (outcomes.failed & stored), (
        f"writes reported as failed (nothing stored) were stored: {outcomes.failed & stored}"
    )
    assert stored <= outcomes.acked | outcomes.failed | outcomes.unknown


async def run_writers_through(
    journal: SAJournal,
    fault: Callable[[], Awaitable[Any]],
    entities: list[str],
    *,
    settle: float = 0.4,
    within: float = 30.0,
) -> Outcomes:
    """Writers on ``entities`` through ``fault()``, until each acknowledged 3 batches after it."""
    outcomes = Outcomes(recovered_at=3 * len(entities))
    stop, fault_over = asyncio.Event(), asyncio.Event()
    tasks = [
        asyncio.ensure_future(keep_writing(journal, e, outcomes, stop, fault_over))
        for e in entities
    ]
    await asyncio.sleep(settle)  # the writers are under way when the fault comes
    await fault()
    fault_over.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(outcomes.recovered.wait(), within)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), within)
    assert outcomes.acked_after >= 3 * len(entities), "the journal did not recover"
    return outcomes
