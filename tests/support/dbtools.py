"""Small database helpers shared by the tests (``pythonpath = ["tests"]`` makes them importable)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import URL, inspect, text

from casty_sa.engine import open_engine


def plain(url: URL | str) -> str:
    """A URL as a user would type it, password included."""
    return url if isinstance(url, str) else url.render_as_string(hide_password=False)


async def execute(url: URL | str, *statements: str) -> None:
    """Run statements in one transaction on a short-lived engine."""
    engine, _ = open_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def query(url: URL | str, statement: str) -> list[Any]:
    """The rows of one query, on a short-lived engine."""
    engine, _ = open_engine(url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(text(statement))).all())
    finally:
        await engine.dispose()


async def table_names(url: URL | str) -> set[str]:
    """The tables of the database's default schema."""
    engine, _ = open_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()
