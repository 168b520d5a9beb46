"""What the projection tests share: the fold a read model must equal, and a bounded wait."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from casty_sa import SAJournal


async def fold(journal: SAJournal) -> list[tuple[str, int]]:
    """Every event of the journal as ``(entity_id, sequence_nr)``, sorted: what a read model
    that applied each event once holds."""
    return sorted([(e.entity_id, e.sequence_nr) async for e in journal.events()])


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 30.0) -> None:
    """Wait (bounded) until ``check()`` holds: a condition, looked at every 20 ms."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 (a row in a table sets no event)
            await asyncio.sleep(0.02)


def add_to(table: str, key: str, column: str, dialect: str) -> str:
    """An ``INSERT`` of ``(:k, :n)`` into ``table`` that adds ``:n`` to ``column`` of the row
    already there under the same ``key``: ``ON CONFLICT`` or, on MySQL/MariaDB, ``ON
    DUPLICATE KEY``."""
    if dialect in ("mysql", "mariadb"):
        return (
            f"INSERT INTO {table} VALUES (:k, :n) ON DUPLICATE KEY UPDATE {column} = {column} + :n"
        )
    return (
        f"INSERT INTO {table} VALUES (:k, :n) "
        f"ON CONFLICT ({key}) DO UPDATE SET {column} = {table}.{column} + :n"
    )
