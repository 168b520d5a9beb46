"""A journal whose commit hits an I/O error: run by ``test_faults_sqlite.py`` under an
``LD_PRELOAD`` shim (``fail_wal_fsync.c``) that fails the ``fsync`` of the ``-wal``.

``python eio_writer.py URL FLAG MODE``: persist one warm-up event, create the file FLAG (from
then on the shim fails the WAL's fsync), persist the events of entity ``target`` and print
one JSON line saying how that call ended. Then exit at once, without closing, as a process
that crashes: what reached the WAL stays there for the next process to find.

MODE picks the path of the write: ``single`` (one multi-row ``INSERT`` that commits on its
own), ``transaction`` (more rows than one statement holds: ``BEGIN IMMEDIATE`` … ``COMMIT``)
or ``app-engine`` (an application's engine, whose driver begins the transaction itself).
MODE ``delete`` stores ``target``'s events 1-3 and a snapshot first, and the failing call is
``delete_events("target", 3)``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from casty import PersistedEvent, Snapshot
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine

from casty_sa import JournalError, SAJournal

#: events of the failing call in each mode
SIZES = {"single": 3, "transaction": 1500, "app-engine": 3, "delete": 3}


def journal_for(url: str, mode: str) -> SAJournal:
    if mode != "app-engine":
        return SAJournal(url)
    engine = create_async_engine(url.replace("sqlite://", "sqlite+aiosqlite://", 1))

    @event.listens_for(engine.sync_engine, "connect")
    def _wal(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    return SAJournal(engine)


async def main(url: str, flag: Path, mode: str) -> None:
    journal = journal_for(url, mode)
    await journal.persist("warm-up", [PersistedEvent(1, "warm", 1.0)])
    events = [PersistedEvent(i, ("target", i), 1.0) for i in range(1, SIZES[mode] + 1)]
    if mode == "delete":
        await journal.persist("target", events)
        await journal.save_snapshot("target", Snapshot(3, "state", 1.0))
    await asyncio.to_thread(flag.touch)
    try:
        if mode == "delete":
            await asyncio.wait_for(journal.delete_events("target", 3), 30)
        else:
            await asyncio.wait_for(journal.persist("target", events), 30)
        outcome = {"error": None, "message": ""}
    except JournalError as exc:
        outcome = {"error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(outcome), flush=True)
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3]))
