"""SQLite's read side: pages of events, entity ids, an entity's highest sequence number.

SQLite lets one writer in at a time and gives each event it writes a place after
every stored one (:func:`casty_sa.ordering.highest_position`), so a commit never
lands below a row a reader has already seen: the newest stored place is the
horizon. A page reads the newest place first and the events up to it second; the
rows at or below a place seen once stay as they are, so the two statements need no
shared transaction. Reads go where the backend's other reads go (the shared reader
connection of a file). Live readers poll (one look at the end of the global-order
index) as often as :attr:`SqliteReading.live_poll` says; the journal wakes its own
readers after each of its commits at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from casty_sa.backends.base import BackendSettings
from casty_sa.backends.pooled import PooledBackend
from casty_sa.backends.read_statements import (
    EventPage,
    Place,
    Prepared,
    entity_id_walk,
    event_backlog,
    event_page,
    highest_sequence_nr,
    page_values,
    prepare,
)
from casty_sa.ordering import newest_place

__all__ = ["BOTTOM", "SqliteReading"]

#: below every place a row can have
BOTTOM: Place = (0, 0, -(2**63))


class SqliteReading(PooledBackend):
    """The read side of :class:`~casty_sa.backends.sqlite.SqliteBackend`."""

    #: another process's commits are seen by polling: a look at the index's last entry
    live_poll = 0.05

    #: whether this SQLite has ``json_each`` (the type filter runs on the client otherwise)
    _has_json = True

    def __init__(
        self,
        engine: AsyncEngine,
        schema: str | None,
        settings: BackendSettings,
        *,
        capacity: int | None = None,
        exclusive: bool = False,
    ) -> None:
        super().__init__(engine, schema, settings, capacity=capacity, exclusive=exclusive)
        events, dialect = self.events, engine.dialect
        self._newest = prepare(newest_place(events), dialect)
        types = func.json_each(bindparam("types")).table_valued("value")

        def types_in(typed: bool) -> Callable[[Any], Any] | None:
            return (lambda column: column.in_(select(types.c.value))) if typed else None

        timestamp = self._timestamp(events)
        self._event_pages = _by_filters(
            lambda prefix, typed: prepare(
                event_page(events, timestamp, prefix=prefix, types_in=types_in(typed)), dialect
            )
        )
        self._backlogs = _by_filters(
            lambda prefix, typed: prepare(
                event_backlog(events, timestamp, prefix=prefix, types_in=types_in(typed)), dialect
            )
        )
        self._entity_walks = {
            contiguous: prepare(entity_id_walk(events, contiguous_prefix=contiguous), dialect)
            for contiguous in (False, True)
        }
        self._highest = prepare(highest_sequence_nr(events), dialect)

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        """Rows of one query (the dialect's backend runs it)."""
        raise NotImplementedError

    def _file_kept(self) -> None:
        """Raise if the path no longer names the file this backend reads (the dialect's
        backend knows its file)."""
        raise NotImplementedError

    async def event_page(
        self, after: Place, stop: Place, limit: int, prefix: str | None, types: list[str] | None
    ) -> EventPage:
        newest = await self._read(self._newest.sql, ())
        if not newest:
            self._file_kept()
            return EventPage([], horizon=BOTTOM, ceiling=None)
        era, transaction_id, position = newest[0]
        horizon: Place = (era, transaction_id, position)
        typed = types is not None and self._has_json
        statement = self._event_pages[(prefix is not None, typed)]
        values = page_values(after, min(stop, horizon), limit) | {
            "prefix": prefix,
            "types": json.dumps(types, ensure_ascii=False) if typed else None,
        }
        rows = await self._read(statement.sql, tuple(statement.args(values)))
        if not rows:
            # a live reader polls here while nothing comes: its connection keeps reading
            # the file it opened, so one deleted or replaced under it would leave it
            # waiting, silently, while other processes write at the path
            self._file_kept()
        return EventPage([tuple(row) for row in rows], horizon=horizon, ceiling=horizon)

    async def event_backlog(
        self, after: Place, limit: int, prefix: str | None, types: list[str] | None
    ) -> tuple[int, float | None]:
        typed = types is not None and self._has_json
        statement = self._backlogs[(prefix is not None, typed)]
        values = page_values(after, after, limit) | {
            "prefix": prefix,
            "types": json.dumps(types, ensure_ascii=False) if typed else None,
        }
        [(count, oldest)] = await self._read(statement.sql, tuple(statement.args(values)))
        return int(count), oldest

    async def entity_id_page(self, after: str, limit: int, prefix: str | None) -> list[str]:
        # casty-sa's tables compare entity ids as BINARY (bytes): ids with a prefix are
        # contiguous
        statement = self._entity_walks[prefix is not None]
        values = {"after": after, "limit": limit, "prefix": prefix}
        return [row[0] for row in await self._read(statement.sql, tuple(statement.args(values)))]

    async def highest_sequence_nr(self, entity_id: str) -> int:
        rows = await self._read(self._highest.sql, (entity_id, entity_id))
        return 0 if not rows or rows[0][0] is None else int(rows[0][0])


def _by_filters(build: Callable[[bool, bool], Prepared]) -> dict[tuple[bool, bool], Prepared]:
    """A statement for each use of the filters: ``(by prefix, by types)``."""
    return {
        (prefix, typed): build(prefix, typed) for prefix in (False, True) for typed in (False, True)
    }
