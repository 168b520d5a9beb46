"""Group commit's scheduling: direct writes on a quiet journal, groups under load, pipelining.

The first group drives :class:`casty_sa.batching.GroupCommitter` with an in-process write
function that records each group and the task that wrote it, to pin down who writes what
and when. The second checks the same behaviour on the journal over both backends.
(Isolation of one bad caller and per-entity order are in ``test_faults_concurrency.py``.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from casty import PersistedEvent, Snapshot
from sqlalchemy import URL

from casty_sa import SAJournal
from casty_sa.batching import GroupCommitter, WriteRequest

from support import internals


class Recorder:
    """A group writer that takes ``delay`` seconds and records each group and its task."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.groups: list[list[str]] = []
        self.bytes: list[int] = []
        self.tasks: list[asyncio.Task[Any] | None] = []
        self.writing = asyncio.Event()  # set once the first group is being written

    async def __call__(self, group: Sequence[WriteRequest]) -> list[BaseException | None]:
        self.writing.set()
        self.groups.append([request.entity_id for request in group])
        self.bytes.append(sum(request.nbytes for request in group))
        self.tasks.append(asyncio.current_task())
        await asyncio.sleep(self.delay)
        return [None] * len(group)


def request(entity_id: str) -> WriteRequest:
    return WriteRequest(entity_id, events=[(entity_id, 1, 1.0, b"x")])


def committer(write: Recorder, *, direct: bool) -> GroupCommitter:
    return GroupCommitter(write, max_batch_events=100, max_pending=1000, direct=direct)


class TestDirectWrites:
    @pytest.mark.parametrize("direct", [True, False])
    async def test_a_quiet_journal_lets_each_caller_write_its_own_call_when_direct(
        self, direct: bool
    ) -> None:
        write = Recorder()
        commits = committer(write, direct=direct)
        me = asyncio.current_task()
        for k in range(5):
            await commits.submit(request(f"e{k}"))
        assert write.groups == [[f"e{k}"] for k in range(5)]
        if direct:
            assert write.tasks == [me] * 5  # no hand-over to a flusher task
            assert asyncio.all_tasks() == {me}, "a flusher task was started all the same"
        else:
            assert me not in write.tasks
        await commits.close()

    async def test_calls_arriving_during_a_direct_write_go_together_after_it(self) -> None:
        write = Recorder(delay=0.02)
        commits = committer(write, direct=True)
        first = asyncio.create_task(commits.submit(request("first")))
        await write.writing.wait()  # "first" is being written, in its caller's task
        others = [asyncio.create_task(commits.submit(request(f"o{k}"))) for k in range(4)]
        await asyncio.gather(first, *others)
        assert write.groups == [["first"], ["o0", "o1", "o2", "o3"]]
        assert write.tasks[0] is first and write.tasks[1] not in (first, *others)
        # the load looked concurrent: the next call queues for the flusher too, and once a
        # group of one was written the journal counts as quiet again
        await commits.submit(request("next"))
        await commits.submit(request("after"))
        assert write.groups[2:] == [["next"], ["after"]]
        assert write.tasks[2] is not asyncio.current_task()
        assert write.tasks[3] is asyncio.current_task()
        await commits.close()

    async def test_close_waits_for_a_direct_write_in_flight(self) -> None:
        write = Recorder(delay=0.05)
        commits = committer(write, direct=True)
        caller = asyncio.create_task(commits.submit(request("slow")))
        await write.writing.wait()
        await commits.close()
        assert caller.done() and caller.exception() is None
        assert write.groups == [["slow"]]

    def test_pipeline_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="pipeline"):
            GroupCommitter(Recorder(), max_batch_events=1, max_pending=1, pipeline=0)


