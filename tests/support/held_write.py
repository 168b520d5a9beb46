"""Another writer's transaction holding one event row uncommitted (:class:`HeldWrite`): what the
read side must never pass, and what a projection's lag must not call caught up."""

from __future__ import annotations

import pickle
import sqlite3
from typing import Any

import asyncpg
from sqlalchemy import URL

from casty_sa.ordering import take_positions

from support import dbtools
from support.dbtools import MYSQL_QUOTES, mysql_connect


class HeldWrite:
    """A transaction of another writer that inserts one event row and holds it uncommitted.

    PostgreSQL: a raw asyncpg transaction whose INSERT takes its transaction id and
    position from the column defaults, before the journal's later commits take theirs.
    SQLite: a connection holding the write lock (``BEGIN IMMEDIATE``), as another
    process's writer would, with the next position. MySQL: a raw asyncmy transaction that
    takes its position from the counter, as every writer there does, and holds its lock.
    """

    def __init__(self, url: URL, entity_id: str) -> None:
        self.url, self.entity_id = url, entity_id
        self.payload = pickle.dumps(f"{entity_id}:1")
        self._pg: Any = None
        self._my: Any = None
        self._sqlite: sqlite3.Connection | None = None

    async def begin(self) -> None:
        if self.url.get_backend_name() in ("mysql", "mariadb"):
            self._my = await mysql_connect(self.url)
            async with self._my.cursor() as cursor:
                await cursor.execute(f"BEGIN; {take_positions(MYSQL_QUOTES)}", (1,))
                while await cursor.nextset():
                    pass
                await cursor.execute(
                    "INSERT INTO casty_sa_events (entity_id, sequence_nr, timestamp, payload, "
                    "event_type, era, transaction_id, `position`) VALUES "
                    "(%s, 1, 1.0, %s, 'str', 0, 0, LAST_INSERT_ID())",
                    (self.entity_id, self.payload),
                )
            return
        if self.url.get_backend_name() == "postgresql":
            self._pg = await asyncpg.connect(**dbtools.asyncpg_args(self.url))
            await self._pg.execute("BEGIN")
            await self._pg.execute(
                "INSERT INTO casty_sa_events (entity_id, sequence_nr, timestamp, payload, "
                "event_type) VALUES ($1, 1, 1.0, $2, 'str')",
                self.entity_id,
                self.payload,
            )
            return
        self._sqlite = sqlite3.connect(self.url.database or "", isolation_level=None)
        self._sqlite.execute("BEGIN IMMEDIATE")
        self._sqlite.execute(
            "INSERT INTO casty_sa_events (entity_id, sequence_nr, timestamp, payload, event_type,"
            " era, transaction_id, position) VALUES (?, 1, 1.0, ?, 'str', 0, 0, "
            "(SELECT coalesce(max(position), 0) + 1 FROM casty_sa_events))",
            (self.entity_id, self.payload),
        )

    async def end(self, *, commit: bool) -> None:
        verb = "COMMIT" if commit else "ROLLBACK"
        if self._my is not None:
            async with self._my.cursor() as cursor:
                await cursor.execute(verb)
            self._my.close()
        if self._pg is not None:
            await self._pg.execute(verb)
            await self._pg.close()
        if self._sqlite is not None:
            self._sqlite.execute(verb)
            self._sqlite.close()
