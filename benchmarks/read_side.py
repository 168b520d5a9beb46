"""The read-side workloads: R1 (catch-up) and R2 (live tail), on casty-sa's journals only.

Both read with ``journal.events()``, casty-sa's global order (see
``casty_sa.ordering``), and check what they get: every event once, each
entity's in sequence order, payloads as written, offsets increasing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from casty import PersistedEvent

from casty_sa import EventEnvelope, SAJournal

from .base import Row, Sample, Sizes, Workload, sample
from .data import WrongAnswer, check_events, event_of
from .journals import READ_SIDE, Journal

#: how long R2 waits for the last event once the writers are done
_DELIVERY_LIMIT = 60.0


def read_side(journal: Journal) -> SAJournal:
    if not isinstance(journal, SAJournal):
        raise TypeError(f"{type(journal).__name__} has no read side (journal.events)")
    return journal


class Delivery:
    """The checks of a stream as it goes: each event once, in order per entity, as written."""

    def __init__(self) -> None:
        self.last_offset = ""
        self.highest: dict[str, int] = {}

    def check(self, envelope: EventEnvelope) -> None:
        entity, seq = envelope.entity_id, envelope.sequence_nr
        if envelope.offset <= self.last_offset:
            raise WrongAnswer(f"offset {envelope.offset} came after {self.last_offset}")
        self.last_offset = envelope.offset
        expected = self.highest.get(entity, 0) + 1
        if seq != expected:
            raise WrongAnswer(f"{entity!r}: event {seq} delivered where {expected} was due")
        self.highest[entity] = seq
        wanted = event_of(entity, seq)  # every entity's events, the warm-up's too
        if (envelope.event, envelope.timestamp) != (wanted.event, wanted.timestamp):
            raise WrongAnswer(f"{entity!r}: event {seq} came back as {envelope.event!r}")


class R1(Workload):
    """Catch-up: every stored event in the global order, against a replay of the same events."""

    key = "R1"
    fresh_per_rep = False
    journals = READ_SIDE

    def __init__(self, sizes: Sizes) -> None:
        self.per = sizes.r1_per_entity
        self.ids = [f"r1-{i:03d}" for i in range(sizes.r1_entities)]
        self.n = len(self.ids) * self.per
        self.rows = (
            Row(
                "R1 catch-up",
                "events/s",
                f"read all {self.n:,} events ({len(self.ids)} entities, written interleaved) "
                "in the global order with journal.events() (p50: the whole read)",
            ),
            Row(
                "R1 replay",
                "events/s",
                f"the same {self.n:,} events with load(), entity by entity (W4's replay, "
                "on the same database)",
            ),
        )

    async def prepare(self, journal: Journal) -> None:
        step = min(self.per, 1000)
        for first in range(1, self.per + 1, step):
            last = min(first + step - 1, self.per)
            batches = {e: [event_of(e, s) for s in range(first, last + 1)] for e in self.ids}
            await asyncio.gather(*(journal.persist(e, batch) for e, batch in batches.items()))

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        clock = time.perf_counter
        start = clock()
        async with read_side(journal).events() as stream:
            envelopes = [envelope async for envelope in stream]
        catch_up = clock() - start
        delivery = Delivery()
        for envelope in envelopes:
            delivery.check(envelope)
        stored = {**dict.fromkeys(self.ids, self.per), "warm-up": 1}
        if delivery.highest != stored:
            raise WrongAnswer(f"the catch-up ended at {delivery.highest}, not at {stored}")
        del envelopes
        histories: list[list[PersistedEvent[Any]]] = []
        latencies: list[float] = []
        start = clock()
        for entity in self.ids:
            t = clock()
            histories.append(await journal.load(entity))
            latencies.append(clock() - t)
        replay = clock() - start
        for entity, history in zip(self.ids, histories, strict=True):
            check_events(entity, history, 1, self.per)
        return {
            "R1 catch-up": Sample((self.n + 1) / catch_up, catch_up * 1000),
            "R1 replay": sample(self.n, replay, latencies),
        }


class R2(Workload):
    """Live tail: how long a committed event takes to reach a follower, under W2's load."""

    key = "R2"
    journals = READ_SIDE

    def __init__(self, sizes: Sizes) -> None:
        self.ids = [f"r2-{i:05d}" for i in range(sizes.w2_entities)]
        self.per = sizes.w2_persists
        self.rows = (
            Row(
                "R2",
                "events/s",
                f"live tail: a second journal on the same database follows "
                f"journal.events(live=True) while {len(self.ids):,} entities make {self.per} "
                "persists of 1 event each (W2); p50/p99: from a persist's return to the "
                "follower receiving its event",
            ),
        )

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        journal = read_side(journal)
        # another journal, so delivery goes through the database (NOTIFY, polling), as it
        # would to another process, not through the writer's own wake-ups
        follower = SAJournal(journal.engine.url)
        await follower.start()
        try:
            return await self._measure(journal, follower)
        finally:
            await follower.close()

    async def _measure(self, journal: SAJournal, follower: SAJournal) -> dict[str, Sample]:
        clock = time.perf_counter
        expected = len(self.ids) * self.per
        committed: dict[tuple[str, int], float] = {}
        delivered: dict[tuple[str, int], float] = {}
        ready = asyncio.Event()

        async def follow() -> None:
            delivery = Delivery()
            async with follower.events(live=True) as stream:
                async for envelope in stream:
                    now = clock()
                    delivery.check(envelope)
                    if envelope.entity_id == "r2-ready":
                        ready.set()
                    elif envelope.entity_id != "warm-up":
                        delivered[(envelope.entity_id, envelope.sequence_nr)] = now
                        if len(delivered) == expected:
                            return

        async def writer(entity: str) -> None:
            for seq in range(1, self.per + 1):
                await journal.persist(entity, [event_of(entity, seq)])
                committed[(entity, seq)] = clock()

        reader = asyncio.create_task(follow())
        try:
            await journal.persist("r2-ready", [event_of("r2-ready", 1)])
            waiting = asyncio.create_task(ready.wait())
            await asyncio.wait({reader, waiting}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if reader.done():
                reader.result()  # its failure, if it failed
                raise WrongAnswer("the live stream ended before the load began")
            start = clock()
            await asyncio.gather(*(writer(entity) for entity in self.ids))
            async with asyncio.timeout(_DELIVERY_LIMIT):
                await reader
            elapsed = clock() - start
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        # a follower may see an event before its writer hears of the commit: 0 then
        latencies = [max(0.0, delivered[key] - at) for key, at in committed.items()]
        return {"R2": sample(expected, elapsed, latencies)}
