"""Group commit's scheduling: direct writes on a quiet journal, groups under load, pipelining.

The first group drives :class:`casty_sa.batching.GroupCommitter` with an in-process write
function that records each group and the task that wrote it, to pin down who writes what
and when. The second checks the same behaviour on the journal over both backends.
(Isolation of one bad caller and per-entity order are in ``test_faults_concurrency.py``.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from casty import PersistedEvent
from sqlalchemy import URL

from casty_sa import SAJournal
from casty_sa.batching import GroupCommitter, WriteRequest


class Recorder:
    """A group writer that takes ``delay`` seconds and records each group and its task."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.groups: list[list[str]] = []
        self.tasks: list[asyncio.Task[Any] | None] = []

    async def __call__(self, group: Sequence[WriteRequest]) -> list[BaseException | None]:
        self.groups.append([request.entity_id for request in group])
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
            assert commits._flusher is None
        else:
            assert me not in write.tasks
        await commits.close()

    async def test_calls_arriving_during_a_direct_write_go_together_after_it(self) -> None:
        write = Recorder(delay=0.02)
        commits = committer(write, direct=True)
        first = asyncio.create_task(commits.submit(request("first")))
        await asyncio.sleep(0.005)  # "first" is being written, in its caller's task
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
        await asyncio.sleep(0.01)
        await commits.close()
        assert caller.done() and caller.exception() is None
        assert write.groups == [["slow"]]

    def test_pipeline_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="pipeline"):
            GroupCommitter(Recorder(), max_batch_events=1, max_pending=1, pipeline=0)


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
    committer: Any = journal._committer
    if backend == "sqlite":
        assert committer._flusher is None
    else:
        assert committer._flusher is not None
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
