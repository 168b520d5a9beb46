"""Projections across OS processes: SIGKILL, take-over, SIGSTOP, a killed reset.

Each test runs ``tests/support/projection_node.py`` processes (a :class:`casty_sa.Projection`
folding the events of two ``crash_writer.py`` processes into ``rm_balances``) while
the writers keep persisting, and attacks them. At the end the writers are killed, a
last catch-up runs in the test, and :func:`check` proves the outcome from what the
database holds, not from timing:

- the read model equals the fold of every event in the journal: each entity's count,
  sum and last sequence number;
- every event was applied exactly once: ``rm_applied`` has one row per journal offset;
- never two active workers for one slice: each committed batch (the rows of one
  transaction) names the lease it ran under; per slice, ordered by offset, the batches
  never overlap and their fences never go down, and the node's fence guard (a
  conditional ``UPDATE`` of ``rm_fences`` in the batch's own transaction) recorded no
  batch under a fence lower than one already applied;
- each slice's stored offset is the journal's last one, and the slices' ``handled``
  counts add up to the number of events.

Random kill points come from a seeded generator; the seed is printed (shown on
failure). ``CASTY_SA_PROJECTION_KILLS`` sets the number of kills (3 by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import sys
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import URL, func, select
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from casty_sa import Projection, ProjectionBusy, SAJournal
from casty_sa.projections.offsets import OffsetRow, OffsetTable

from support import processes
from support import projection_node as node

# slow, and about the offsets table's statements, the same on either PostgreSQL driver:
# [postgresql] proves them there
pytestmark = [
    pytest.mark.slow,
    pytest.mark.shared_database,
    pytest.mark.only_drivers("aiosqlite", "asyncpg", "asyncmy"),
]

NAME = "balances"
LEASE = 1.0
KILLS = int(os.environ.get("CASTY_SA_PROJECTION_KILLS", "3"))
#: a dead or stopped worker's slice is taken over within its lease, a poll and a batch;
#: generous, for a loaded machine (the measured figure is printed)
TAKEOVER_BOUND = 3 * LEASE + 3.0


class Node:
    """One ``projection_node.py`` process, its output in files."""

    def __init__(self, process: asyncio.subprocess.Process, out: Path, err: Path) -> None:
        self.process = process
        self.out = out
        self.err = err

    @classmethod
    async def start(cls, url: str, tmp_path: Path, label: str, *args: str) -> Node:
        out, err = tmp_path / f"{label}.out", tmp_path / f"{label}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(processes.PROJECTION_NODE),
                url,
                "--name",
                NAME,
                "--lease",
                str(LEASE),
                *args,
                stdout=stdout,
                stderr=stderr,
            )
        return cls(process, out, err)

    @property
    def pid(self) -> int:
        return self.process.pid

    def owns(self, owner: str | None) -> bool:
        """Whether a lease's owner tag (``host:pid:random``) is this process's."""
        return owner is not None and f":{self.pid}:" in f":{owner}:"

    def printed(self) -> str:
        return self.out.read_text()

    def report(self) -> str:
        printed = self.printed()[-500:]
        return f"pid {self.pid}: printed {printed!r}; stderr:\n{self.err.read_text()[-3000:]}"

    async def ended(self, seconds: float) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), seconds)
        except TimeoutError:
            raise AssertionError(f"did not end within {seconds} s: {self.report()}") from None

    async def killed(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        assert await self.ended(10) == -signal.SIGKILL, self.report()

    async def stopped(self) -> None:
        """SIGTERM: the projection stops gracefully (releasing its leases), exit 0."""
        self.process.send_signal(signal.SIGTERM)
        assert await self.ended(20) == 0, self.report()
        assert "stopped" in self.printed(), self.report()

    def state(self) -> str:
        """The process state letter of ``/proc/PID/stat`` (``T``: stopped)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0]


#: each writer worker waits this long after each batch: a steady load of about a hundred
#: events a second, which the projection (a few statements an event) follows
WRITER_PACE = 0.05