class TestByteCap:
    """Groups are capped in bytes as well as rows: five large calls that each fit a
    statement alone must not add up to one the database refuses (PostgreSQL stops at 1 GiB)."""

    def test_a_request_counts_the_bytes_of_its_payloads(self) -> None:
        events = WriteRequest("e", events=[("e", 1, 1.0, b"x" * 10_000), ("e", 2, 1.0, b"y" * 5)])
        snapshot = WriteRequest("e", snapshot=("e", 3, 1.0, b"z" * 7_000))
        both = WriteRequest("e", events=events.events, snapshot=snapshot.snapshot)
        assert 10_005 <= events.nbytes < 10_005 + 100
        assert 7_000 <= snapshot.nbytes < 7_000 + 50
        assert both.nbytes == events.nbytes + snapshot.nbytes
        tiny = WriteRequest("e", events=[("e", 1, 1.0, b"")])
        assert 0 < tiny.nbytes < 50

    async def test_groups_stop_at_max_batch_bytes_and_a_larger_call_goes_alone(self) -> None:
        write = Recorder(delay=0.01)
        cap = 10_000
        commits = GroupCommitter(
            write, max_batch_events=1000, max_pending=1000, max_batch_bytes=cap
        )

        def sized(entity_id: str, size: int) -> WriteRequest:
            return WriteRequest(entity_id, events=[(entity_id, 1, 1.0, b"p" * size)])

        first = asyncio.create_task(commits.submit(sized("first", 10)))
        await write.writing.wait()  # "first" is in flight: the rest queue up behind it
        rest = [sized(f"r{k}", 3_000) for k in range(10)]
        rest.insert(5, sized("huge", 4 * cap))
        await asyncio.gather(first, *(commits.submit(r) for r in rest))
        assert write.groups[0] == ["first"]
        assert all(size <= cap for size, group in zip(write.bytes, write.groups, strict=True)
                   if group != ["huge"])  # fmt: skip
        assert ["huge"] in write.groups, write.groups
        # three 3,000-byte calls fit in 10,000 bytes, a fourth does not; rows alone would
        # have let all of them (and the huge one) go together
        assert [len(g) for g in write.groups[1:]] == [3, 2, 1, 3, 2], write.groups
        await commits.close()

    def test_max_batch_bytes_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="max_batch_bytes"):
            GroupCommitter(Recorder(), max_batch_events=1, max_pending=1, max_batch_bytes=0)


# -- on the journal ----------------------------------------------------------------------------


def ev(seq: int) -> PersistedEvent[Any]:
    return PersistedEvent(seq, ("payload", seq), float(seq))


