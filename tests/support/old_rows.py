"""Databases as casty-sa 0001 left them: rows written the old way, and how 0002 numbered them."""

from __future__ import annotations

import pickle
from typing import Any

from sqlalchemy import URL

from casty_sa.engine import open_engine

from support.dbtools import execute, query

#: the columns an older casty-sa writes (the 0002 columns come from their defaults)
OLD_INSERT = (
    "INSERT INTO {table} (entity_id, sequence_nr, timestamp, payload) "
    "VALUES ('{entity}', {nr}, {nr}.5, {payload})"
)


def payload_sql(url: URL, value: Any) -> str:
    """``pickle.dumps(value)`` as a literal of the database's binary type."""
    data = pickle.dumps(value).hex()
    return f"'\\x{data}'::bytea" if url.get_backend_name() == "postgresql" else f"X'{data}'"


def events_table(schema: str | None = None) -> str:
    return "casty_sa_events" if schema is None else f"{schema}.casty_sa_events"


async def write_old_rows(url: URL, entities: dict[str, int], schema: str | None = None) -> None:
    """Insert, as casty-sa 0001 does, ``count`` events ``"<entity>-<nr>"`` per entity."""
    await execute(
        url,
        *(
            OLD_INSERT.format(
                table=events_table(schema),
                entity=entity,
                nr=nr,
                payload=payload_sql(url, f"{entity}-{nr}"),
            )
            for entity, count in entities.items()
            for nr in range(1, count + 1)
        ),
    )


async def ordered_rows(url: URL, schema: str | None = None) -> list[tuple[str, int, int, int, int]]:
    """``(entity_id, sequence_nr, era, transaction_id, position)`` in the global order."""
    rows = await query(
        url,
        "SELECT entity_id, sequence_nr, era, transaction_id, position "
        f"FROM {events_table(schema)} ORDER BY era, transaction_id, position",
    )
    return [tuple(row) for row in rows]


def check_old_rows_numbered(rows: list[tuple[str, int, int, int, int]]) -> int:
    """Assert the rows stored before 0002 (the negative positions) are numbered -N..-1 in
    primary-key order, with era and transaction id 0, first in the global order; returns N."""
    old = [row for row in rows if row[4] < 0]
    assert all(row[2:4] == (0, 0) for row in old)
    assert rows[: len(old)] == old  # they come first
    assert [row[4] for row in old] == list(range(-len(old), 0))
    assert [row[:2] for row in old] == sorted(row[:2] for row in old)
    return len(old)


async def run_script(url: URL, script: str) -> None:
    """Run a ``--sql`` script as psql does: statement by statement, outside transactions."""
    engine, _ = open_engine(url)
    try:
        async with engine.connect() as connection:
            raw = (await connection.get_raw_connection()).driver_connection
            assert raw is not None
            for statement in script.split(";\n\n"):
                if statement.strip():
                    await raw.execute(statement)
    finally:
        await engine.dispose()
