"""The batch's transaction is the projection's: a handler must not end it.

A handler that commits the session it is given would commit the batch's offset
with only part of its events (a crash then loses the rest); one that rolls back or
closes it undoes the offset and lets its later writes commit without one (they are
applied again). :class:`TransactionGuard` refuses the first (its ``COMMIT`` raises;
a savepoint's release is fine) and notices the others after each handler call, so
either is a failing handler: the batch rolls back and nothing of it is applied.

A handler call still running when the batch's lease is over is cut
(:class:`~casty_sa.errors.HandlerOverran`), and the statement it runs is stopped on the
database too, so the batch's locks go with it: SQLite's is interrupted in its thread;
MySQL's and MariaDB's by ``KILL QUERY`` from another connection of the same engine (the
cut connection cannot send anything until its statement ends). PostgreSQL's server ends
the transaction itself (the offsets table sets its idle and lock timeouts).

Examples
--------
>>> str(HandlerEndedTransaction())[:40]
'the handler must not commit, roll back o'
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from casty_sa.diagnosis import describe
from casty_sa.errors import HandlerEndedTransaction, HandlerOverran

__all__ = ["TransactionGuard", "handler_failure"]

_log = logging.getLogger("casty_sa.projections")

#: Seconds a ``KILL QUERY`` may take (a connection from the pool, one statement)
_KILL_WITHIN = 5.0
#: The ``KILL QUERY`` tasks under way (a reference, so none is collected half-way)
_killing: set[asyncio.Task[None]] = set()


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
        # the server's id of the batch's MySQL connection (its handshake's, no round trip)
        self._mysql_thread: int | None = None
        dialect = self._session.get_bind().dialect.name
        if dialect in ("sqlite", "mysql", "mariadb"):
            driver = self._session.connection().connection.driver_connection
            raw = getattr(driver, "_connection", None)
            self._sqlite = raw if isinstance(raw, sqlite3.Connection) else None
            thread_id = getattr(driver, "thread_id", None)  # asyncmy's and PyMySQL's
            self._mysql_thread = int(thread_id()) if callable(thread_id) else None
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
        if self._mysql_thread is not None:
            task = asyncio.get_running_loop().create_task(self._kill_query(self._mysql_thread))
            _killing.add(task)
            task.add_done_callback(_killing.discard)

    async def _kill_query(self, thread: int) -> None:
        """MySQL: stop the cut connection's statement from another connection (its locks
        are released, and the batch's rollback gets through); a no-op on an idle one."""
        bind = self._session.get_bind()
        engine = AsyncEngine(bind if isinstance(bind, Engine) else bind.engine)
        try:
            async with asyncio.timeout(_KILL_WITHIN), engine.connect() as connection:
                await connection.exec_driver_sql(f"KILL QUERY {thread}")
        except (SQLAlchemyError, OSError, TimeoutError) as exc:  # it runs on to its end
            _log.warning(
                "could not stop the statement of an overrunning handler: %s", describe(exc)
            )

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