async def test_sequential_writes_skip_the_flusher_where_writes_survive_cancellation(
    backend: str, db_url: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """SQLite writes directly and gives its kept connection back once quiet; PostgreSQL
    (whose statements a cancelled caller would cut off) always goes through the flusher."""
    journal = make_journal(db_url)
    for seq in range(1, 21):
        await journal.persist("seq", [ev(seq)])
    flushers = [t for t in asyncio.all_tasks() if t.get_name() == "casty_sa-group-commit"]
    if backend == "sqlite":
        assert flushers == []
    else:
        assert flushers != []
    assert [e.sequence_nr for e in await journal.load("seq")] == list(range(1, 21))
    pool: Any = journal.engine.pool
    for _ in range(400):  # up to 2 s; it goes back after 10 ms unused
        if pool.checkedout() == 0:
            break
        await asyncio.sleep(0.005)
    assert pool.checkedout() == 0, "the writer's kept connection was never given back"
    # writing again after the quiet period takes a connection again and works
    await journal.persist("seq", [ev(21)])
    assert (await journal.load("seq", 21))[0].event == ("payload", 21)


async def test_a_group_never_carries_more_than_max_batch_bytes(
    db_url: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """Concurrent calls of about 3 kB each with a 10 kB cap go three to a transaction, and
    a call larger than the cap is written alone; every call is stored."""
    cap = 10_000
    journal = make_journal(db_url, max_batch_bytes=cap)
    await journal.start()
    db = internals.backend(journal)
    write = db.write
    written: list[tuple[int, int]] = []  # (rows, payload bytes) of each transaction

    async def measured(events: Any, snapshots: Any) -> None:
        rows = [*events, *snapshots]
        written.append((len(rows), sum(len(row[3]) for row in rows)))
        await write(events, snapshots)

    db.write = measured
    payload = "p" * 3_000
    calls = [journal.persist(f"e{k}", [PersistedEvent(1, payload, 1.0)]) for k in range(40)]
    calls.insert(20, journal.persist("huge", [PersistedEvent(1, "h" * (3 * cap), 1.0)]))
    calls.insert(30, journal.save_snapshot("snap", Snapshot(1, payload, 1.0)))
    assert await asyncio.gather(*calls) == [None] * len(calls)
    assert [size for rows, size in written if rows > 1], "no call shared a transaction"
    assert all(size <= cap for rows, size in written if rows > 1), written
    assert any(size > 3 * cap for rows, size in written if rows == 1), written
    for k in range(40):
        assert [e.event for e in await journal.load(f"e{k}")] == [payload]
    assert [e.event for e in await journal.load("huge")] == ["h" * (3 * cap)]
    assert await journal.load_snapshot("snap") == Snapshot(1, payload, 1.0)


@asynccontextmanager
async def writing_without_pause(journal: SAJournal) -> AsyncIterator[asyncio.Future[int]]:
    """Persist to new entities back to back, with no pause, while the block runs: the
    writer always has its next group in hand. Yields the writing task (a block checks it
    is still running, or it proved nothing)."""
    writing = True

    async def write_on() -> int:
        n = 0
        while writing:
            n += 1
            await journal.persist(f"w{n}", [PersistedEvent(1, n, 1.0)])
        return n

    writer = asyncio.ensure_future(write_on())
    try:
        yield writer
    finally:
        writing = False
        assert await asyncio.wait_for(writer, 10) > 0


@pytest.mark.parametrize("where", ["sqlite-memory", "postgresql-one-connection"])
async def test_readers_never_wait_behind_the_kept_writer_of_a_single_connection(
    where: str,
    make_journal: Callable[..., SAJournal],
    new_postgres_db: Callable[..., Any],
) -> None:
    """With one connection in all, a load that arrives while writes keep coming is answered
    at the next group's end, every time, instead of waiting for the writes to stop. (A
    journal's own memory database keeps its connection between groups and hands it to the
    load; an application's engine of one connection is not kept at all.)"""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = None
    if where == "sqlite-memory":
        journal = make_journal("sqlite://")
    else:
        url = await new_postgres_db(migrated=True)
        engine = create_async_engine(url, pool_size=1, max_overflow=0)
        journal = make_journal(engine)
    try:
        await journal.persist("reader", [PersistedEvent(1, "r", 1.0)])
        async with writing_without_pause(journal) as writer:
            for _ in range(20):
                async with asyncio.timeout(10):
                    assert [e.event for e in await journal.load("reader")] == ["r"]
                assert not writer.done(), "the writes stopped, so the loads proved nothing"
        await journal.close()
    finally:
        if engine is not None:
            await engine.dispose()


@pytest.mark.parametrize("where", ["sqlite-file", "postgresql"])
async def test_an_application_sharing_its_one_connection_gets_it_while_the_journal_writes(
    where: str,
    tmp_path: Any,
    make_journal: Callable[..., SAJournal],
    new_postgres_db: Callable[..., Any],
) -> None:
    """An application's engine of one connection, shared with a journal that writes without
    pause: the application's own ``engine.connect()`` waits in SQLAlchemy's pool, where the
    journal cannot see it, so the journal must not keep that connection between groups."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    import casty_sa

    if where == "sqlite-file":
        url: Any = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
        await casty_sa.upgrade(url)
    else:
        url = await new_postgres_db(migrated=True)
    engine = create_async_engine(url, pool_size=1, max_overflow=0, pool_timeout=5)
    try:
        journal = make_journal(engine)
        async with writing_without_pause(journal) as writer:
            await journal.persist("first", [PersistedEvent(1, "x", 1.0)])
            for _ in range(3):
                async with engine.connect() as connection:  # pool_timeout: 5 s at most
                    assert (await connection.execute(text("SELECT 1"))).scalar() == 1
                assert not writer.done(), "the writes stopped, so the check proved nothing"
        await journal.close()
    finally:
        await engine.dispose()
