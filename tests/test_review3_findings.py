"""Review 3 findings: the path names another file (or -wal) than the journal writes into, and
a write is acknowledged anyway.

Each test puts a real file system in the state, with a running journal on a real SQLite file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from casty import PersistedEvent

from casty_sa import DatabaseFileReplaced, SAJournal


def batch(entity_id: str, first: int, size: int) -> list[PersistedEvent[Any]]:
    return [PersistedEvent(first + k, f"{entity_id}-{first + k}", 1.0) for k in range(size)]


def _backup(path: Path, to: Path) -> Path:
    with (
        contextlib.closing(sqlite3.connect(path)) as source,
        contextlib.closing(sqlite3.connect(to)) as target,
    ):
        source.backup(target)
    return to


async def _settle(journal: SAJournal, entity: str) -> int:
    """Writes until the directory shortcut is trusted (past the tick); the next sequence nr."""
    await journal.persist(entity, batch(entity, 1, 1))
    await journal.load(entity)
    await asyncio.sleep(0.2)
    await journal.persist(entity, batch(entity, 2, 1))
    await journal.persist(entity, batch(entity, 3, 1))
    return 4


@pytest.mark.parametrize("change", ["target-replaced", "target-wal-deleted"])
async def test_a_database_path_that_is_a_symlink_into_another_directory(
    tmp_path: Path, make_journal: Callable[..., SAJournal], change: str
) -> None:
    """``data/journal.db -> ../real/journal.db``: SQLite opens the target and keeps its -wal
    beside it, in ``real/``. Replacing the target changes ``real/``'s ctime, not ``data/``'s,
    so the one-stat shortcut on ``data/`` said "unchanged"; the -wal check looked for
    ``data/journal.db-wal``, which never exists, so it checked nothing at all."""
    real, data = tmp_path / "real", tmp_path / "data"
    real.mkdir()
    data.mkdir()
    target, link = real / "journal.db", data / "journal.db"
    link.symlink_to(Path("..", "real", "journal.db"))
    journal = make_journal(f"sqlite:///{link}")
    async with asyncio.timeout(30):
        seq = await _settle(journal, "acct")
        if change == "target-replaced":
            os.replace(_backup(target, tmp_path / "backup.db"), target)
        else:
            os.unlink(f"{target}-wal")
        with pytest.raises(DatabaseFileReplaced):
            await journal.persist("acct", batch("acct", seq, 1))


async def test_a_file_uri_with_the_localhost_authority(
    tmp_path: Path, make_journal: Callable[..., SAJournal]
) -> None:
    """``file://localhost/abs/path`` names the same file as ``file:///abs/path`` for SQLite;
    the journal took ``localhost/abs/path`` relative to the working directory, found no file
    there, and so never recorded an identity: no check ever ran."""
    path = tmp_path / "journal.db"
    journal = make_journal(f"sqlite:///file://localhost{path}?uri=true")
    async with asyncio.timeout(30):
        seq = await _settle(journal, "acct")
        os.replace(_backup(path, tmp_path / "backup.sqlite"), path)
        with pytest.raises(DatabaseFileReplaced):
            await journal.persist("acct", batch("acct", seq, 1))
