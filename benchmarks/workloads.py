"""The workloads W1 to W6, and every workload of a run in the table's order.

W1 to W3 write, W4 and W5 read what they wrote once, W6 does both with
snapshots; the read-side workloads R1 and R2 are in ``read_side``, the
projection workloads P1 and P2 in ``projection``. See
``base`` for what a workload is.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from casty import PersistedEvent, Snapshot

from .base import Row, Sample, Sizes, Workload, persist_in_turn, sample
from .casty_e2e import W7
from .data import BASE_TS, WrongAnswer, check_events, check_snapshot, event_of, state_of
from .disk import D
from .grown import G
from .journals import Journal
from .projection import P1, P2
from .read_side import R1, R2
from .writers import M


class W1(Workload):
    key = "W1"

    def __init__(self, sizes: Sizes) -> None:
        self.n = sizes.w1_persists
        self.rows = (
            Row("W1", "events/s", f"one entity, {self.n:,} persists of 1 event, sequential"),
        )

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        entity = "w1"
        batches = [[event_of(entity, seq)] for seq in range(1, self.n + 1)]
        elapsed, latencies = await persist_in_turn(journal, entity, batches)
        check_events(entity, await journal.load(entity), 1, self.n)
        return {"W1": sample(self.n, elapsed, latencies)}


class W2(Workload):
    key = "W2"

    def __init__(self, sizes: Sizes) -> None:
        self.entities = sizes.w2_entities
        self.per = sizes.w2_persists
        self.rows = (
            Row(
                "W2",
                "events/s",
                f"{self.entities:,} entities at once, {self.per} persists of 1 event each "
                "(sequential per entity)",
            ),
        )

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        ids = [f"w2-{i:05d}" for i in range(self.entities)]
        latencies: list[float] = []
        clock = time.perf_counter

        async def writer(entity: str) -> None:
            for seq in range(1, self.per + 1):
                batch = [event_of(entity, seq)]  # made as needed: memory is part of the figure
                t = clock()
                await journal.persist(entity, batch)
                latencies.append(clock() - t)

        start = clock()
        await asyncio.gather(*(writer(entity) for entity in ids))
        elapsed = clock() - start
        for entity in ids:
            check_events(entity, await journal.load(entity), 1, self.per)
        return {"W2": sample(self.entities * self.per, elapsed, latencies)}


class W3(Workload):
    key = "W3"

    def __init__(self, sizes: Sizes) -> None:
        self.n = sizes.w3_persists
        self.batch = sizes.w3_batch
        self.rows = (
            Row("W3", "events/s", f"one entity, {self.n} persists of {self.batch} events"),
        )

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        entity = "w3"
        b = self.batch
        batches = [
            [event_of(entity, seq) for seq in range(i * b + 1, (i + 1) * b + 1)]
            for i in range(self.n)
        ]
        elapsed, latencies = await persist_in_turn(journal, entity, batches)
        check_events(entity, await journal.load(entity), 1, self.n * b)
        return {"W3": sample(self.n * b, elapsed, latencies)}


class W4(Workload):
    key = "W4"
    fresh_per_rep = False

    def __init__(self, sizes: Sizes) -> None:
        self.n = sizes.w4_events
        self.tail = sizes.w4_tail
        self.tail_calls = sizes.w4_tail_calls
        self.rows = (
            Row("W4 all", "events/s", f"replay {self.n:,} events of one entity (p50: the load)"),
            Row(
                "W4 tail",
                "events/s",
                f"replay the last {self.tail:,} of them, {self.tail_calls} loads in a row",
            ),
        )

    async def prepare(self, journal: Journal) -> None:
        for first in range(1, self.n + 1, 1000):
            last = min(first + 999, self.n)
            await journal.persist("w4", [event_of("w4", s) for s in range(first, last + 1)])

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        clock = time.perf_counter
        start = clock()
        everything = await journal.load("w4")
        full = clock() - start
        check_events("w4", everything, 1, self.n)
        del everything
        first = self.n - self.tail + 1
        tails: list[list[PersistedEvent[Any]]] = []
        latencies: list[float] = []
        start = clock()
        for _ in range(self.tail_calls):
            t = clock()
            tails.append(await journal.load("w4", first))
            latencies.append(clock() - t)
        partial = clock() - start
        for tail in tails:
            check_events("w4", tail, first, self.n)
        return {
            "W4 all": Sample(self.n / full, full * 1000),
            "W4 tail": sample(self.tail * self.tail_calls, partial, latencies),
        }


class W5(Workload):
    key = "W5"
    fresh_per_rep = False

    def __init__(self, sizes: Sizes) -> None:
        self.entities = sizes.w5_entities
        self.snap = sizes.w5_snapshot_at
        self.last = sizes.w5_snapshot_at + sizes.w5_after
        self.ids = [f"w5-{i:05d}" for i in range(self.entities)]
        self.rows = (
            Row(
                "W5",
                "entities/s",
                f"recover {self.entities:,} entities at once: snapshot at {self.snap} + "
                f"{sizes.w5_after} events each, verified",
            ),
        )

    async def prepare(self, journal: Journal) -> None:
        async def store(entity: str) -> None:
            await journal.persist(entity, [event_of(entity, s) for s in range(1, self.last + 1)])
            snapshot = Snapshot(self.snap, state_of(entity, self.snap), BASE_TS + self.snap)
            await journal.save_snapshot(entity, snapshot)

        for chunk in range(0, self.entities, 100):
            await asyncio.gather(*(store(e) for e in self.ids[chunk : chunk + 100]))

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        clock = time.perf_counter
        latencies: list[float] = []

        async def recover(entity: str) -> None:
            t = clock()
            snapshot = await journal.load_snapshot(entity)
            after = 0 if snapshot is None else snapshot.sequence_nr
            events = await journal.load(entity, after + 1)
            latencies.append(clock() - t)
            check_snapshot(entity, snapshot, self.snap)
            check_events(entity, events, self.snap + 1, self.last)

        start = clock()
        outcomes = await asyncio.gather(*(recover(e) for e in self.ids), return_exceptions=True)
        elapsed = clock() - start
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            wrong = sum(isinstance(o, WrongAnswer) for o in failed)
            kinds = sorted({f"{type(o).__name__}: {o}"[:140] for o in failed})[:3]
            raise WrongAnswer(
                f"{len(failed)} of {self.entities} recoveries failed ({wrong} returned wrong "
                f"data, {len(failed) - wrong} raised); e.g. {'; '.join(kinds)}"
            )
        return {"W5": sample(self.entities, elapsed, latencies)}


class W6(Workload):
    key = "W6"

    def __init__(self, sizes: Sizes) -> None:
        self.entities = sizes.w6_entities
        self.ids = [f"w6-{i:05d}" for i in range(self.entities)]
        self.rows = (
            Row(
                "W6 save",
                "snapshots/s",
                f"{self.entities:,} entities, each snapshot saved twice (insert, then "
                "replace), sequential",
            ),
            Row("W6 load", "snapshots/s", f"load those {self.entities:,} snapshots, sequential"),
        )

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        clock = time.perf_counter
        snapshots = [
            (entity, Snapshot(seq, state_of(entity, seq), BASE_TS + seq))
            for seq in (10, 20)
            for entity in self.ids
        ]
        saves: list[float] = []
        start = clock()
        for entity, snapshot in snapshots:
            t = clock()
            await journal.save_snapshot(entity, snapshot)
            saves.append(clock() - t)
        saved = clock() - start
        loads: list[float] = []
        loaded: list[Snapshot[Any] | None] = []
        start = clock()
        for entity in self.ids:
            t = clock()
            loaded.append(await journal.load_snapshot(entity))
            loads.append(clock() - t)
        elapsed = clock() - start
        for entity, got in zip(self.ids, loaded, strict=True):
            check_snapshot(entity, got, 20)
        return {
            "W6 save": sample(len(snapshots), saved, saves),
            "W6 load": sample(self.entities, elapsed, loads),
        }


#: every workload, in the table's order
WORKLOAD_TYPES: tuple[type[Workload], ...] = (W1, W2, W3, W4, W5, W6, W7, M, D, R1, R2, P1, P2, G)
WORKLOADS = tuple(w.key for w in WORKLOAD_TYPES)
#: the workloads a run leaves out unless asked for (or ``--quick``): G fills millions of rows
OPT_IN = frozenset({"G"})


def make_workloads(sizes: Sizes) -> dict[str, Workload]:
    return {w.key: w(sizes) for w in WORKLOAD_TYPES}
