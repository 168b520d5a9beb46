"""The private state of a journal that a few tests read, each where nothing outside shows it.

Every other test observes behaviour: what callers get back, what the database holds, the
pool's checked-out count, the connections left open, the tasks left running. The readings
below are kept in one place, so that a rename inside ``casty_sa`` is one edit here, and each
says why no outside observation will do.
"""

from __future__ import annotations

from typing import Any

import pytest

import casty_sa.backends.sqlite
from casty_sa import SAJournal


def backend(journal: SAJournal) -> Any:
    """The journal's backend: its ``write`` is one transaction, its ``fetch_*`` one query each.

    Tests wrap those methods to count transactions and queries and to see which writes are
    in flight at once. The journal runs them on the raw driver connection, where no
    SQLAlchemy event sees a statement or a commit, and a group's log line does not count
    the transactions that isolating a bad caller splits it into.
    """
    return journal._backend


def free_permits(journal: SAJournal) -> tuple[int, int]:
    """``(free, total)`` places of the journal's connection gate.

    A place a cancelled call failed to give back leaves the pool's count right (the
    connection did go back) and slows nothing until every place is lost; only the gate
    itself shows it.
    """
    gate: Any = backend(journal)._gate
    return gate._value, backend(journal).capacity


def held_writer(journal: SAJournal) -> Any:
    """The connection group commit keeps between writes (``None`` once given back).

    A test that has the server end that very session needs its server pid; from outside,
    the kept session looks like any idle connection of the pool.
    """
    return backend(journal)._held


def directory_shortcut_on(journal: SAJournal) -> bool:
    """Whether a SQLite journal checks its file with one ``stat`` of the directory.

    The tests of that shortcut must know it is on before they change the directory, or
    they would pass on the two-``stat`` path and test nothing of the shortcut.
    """
    return backend(journal)._file._folder_seen is not None


def without_sqlite_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the SQLite backend behave as on a SQLite built without JSON functions.

    The fallback (one query per load) runs only there, and the module flag read at import
    is the one way to reach it on a SQLite that has them.
    """
    monkeypatch.setattr(casty_sa.backends.sqlite, "_SQLITE_HAS_JSON", False)


def listening(journal: SAJournal) -> bool:
    """Whether the journal's live readers hold their shared LISTEN connection open.

    The connection is detached from the pool (it is not the pool's to count), and a test
    that follows it from the server side cannot tell it from a connection being closed.
    """
    return bool(journal._wakeups.listening)


def listener_opened(journal: SAJournal) -> Any:
    """An ``asyncio.Event`` set each time the journal's live readers open their LISTEN
    connection, i.e. once a live reader caught up and waits (nothing outside shows when
    a reader starts waiting; the server shows a session, not what it waits for)."""
    import asyncio

    wakeups = journal._wakeups
    opened = asyncio.Event()
    open_listener: Any = wakeups._open_listener

    async def opening(woken: Any) -> Any:
        listener = await open_listener(woken)
        opened.set()
        return listener

    wakeups._open_listener = opening
    return opened


def notifications(journal: SAJournal) -> Any:
    """An ``asyncio.Event`` set when the journal's LISTEN connection passes a ``NOTIFY`` on
    to its live readers (a reader woken by polling looks the same from outside)."""
    import asyncio

    wakeups = journal._wakeups
    notified = asyncio.Event()
    open_listener: Any = wakeups._open_listener

    async def opening(woken: Any) -> Any:
        def passed_on() -> None:
            notified.set()
            woken()

        return await open_listener(passed_on)

    wakeups._open_listener = opening
    return notified
