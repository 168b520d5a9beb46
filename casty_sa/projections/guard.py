"""The batch's transaction is the projection's: a handler must not end it.

A handler that commits the session it is given would commit the batch's offset
with only part of its events (a crash then loses the rest); one that rolls back or
closes it undoes the offset and lets its later writes commit without one (they are
applied again). :class:`TransactionGuard` refuses the first (its ``COMMIT`` raises;
a savepoint's release is fine) and notices the others after each handler call, so
either is a failing handler: the batch rolls back and nothing of it is applied.

Examples
--------
>>> str(HandlerEndedTransaction())[:40]
'the handler must not commit, roll back o'
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession

from casty_sa.errors import HandlerEndedTransaction, HandlerOverran

__all__ = ["TransactionGuard", "handler_failure"]


class TransactionGuard:
    """Watches ``session``'s transaction from now until :meth:`disarm`, and bounds the
    handler calls of the batch to ``seconds`` from now (:meth:`bounded`)."""

    def __init__(self, session: AsyncSession, seconds: float) -> None:
        self._seconds = seconds
        self._deadline = asyncio.get_running_loop().time() + seconds
        self._session = session.sync_session
        self._transaction = self._session.get_transaction()
        self._refused = False
        # the batch's sqlite3 connection, that aiosqlite drives from a thread of its own
        self._sqlite: sqlite3.Connection | None = None
        if self._session.get_bind().dialect.name == "sqlite":
            driver = self._session.connection().connection.driver_connection
            raw = getattr(driver, "_connection", None)
            self._sqlite = raw if isinstance(raw, sqlite3.Connection) else None
        event.listen(self._session, "before_commit", self._before_commit)

    def _before_commit(self, session: Any) -> None:
        if not session.in_nested_transaction():
            self._refused = True
            raise HandlerEndedTransaction

    @contextlib.asynccontextmanager
    async def bounded(self) -> AsyncIterator[None]:
        """A handler call, cut (:class:`HandlerOverran`) once the batch's time is over."""
        loop = asyncio.get_running_loop()
        interrupt = loop.call_at(self._deadline, self._interrupt)
        try:
            async with asyncio.timeout_at(self._deadline):
                yield
        except TimeoutError as exc:
            raise HandlerOverran(self._seconds) from exc
        finally:
            interrupt.cancel()

    def _interrupt(self) -> None:
        """SQLite: stop the statement the handler runs, now, before the rollback is queued
        behind it. The cut cancels only its await: aiosqlite's thread would run it to its
        end, the file's write lock held meanwhile. With no statement running it is a no-op."""
        if self._sqlite is not None:
            self._sqlite.interrupt()

    async def call(self, handler_call: Awaitable[object]) -> None:
        """Await a handler call within the batch's time, then :meth:`check`."""
        async with self.bounded():
            await handler_call
        self.check()

    def check(self) -> None:
        """Raise :class:`HandlerEndedTransaction` if the handler ended the transaction
        (or tried to commit it, even if it caught the refusal)."""
        transaction = self._session.get_transaction()
        if self._refused or transaction is None or transaction is not self._transaction:
            raise HandlerEndedTransaction
        if not transaction.is_active:
            raise HandlerEndedTransaction

    def disarm(self) -> None:
        """The projection's own commit follows."""
        event.remove(self._session, "before_commit", self._before_commit)


def handler_failure(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a handler, is its failure: any ``Exception``, and a
    ``CancelledError`` of its own (nobody cancelled this task; a batch runs in a task
    of its own that only a loop shutting down cancels), never ``KeyboardInterrupt``."""
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        return task is not None and task.cancelling() == 0
    return isinstance(exc, Exception)
