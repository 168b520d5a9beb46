"""D: bytes on disk per event, and where they go.

Each journal stores the same events through ``persist`` (1,000 entities at
once, persists of 10 events each: 20,000 events, interleaved as a loaded
journal writes them), then the store's files are measured:

- SQLite (casty-sa's and casty's ``SqliteJournal``): SQLite's ``dbstat``
  table, per b-tree: the events table (a rowid table), its primary key index,
  casty-sa's global-order index; ``D free`` is the unused bytes in their pages.
- PostgreSQL: ``pg_relation_size`` of the heap (plus TOAST), of the primary
  key and of the global-order index; ``D row header`` is what a heap row
  costs beyond its columns' values (``pg_column_size`` of the row against the
  sum of its columns', plus the 4-byte line pointer), ``D free`` the rest of
  the heap's pages (page headers, fill).
- MariaDB: InnoDB's ``data_length`` (the clustered primary key: the rows
  themselves) and ``index_length`` (the global-order index) after ``ANALYZE``:
  allocated pages, so coarser.

Every figure is bytes per event (the ``rate`` column); ``D payload`` is the
mean length of the stored payload, the same pickled event everywhere.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from casty import SqliteJournal
from sqlalchemy import text

from casty_sa import SAJournal

from .base import Row, Sample, Sizes, Workload
from .data import check_events, event_of
from .journals import Journal

_ROWS = {
    "D total": "events table and its indexes",
    "D payload": "mean stored payload (the pickled event)",
    "D table": "the table's rows (the clustered primary key on MariaDB), free space included",
    "D primary key": "the (entity_id, sequence_nr) index (SQLite, PostgreSQL)",
    "D order index": "casty-sa's global-order index (era, transaction_id, position)",
    "D row header": "PostgreSQL: a heap row's header, alignment and line pointer",
    "D free": "unused bytes in the pages (SQLite: all b-trees; PostgreSQL: the heap)",
}
#: the index b-trees of each SQLite layout, by row
_SQLITE_TREES = {
    "D primary key": ("sqlite_autoindex_casty_sa_events_1", "sqlite_autoindex_events_1"),
    "D order index": ("ix_casty_sa_events_global_order",),
}


class D(Workload):
    key = "D"
    journals = frozenset({"sa-sqlite", "sa-postgresql", "sa-mariadb", "casty-sqlite"})

    def __init__(self, sizes: Sizes) -> None:
        self.entities = sizes.d_entities
        self.per = 20
        self.events = self.entities * self.per
        self.rows = tuple(
            Row(key, "bytes/event", f"{what}, over {self.events:,} events")
            for key, what in _ROWS.items()
        )

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        ids = [f"d-{i:05d}" for i in range(self.entities)]

        async def writer(entity: str) -> None:
            for first in (1, 11):
                await journal.persist(
                    entity, [event_of(entity, s) for s in range(first, first + 10)]
                )

        await asyncio.gather(*(writer(entity) for entity in ids))
        for entity in ids[:: max(1, self.entities // 20)]:
            check_events(entity, await journal.load(entity), 1, self.per)
        if isinstance(journal, SqliteJournal):
            sizes = await asyncio.to_thread(_sqlite_sizes, journal._conn, "events", "event_data")
        elif not isinstance(journal, SAJournal):
            raise TypeError(f"D has no sizes for {type(journal).__name__}")
        elif journal.engine.dialect.name == "sqlite":
            path = journal.engine.url.database
            assert path is not None
            sizes = await asyncio.to_thread(_sqlite_file_sizes, path)
        elif journal.engine.dialect.name == "postgresql":
            sizes = await _postgres_sizes(journal)
        else:
            sizes = await _mysql_sizes(journal)
        # the warm-up's event is in the table too: count every row
        rows = sizes.pop("rows")
        return {key: Sample(value / rows) for key, value in sizes.items()}


def _sqlite_file_sizes(path: str) -> dict[str, float]:
    conn = sqlite3.connect(path)
    try:
        return _sqlite_sizes(conn, "casty_sa_events", "payload")
    finally:
        conn.close()


def _sqlite_sizes(conn: sqlite3.Connection, table: str, payload: str) -> dict[str, float]:
    """Bytes of each b-tree of the events table (``dbstat``), times its rows."""
    rows, payload_bytes = conn.execute(
        f"SELECT count(*), sum(length({payload})) FROM {table}"
    ).fetchone()
    trees = dict.fromkeys(
        [table, *(name for names in _SQLITE_TREES.values() for name in names)], (0, 0)
    )
    for name, size, unused in conn.execute(
        "SELECT name, sum(pgsize), sum(unused) FROM dbstat GROUP BY name"
    ):
        if name in trees:
            trees[name] = (size, unused)
    sizes = {
        "rows": float(rows),
        "D total": float(sum(size for size, _ in trees.values())),
        "D payload": float(payload_bytes),
        "D table": float(trees[table][0]),
        "D free": float(sum(unused for _, unused in trees.values())),
    }
    for row, names in _SQLITE_TREES.items():
        sizes[row] = float(sum(trees[name][0] for name in names))
    return sizes


async def _postgres_sizes(journal: SAJournal) -> dict[str, float]:
    async with journal.engine.connect() as conn:
        result = await conn.execute(
            text(
                "SELECT count(*), sum(length(payload)), "
                "sum(pg_column_size(e.*)), "
                "sum(pg_column_size(entity_id) + pg_column_size(sequence_nr) "
                "+ pg_column_size(timestamp) + pg_column_size(payload) "
                "+ coalesce(pg_column_size(event_type), 0) + pg_column_size(era) "
                "+ pg_column_size(transaction_id) + pg_column_size(position)), "
                "pg_table_size('casty_sa_events'), "
                "pg_relation_size('pk_casty_sa_events'), "
                "pg_relation_size('ix_casty_sa_events_global_order') "
                "FROM casty_sa_events e"
            )
        )
        rows, payload, tuples, columns, table, pk, order = result.one()
    header = tuples - columns + 4 * rows  # + the line pointer of each row
    return {
        "rows": float(rows),
        "D total": float(table + pk + order),
        "D payload": float(payload),
        "D table": float(table),
        "D primary key": float(pk),
        "D order index": float(order),
        "D row header": float(header),
        "D free": float(table - tuples - 4 * rows),
    }


async def _mysql_sizes(journal: SAJournal) -> dict[str, float]:
    async with journal.engine.connect() as conn:
        await conn.exec_driver_sql("ANALYZE TABLE casty_sa_events")
        counted = await conn.exec_driver_sql(
            "SELECT count(*), sum(length(payload)) FROM casty_sa_events"
        )
        counts: Any = counted.one()
        rows, payload = counts[0], counts[1]
        allocated = await conn.exec_driver_sql(
            "SELECT data_length, index_length FROM information_schema.tables "
            "WHERE table_schema = DATABASE() AND table_name = 'casty_sa_events'"
        )
        lengths: Any = allocated.one()
        data, index = lengths[0], lengths[1]
    sizes: dict[str, Any] = {
        "rows": float(rows),
        "D total": float(data + index),
        "D payload": float(payload),
        "D table": float(data),
        "D order index": float(index),
    }
    return sizes
