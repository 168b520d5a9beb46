"""The server's goodbye to an idle psycopg connection of the journal, found
behind what else waits in its socket (an application's notifications, a notice): the write
goes on another connection, never reported as an unknown outcome."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
from casty import PersistedEvent
from sqlalchemy import URL

from casty_sa import SAJournal

from support import dbtools, internals

pytestmark = [pytest.mark.timeout(120)]


def _messages(driver: Any) -> list[bytes]:
    """The types of the whole messages waiting in a psycopg connection's socket (a peek)."""
    with socket.socket(fileno=os.dup(driver.pgconn.socket)) as sock:
        try:
            waiting = sock.recv(1 << 22, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return []
    found, at = [], 0
    while at + 5 <= len(waiting):
        end = at + 1 + int.from_bytes(waiting[at + 1 : at + 5], "big")
        if end > len(waiting):
            break
        found.append(waiting[at : at + 1])
        at = end
    return found


@pytest.mark.parametrize("pending", ["notification", "notice", "many-notifications"])
async def test_a_goodbye_behind_other_messages_is_found_and_the_write_sent_on_another(
    new_postgres_db: Callable[..., Awaitable[URL]],
    make_journal: Callable[..., SAJournal],
    caplog: pytest.LogCaptureFixture,
    pending: str,
) -> None:
    """The writer's kept connection LISTENs (an application's session on the engine it
    shares) or got a notice; notifications arrive, then the server ends the session; the
    test waits until the goodbye is in the socket. The write must go on another connection
    (``a write was not sent``) and be stored, never ``CommitOutcomeUnknown``. With more
    than 64 KiB of notifications ahead of it, the goodbye was beyond the look at the
    socket: the write was sent into a dead session and its outcome said unknown."""
    url = (await new_postgres_db()).set(drivername="postgresql+psycopg")
    journal = make_journal(url)
    await journal.persist("acct", [PersistedEvent(1, "a", 1.0)])
    admin = await psycopg.AsyncConnection.connect(
        dbtools.plain(url.set(drivername="postgresql")), autocommit=True
    )
    backend = internals.backend(journal)
    take_writer = backend.take_writer
    ended: list[int] = []

    async def take_then_end() -> Any:
        fairy = await take_writer()
        if ended:
            return fairy
        driver = fairy.driver_connection
        ended.append(driver.info.backend_pid)
        await driver.execute("LISTEN casty_sa_review")
        if pending == "notice":
            await driver.execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$")
        count = {"notification": 1, "notice": 0, "many-notifications": 12}[pending]
        for k in range(count):
            payload = str(k).ljust(7000, "x")  # (a notification's payload is < 8000 bytes)
            await admin.execute("SELECT pg_notify('casty_sa_review', %s)", (payload,))
        await admin.execute("SELECT pg_terminate_backend(%s)", (ended[0],))
        for _ in range(1000):  # 10 s at most: until the goodbye is in the socket
            if b"E" in _messages(driver):
                return fairy
            await asyncio.sleep(0.01)
        raise AssertionError("the server's goodbye never reached the client")

    backend.take_writer = take_then_end
    try:
        caplog.clear()
        await journal.persist("acct", [PersistedEvent(2, "b", 1.0)])
    finally:
        await admin.close()
    assert ended, "the write never took a connection"
    assert "a write was not sent" in caplog.text
    assert [e.event for e in await journal.load("acct")] == ["a", "b"]