@asynccontextmanager
async def writers(url: str, tmp_path: Path, seed: int) -> AsyncIterator[None]:
    """Two ``crash_writer.py`` processes (two workers each) persisting on 12 entities each
    until the block ends; both must still be writing then (a projection never blocks the
    writers)."""
    procs = [
        processes.start_writer(
            url,
            tmp_path / f"writer-{prefix}.log",
            "--prefix",
            prefix,
            "--entities",
            "12",
            "--workers",
            "2",
            "--pace",
            str(WRITER_PACE),
            "--seed",
            str(seed + i),
        )
        for i, prefix in enumerate(["a", "b"])
    ]
    try:
        yield
        for proc in procs:
            assert proc.poll() is None, f"a writer ended early: {proc.communicate()[1]!r}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


class ReadModel:
    """Queries on the read model and the offsets table, on an engine of their own that
    only reads (never queued behind the writers for SQLite's write lock)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.sessions = async_sessionmaker(engine)

    async def scalar(self, query: object) -> int:
        async with self.sessions() as session:
            return int((await session.execute(query)).scalar_one())  # type: ignore[call-overload]

    async def applied(self) -> int:
        return await self.scalar(select(func.count()).select_from(node.applied))

    async def rows(self) -> list[OffsetRow]:
        async with self.sessions() as session:
            return await OffsetTable().rows(session, NAME)

    async def batches(self) -> list[Batch]:
        return await batches(self.sessions)


@dataclass(frozen=True)
class Batch:
    """One committed batch: the rows of ``rm_applied`` with one ``batch`` id."""

    slice: int
    fence: int
    owner: str
    first: str
    last: str
    size: int


async def batches(sessions: async_sessionmaker[AsyncSession]) -> list[Batch]:
    a = node.applied
    query = select(
        a.c.slice,
        a.c.fence,
        a.c.owner,
        func.min(a.c.event_offset),
        func.max(a.c.event_offset),
        func.count(),
        a.c.batch,
    ).group_by(a.c.batch, a.c.slice, a.c.fence, a.c.owner)
    async with sessions() as session:
        rows = (await session.execute(query)).all()
    assert len({row.batch for row in rows}) == len(rows), "a batch ran under two leases"
    return sorted((Batch(*row[:6]) for row in rows), key=lambda b: (b.slice, b.first))


async def until(
    condition: Callable[[], Awaitable[bool]], seconds: float, what: str, *nodes: Node
) -> float:
    """Poll ``condition`` until true; the seconds it took. Fails naming ``what``, with the
    nodes' output, on timeout or when one of ``nodes`` ended."""
    started = time.monotonic()
    while not await condition():
        ended = [n for n in nodes if n.process.returncode is not None]
        if ended or time.monotonic() - started > seconds:
            reports = "\n".join(n.report() for n in nodes)
            raise AssertionError(f"{what}: not within {seconds} s\n{reports}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def final_catch_up(journal: SAJournal, slices: int) -> int:
    """Catch up in the test (a killed worker's lease must expire first)."""
    projection = Projection(NAME, journal, node.handler, slices=slices, lease_seconds=LEASE)
    deadline = time.monotonic() + 3 * LEASE + 10
    while True:
        try:
            return await projection.catch_up()
        except ProjectionBusy:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@dataclass
class Outcome:
    events: int
    batches: list[Batch]

    def owners(self, slice_: int | None = None) -> set[str]:
        return {b.owner for b in self.batches if slice_ is None or b.slice == slice_}


async def check(journal: SAJournal, model: ReadModel, slices: int) -> Outcome:
    """The claims of the module docstring, on what the database holds now."""
    expected: dict[str, tuple[int, int, int]] = {}
    offsets: list[str] = []
    async for envelope in journal.events():
        count, total, _ = expected.get(envelope.entity_id, (0, 0, 0))
        expected[envelope.entity_id] = (
            count + 1,
            total + envelope.sequence_nr,
            envelope.sequence_nr,
        )
        offsets.append(envelope.offset)
    async with model.sessions() as session:
        b = node.balances
        stored = {
            row.entity_id: (row.events, row.seq_sum, row.last_seq)
            for row in await session.execute(select(b))
        }
        applied = Counter((await session.execute(select(node.applied.c.event_offset))).scalars())
        broken = (await session.execute(select(node.violations.c.detail))).scalars().all()
    assert not broken, f"rules broken inside committed batches: {broken[:10]}"
    twice = sorted(offset for offset, n in applied.items() if n > 1)
    assert not twice, f"{len(twice)} events applied more than once, first {twice[:5]}"
    missed = sorted(set(offsets) - set(applied))
    assert not missed, f"{len(missed)} events never applied, first {missed[:5]}"
    assert set(applied) == set(offsets), "applied events that are not in the journal"
    assert stored == expected
    committed = await model.batches()
    check_batches(committed, slices)
    rows = await model.rows()
    assert [row.slice for row in rows] == list(range(slices))
    assert {row.last_offset for row in rows} == {offsets[-1]}
    assert sum(row.handled for row in rows) == len(offsets)
    return Outcome(len(offsets), committed)


def check_batches(committed: list[Batch], slices: int) -> None:
    """Per slice, in offset order: no overlap, fences never lower (one worker at a time)."""
    by_slice: dict[int, list[Batch]] = defaultdict(list)
    for batch in sorted(committed, key=lambda b: b.first):
        by_slice[batch.slice].append(batch)
    assert set(by_slice) <= set(range(slices))
    for index, chain in by_slice.items():
        for before, after in itertools.pairwise(chain):
            assert before.last < after.first, f"slice {index}: {before} overlaps {after}"
            assert before.fence <= after.fence, f"slice {index}: fence went down {before} {after}"


def slice_of(entity_id: str, slices: int) -> int:
    return zlib.crc32(entity_id.encode()) % slices


@pytest.fixture
async def setup(
    db_url: URL, make_journal: Callable[..., SAJournal]
) -> AsyncIterator[Callable[[int], Awaitable[tuple[str, SAJournal, ReadModel]]]]:
    """``await setup(slices)``: the database's URL for the nodes, the test's journal, and
    the read model (its tables made)."""
    engine = create_async_engine(db_url)

    async def make(slices: int) -> tuple[str, SAJournal, ReadModel]:
        journal = make_journal(db_url)
        await journal.start()
        await node.create_read_model(journal.engine, slices)
        return db_url.render_as_string(hide_password=False), journal, ReadModel(engine)

    yield make
    await engine.dispose()


def new_seed() -> int:
    seed = random.randrange(2**32)
    print(f"projection process test seed {seed}")  # shown on failure, to replay a run
    return seed


async def test_sigkill_at_random_moments_applies_every_event_exactly_once(
    setup: Callable[[int], Awaitable[tuple[str, SAJournal, ReadModel]]], tmp_path: Path
) -> None:
    url, journal, model = await setup(1)
    seed = new_seed()
    rng = random.Random(seed)
    kills = 0
    async with asyncio.timeout(30 + 10 * KILLS), writers(url, tmp_path, seed):
        # first a kill at an exact point: mid-batch, after the offset moved in its transaction
        first = await Node.start(
            url, tmp_path, "node-0", "--kill-after-sql", "INSERT INTO rm_applied"
        )
        assert await first.ended(30) == -signal.SIGKILL, first.report()
        kills += 1
        for kill in range(1, KILLS + 1):
            before = await model.applied()
            victim = await Node.start(url, tmp_path, f"node-{kill}")

            async def progressed(before: int = before) -> bool:
                return await model.applied() > before

            await until(progressed, 20, "the restarted node applied nothing", victim)
            await asyncio.sleep(rng.uniform(0.05, 0.8))  # a random moment mid-run
            await victim.killed()
            kills += 1
    caught_up = await final_catch_up(journal, 1)
    outcome = await check(journal, model, 1)
    fences = sorted({b.fence for b in outcome.batches})
    print(
        f"{kills} kills, {outcome.events} events, {len(outcome.batches)} batches, "
        f"fences {fences}, {caught_up} in the final catch-up"
    )
    assert len(outcome.owners()) >= KILLS, "the restarted nodes did not each commit"
    assert len(fences) >= KILLS


@pytest.mark.parametrize(
    ("nodes", "slices", "max_slices"),
    [(2, 1, None), (3, 3, 2)],
    ids=["two-nodes-one-slice", "three-nodes-three-slices"],
)
async def test_nodes_share_a_projection_and_survivors_take_over_from_a_killed_one(
    setup: Callable[[int], Awaitable[tuple[str, SAJournal, ReadModel]]],
    tmp_path: Path,
    nodes: int,
    slices: int,
    max_slices: int | None,
) -> None:
    url, journal, model = await setup(slices)
    seed = new_seed()
    extra = ["--slices", str(slices)] + (
        [] if max_slices is None else ["--max-slices", str(max_slices)]
    )
    async with asyncio.timeout(60), writers(url, tmp_path, seed):
        group = [await Node.start(url, tmp_path, f"node-{i}", *extra) for i in range(nodes)]

        async def every_slice_working() -> bool:
            rows = await model.rows()
            done = {b.slice for b in await model.batches()}
            return len(rows) == slices and all(r.held for r in rows) and done == set(range(slices))

        await until(every_slice_working, 30, "not every slice held and working", *group)
        rows = await model.rows()
        victim = max(group, key=lambda n: sum(n.owns(r.owner) for r in rows))
        lost = {r.slice: r.fence for r in rows if victim.owns(r.owner)}
        assert lost, f"no node holds a slice: {rows}"
        if max_slices is not None:
            assert len(lost) <= max_slices
        await victim.killed()
        survivors = [n for n in group if n is not victim]

        async def taken_over() -> bool:
            done = await model.batches()
            return all(any(b.slice == s and b.fence > f for b in done) for s, f in lost.items())

        seconds = await until(taken_over, TAKEOVER_BOUND, "no survivor took over", *survivors)
        print(f"slices {sorted(lost)} of the killed node taken over in {seconds:.2f} s")
        before = len(await model.batches())

        async def more() -> bool:
            return len(await model.batches()) >= before + 3

        await until(more, 20, "the survivors stopped committing", *survivors)
        for survivor in survivors:
            await survivor.stopped()
    await final_catch_up(journal, slices)
    outcome = await check(journal, model, slices)
    for index, fence in lost.items():
        after = {b.owner for b in outcome.batches if b.slice == index and b.fence > fence}
        assert not any(victim.owns(owner) for owner in after)
    for batch in outcome.batches:
        assert batch.slice < slices
    print(
        f"{outcome.events} events, {len(outcome.batches)} batches by {len(outcome.owners())} owners"
    )


async def test_a_worker_stopped_longer_than_its_lease_never_commits_after_the_take_over(
    setup: Callable[[int], Awaitable[tuple[str, SAJournal, ReadModel]]], tmp_path: Path
) -> None:
    url, journal, model = await setup(1)
    seed = new_seed()
    async with asyncio.timeout(60), writers(url, tmp_path, seed):
        # A SIGSTOPs itself right after its third commit: it holds the lease, no transaction
        a = await Node.start(url, tmp_path, "node-a", "--stop-after-commits", "3")

        async def a_holds() -> bool:
            return any(a.owns(b.owner) for b in await model.batches())

        await until(a_holds, 20, "A never committed", a)
        b = await Node.start(url, tmp_path, "node-b")

        async def a_is_stopped() -> bool:
            return a.state() == "T"

        await until(a_is_stopped, 20, "A did not stop itself", a, b)
        [row] = await model.rows()
        assert a.owns(row.owner)
        a_fence = row.fence

        async def b_took_over() -> bool:
            return any(b.owns(x.owner) and x.fence > a_fence for x in await model.batches())

        seconds = await until(b_took_over, TAKEOVER_BOUND, "B did not take over", b)
        print(f"a stopped worker's slice taken over in {seconds:.2f} s")
        a.process.send_signal(signal.SIGCONT)  # A wakes with a batch's worth of old beliefs
        before = len(await model.batches())

        async def b_goes_on() -> bool:
            return len(await model.batches()) >= before + 3

        await until(b_goes_on, 20, "B stopped committing after A woke", a, b)
        [row] = await model.rows()
        assert b.owns(row.owner), f"the lease moved from B while B ran: {row}"
        b_fence = row.fence
        await b.stopped()  # B releases: A, alive and waiting, takes the slice back

        async def a_took_back() -> bool:
            return any(a.owns(x.owner) and x.fence > b_fence for x in await model.batches())

        await until(a_took_back, TAKEOVER_BOUND, "A did not take the slice back", a)
        await a.stopped()
    await final_catch_up(journal, 1)
    outcome = await check(journal, model, 1)
    a_batches = [x for x in outcome.batches if a.owns(x.owner)]
    b_batches = [x for x in outcome.batches if b.owns(x.owner)]
    assert {x.fence for x in a_batches} == {a_fence, max(x.fence for x in a_batches)}
    assert all(a_fence < x.fence <= b_fence for x in b_batches)


async def test_a_reset_killed_mid_transaction_changes_nothing_and_a_reset_restarts_the_worker(
    setup: Callable[[int], Awaitable[tuple[str, SAJournal, ReadModel]]], tmp_path: Path
) -> None:
    url, journal, model = await setup(1)
    seed = new_seed()
    async with asyncio.timeout(60), writers(url, tmp_path, seed):
        worker = await Node.start(url, tmp_path, "worker")

        async def working() -> bool:
            return await model.applied() > 0

        await until(working, 20, "the worker applied nothing", worker)
        [before] = await model.rows()
        # the reset's transaction dies after its last statement on the offsets table
        resetter = await Node.start(
            url,
            tmp_path,
            "reset-killed",
            "--mode",
            "reset",
            "--kill-after-sql",
            "INSERT INTO casty_sa_projection_offsets",
        )
        assert await resetter.ended(30) == -signal.SIGKILL, resetter.report()
        applied = await model.applied()

        async def still_working() -> bool:
            return await model.applied() > applied

        await until(still_working, 20, "the worker stopped after a killed reset", worker)
        [row] = await model.rows()
        assert (row.fence, row.owner) == (before.fence, before.owner)
        assert row.handled >= before.handled and row.last_offset >= before.last_offset  # type: ignore[operator]

        resetter = await Node.start(url, tmp_path, "reset", "--mode", "reset")
        assert await resetter.ended(30) == 0, resetter.report()
        assert "reset" in resetter.printed()

        async def rebuilding() -> bool:
            [row] = await model.rows()
            return row.held and row.fence > before.fence + 1 and await model.applied() > 0

        await until(rebuilding, TAKEOVER_BOUND + 5, "the worker did not start over", worker)
        [row] = await model.rows()
        assert worker.owns(row.owner)
        await worker.stopped()
    await final_catch_up(journal, 1)
    outcome = await check(journal, model, 1)
    assert all(b.fence > before.fence + 1 for b in outcome.batches)


@pytest.mark.only_backends("postgresql")
@pytest.mark.parametrize(
    "statement",
    ["UPDATE casty_sa_projection_offsets SET lease_expires_ms", "INSERT INTO rm_applied"],
    ids=["in-a-renewal", "in-a-batch"],
)
async def test_a_worker_frozen_inside_a_transaction_does_not_block_the_take_over(
    setup: Callable[[int], Awaitable[tuple[str, SAJournal, ReadModel]]],
    tmp_path: Path,
    statement: str,
) -> None:
    """A process frozen (SIGSTOP, a VM pause, a half-open connection) inside a transaction
    on the slice's row (a renewal, or a batch after its ``advance``) holds the row's lock:
    the server must end that transaction, or no survivor can ever take the slice (and
    its open transaction holds back the horizon of every live reader)."""
    url, journal, model = await setup(1)
    seed = new_seed()
    # a renewal runs only while no batch renews the lease: A idles until it froze in one
    in_a_renewal = statement.startswith("UPDATE")
    async with asyncio.timeout(60), contextlib.AsyncExitStack() as load:
        if not in_a_renewal:
            await load.enter_async_context(writers(url, tmp_path, seed))
        a = await Node.start(url, tmp_path, "node-a", "--stop-after-sql", statement)

        async def a_is_stopped() -> bool:
            return a.state() == "T"

        await until(a_is_stopped, 20, "A did not stop inside the transaction", a)
        if in_a_renewal:
            await load.enter_async_context(writers(url, tmp_path, seed))
        [row] = await model.rows()
        assert a.owns(row.owner)
        b = await Node.start(url, tmp_path, "node-b")

        async def b_took_over() -> bool:
            return any(b.owns(x.owner) for x in await model.batches())

        seconds = await until(b_took_over, TAKEOVER_BOUND, "B did not take over", b)
        print(f"the slice of a worker frozen {statement!r} taken over in {seconds:.2f} s")
        a.process.send_signal(signal.SIGCONT)
        await b.stopped()
        await a.stopped()
    await final_catch_up(journal, 1)
    await check(journal, model, 1)
