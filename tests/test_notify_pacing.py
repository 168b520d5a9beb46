"""PostgreSQL writes announce commits to live readers paced (``backends.postgresql._Announcer``).

PostgreSQL commits the transactions that ``NOTIFY`` one at a time, so a write group
carries the NOTIFY only when none went out for ``NOTIFY_EVERY``; a group committed
without one is announced on its own once that time is up, unless a group that
carried one committed after it. The clock is the test's, so nothing depends on how
fast the machine is; the real journal is checked against a real LISTEN connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
import pytest
from casty import PersistedEvent
from sqlalchemy import URL

from casty_sa import SAJournal
from casty_sa.backends import postgresql
from casty_sa.backends.postgresql import NOTIFY_EVERY, _Announcer
from casty_sa.ordering import notify_channel


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(postgresql, "time", fake)
    return fake


def announcer() -> tuple[_Announcer, list[float], asyncio.Event]:
    sent: list[float] = []
    done = asyncio.Event()

    async def send() -> None:
        sent.append(0.0)
        done.set()

    return _Announcer(send), sent, done


async def trailing_done(subject: _Announcer) -> None:
    """Until the announcer's NOTIFY of its own, if one is pending, is sent or given up."""
    if subject._trailing is not None:
        await asyncio.wait({subject._trailing}, timeout=10)
    assert subject._trailing is None


async def test_a_group_after_a_quiet_period_carries_the_notify(clock: Clock) -> None:
    subject, sent, _ = announcer()
    assert subject.claim()
    subject.committed(True)
    assert not subject.claim()  # the next group within NOTIFY_EVERY goes without
    clock.now += 1.5 * NOTIFY_EVERY
    assert subject.claim()
    subject.committed(True)
    assert subject._trailing is None and sent == []  # every commit announced itself


async def test_an_unannounced_commit_is_announced_once_the_time_is_up(clock: Clock) -> None:
    subject, sent, done = announcer()
    assert subject.claim()
    subject.committed(True)
    assert not subject.claim()
    subject.committed(False)  # committed without a NOTIFY
    await asyncio.sleep(0.02)
    assert sent == []  # not before the time is up (the test's clock stands still)
    clock.now += 1.5 * NOTIFY_EVERY
    async with asyncio.timeout(10):
        await done.wait()
    await trailing_done(subject)
    assert sent == [0.0]
    assert not subject.claim()  # the NOTIFY of its own took the turn


async def test_a_later_notifying_commit_covers_an_unannounced_one(clock: Clock) -> None:
    subject, sent, _ = announcer()
    assert subject.claim()
    subject.committed(False)  # e.g. two groups in flight: the unannounced one commits first
    subject.committed(True)  # then the one that carried the NOTIFY
    clock.now += 1.5 * NOTIFY_EVERY
    await trailing_done(subject)
    assert sent == []


async def test_close_stops_a_pending_notify(clock: Clock) -> None:
    subject, sent, _ = announcer()
    assert subject.claim()
    subject.committed(True)
    subject.committed(False)
    pending = subject._trailing
    assert pending is not None
    subject.close()
    await asyncio.wait({pending}, timeout=10)
    assert pending.cancelled() and subject._trailing is None
    clock.now += 1.5 * NOTIFY_EVERY
    await asyncio.sleep(0.02)
    assert sent == []


async def test_both_notifies_reach_a_listening_connection(
    new_postgres_db: Callable[..., Awaitable[URL]],
) -> None:
    """The write statement that carries the NOTIFY, and the NOTIFY of its own, on a real server."""
    url = await new_postgres_db(migrated=True)
    heard: asyncio.Queue[None] = asyncio.Queue()
    listener = await asyncpg.connect(
        user=url.username,
        password=url.password,
        database=url.database,
        host=url.query.get("host") or url.host,
        port=url.port,
    )
    await listener.add_listener(notify_channel(None), lambda *_: heard.put_nowait(None))
    try:
        async with SAJournal(url) as journal:
            await journal.persist("acct", [PersistedEvent(1, "opened", 0.0)])  # after quiet
            async with asyncio.timeout(10):
                await heard.get()
            backend = journal._backend
            assert isinstance(backend, postgresql.PostgresBackend)
            await backend._notify_alone()
            async with asyncio.timeout(10):
                await heard.get()
            assert await journal.load("acct") == [PersistedEvent(1, "opened", 0.0)]
    finally:
        await listener.close()
