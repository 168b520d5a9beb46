"""The two directions of a copy: ``casty-sa import`` and ``casty-sa export`` from code."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from casty_sa.batching import DEFAULT_MAX_BATCH_BYTES
from casty_sa.transfer.casty_file import CastyFile
from casty_sa.transfer.copying import copy_journal
from casty_sa.transfer.database import JournalDatabase
from casty_sa.transfer.endpoint import Endpoint
from casty_sa.transfer.values import DEFAULT_BATCH_SIZE, Batch, ProgressCallback, TransferReport
from casty_sa.urls import UrlLike

__all__ = ["export_casty_file", "import_casty_file"]


async def import_casty_file(
    path: str | Path,
    target: UrlLike | AsyncEngine,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    migrate: bool | None = None,
    schema: str | None = None,
    on_progress: ProgressCallback | None = None,
    **engine_options: Any,
) -> TransferReport:
    """Copy a casty ``SqliteJournal`` file into a casty-sa database.

    Parameters
    ----------
    path : str | Path
        The casty journal file (opened without being created or changed).
    target : str | URL | AsyncEngine
        The database. A new SQLite database is migrated first; a server
        database must be at head unless ``migrate=True``.
    batch_size : int
        Events per batch and per target transaction.
    batch_bytes : int
        Most bytes of rows per batch (see :func:`copy_journal`).
    migrate : bool | None
        As for :class:`~casty_sa.SAJournal`.
    schema : str | None
        PostgreSQL schema of the target's tables.
    on_progress : Callable[[Progress], None] | None
        Called after every batch.
    **engine_options
        As :class:`~casty_sa.SAJournal` takes them (``connect_timeout``, …).

    Returns
    -------
    TransferReport
        What was copied, and the verification of the database by content.

    Raises
    ------
    JournalFileError
        ``path`` is missing or not a casty journal file.
    SchemaError, DatabaseUnavailable
        The target is not at head or cannot be reached.
    """
    return await _copy_between(
        CastyFile.open(path),
        JournalDatabase.open(target, migrate=migrate, schema=schema, **engine_options),
        Batch(batch_size, batch_bytes),
        on_progress,
    )


async def export_casty_file(
    source: UrlLike | AsyncEngine,
    path: str | Path,
    *,
    schema: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    on_progress: ProgressCallback | None = None,
    **engine_options: Any,
) -> TransferReport:
    """Copy a casty-sa database into a casty ``SqliteJournal`` file.

    Parameters
    ----------
    source : str | URL | AsyncEngine
        The database; it must be at head (it is never migrated).
    path : str | Path
        The file: created (by casty's own ``SqliteJournal``) when missing;
        an existing casty journal file gets what it lacks.
    schema : str | None
        PostgreSQL schema of the source's tables.
    batch_size, batch_bytes : int
        Events, and most bytes of rows, per batch (see :func:`copy_journal`).
    on_progress, **engine_options
        As for :func:`import_casty_file`.

    Returns
    -------
    TransferReport
        What was written to the file, and its verification.

    Raises
    ------
    SchemaError, DatabaseUnavailable
        The source is not at head or cannot be reached.
    JournalFileError
        ``path`` exists and is not a casty journal file.
    """
    return await _copy_between(
        JournalDatabase.open(
            source, migrate=False, schema=schema, must_exist=True, **engine_options
        ),
        CastyFile.open(path, create=True),
        Batch(batch_size, batch_bytes),
        on_progress,
    )


async def _copy_between(
    source: AbstractAsyncContextManager[Endpoint],
    target: AbstractAsyncContextManager[Endpoint],
    batch: Batch,
    on_progress: ProgressCallback | None,
) -> TransferReport:
    """Open the source, then the target, and copy; both are closed again, whatever happens."""
    async with source as origin, target as sink:
        return await copy_journal(
            origin, sink, batch_size=batch.rows, batch_bytes=batch.bytes, on_progress=on_progress
        )
