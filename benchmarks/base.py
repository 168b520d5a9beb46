"""What every workload shares: the sizes, the samples, the rows, and ``Workload`` itself.

A workload fills one or more table rows. Write workloads (``fresh_per_rep``)
run on a fresh store every repetition; read workloads ``prepare`` their data
once per journal, untimed, and time only the reads. ``measure`` checks every
answer before it returns the samples: a wrong answer raises ``WrongAnswer``.
A workload that needs casty-sa's read side names the journals it runs on
(``journals``); the others run on every journal.
"""

from __future__ import annotations

import math
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from casty import PersistedEvent

from .journals import Journal


@dataclass(frozen=True)
class Sizes:
    """How much each workload does, and how many repetitions."""

    reps: int = 5
    w1_persists: int = 2_000
    w2_entities: int = 200
    w2_persists: int = 20
    w3_persists: int = 200
    w3_batch: int = 100
    w4_events: int = 20_000
    w4_tail: int = 1_000
    w4_tail_calls: int = 10
    w5_entities: int = 1_000
    w5_snapshot_at: int = 10
    w5_after: int = 10
    w6_entities: int = 500
    r1_entities: int = 20
    r1_per_entity: int = 5_000
    p1_entities: int = 500
    p1_per_entity: int = 40
    w7_entities: int = 1_000
    w7_commands: int = 10
    #: G: events already stored before W1, W2, W4 tail and W5 run again (opt-in: ``--grown``)
    grown_events: int = 10_000_000
    #: M: the numbers of writer processes, each running W2
    m_processes: tuple[int, ...] = (1, 2, 4)
    #: M: the persists each of W2's entities makes in each process (W2's own: 20)
    m_persists: int = 100
    #: D: entities written (20 events each) before the files are measured
    d_entities: int = 1_000


QUICK = Sizes(
    reps=1,
    w1_persists=50,
    w2_entities=20,
    w2_persists=5,
    w3_persists=5,
    w3_batch=100,
    w4_events=2_000,
    w4_tail=100,
    w4_tail_calls=2,
    w5_entities=50,
    w6_entities=25,
    r1_entities=10,
    r1_per_entity=200,
    p1_entities=20,
    p1_per_entity=10,
    w7_entities=20,
    w7_commands=3,
    grown_events=5_000,
    m_processes=(1, 2),
    m_persists=5,
    d_entities=50,
)


@dataclass
class Sample:
    """One repetition of one table row."""

    rate: float
    p50_ms: float | None = None
    p99_ms: float | None = None


def sample(count: int, seconds: float, latencies: Sequence[float] | None) -> Sample:
    if not latencies:
        return Sample(count / seconds)
    ordered = sorted(latencies)
    p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
    return Sample(count / seconds, statistics.median(ordered) * 1000, p99 * 1000)


@dataclass(frozen=True)
class Row:
    key: str
    unit: str
    description: str


class Workload(ABC):
    """The rows a workload fills, and how it measures them on one journal."""

    key: ClassVar[str]
    #: write workloads get a fresh store per repetition; read workloads prepare once
    fresh_per_rep: ClassVar[bool] = True
    #: the journals it runs on (None: every journal)
    journals: ClassVar[frozenset[str] | None] = None
    #: a read workload that compares two stores of each journal (G: grown, and empty)
    two_stores: ClassVar[bool] = False
    rows: tuple[Row, ...]

    @classmethod
    def runs_on(cls, journal: str) -> bool:
        return cls.journals is None or journal in cls.journals

    @abstractmethod
    def __init__(self, sizes: Sizes) -> None:
        """Take this workload's sizes and name its rows."""

    async def prepare(self, journal: Journal) -> None:
        """Write what a read workload reads (untimed); a write workload has nothing to do."""
        return None

    async def prepare_beside(self, journal: Journal, other: Journal) -> None:
        """``prepare`` of a workload with ``two_stores``: ``other`` is a second fresh store."""
        raise NotImplementedError(f"{self.key} compares no two stores")

    def prepare_limit(self, limit: float) -> float:
        """The seconds ``prepare`` may take, given the run's limit for one measurement."""
        return limit

    @abstractmethod
    async def measure(self, journal: Journal) -> dict[str, Sample]:
        """One timed repetition, checked: a sample per row."""


async def persist_in_turn(
    journal: Journal, entity: str, batches: Sequence[Sequence[PersistedEvent[Any]]]
) -> tuple[float, list[float]]:
    """Persist ``batches`` one after another: the elapsed seconds and each call's latency."""
    latencies: list[float] = []
    clock = time.perf_counter
    start = clock()
    for batch in batches:
        t = clock()
        await journal.persist(entity, batch)
        latencies.append(clock() - t)
    return clock() - start, latencies
