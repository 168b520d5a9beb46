"""Reads that survive a blip: bounded retries of connection errors, safe from cancellation.

casty cannot recover an entity whose activation failed, so a ``load`` that meets a
dropped connection is tried again (a few times, with jittered exponential backoff, never
past the call's time budget) instead of failing the entity. An error that would come
back the same way (a refused login, a missing table) is not retried.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from casty_sa.backends import Backend
from casty_sa.calls import Inflight, deadline, past
from casty_sa.diagnosis import Diagnosis
from casty_sa.errors import DatabaseAccessDenied, JournalClosed, JournalError, SchemaError
from casty_sa.metrics import NO_METRICS, Metrics

__all__ = ["RetryingReader"]

log = logging.getLogger("casty_sa")


class RetryingReader:
    """Runs a backend's reads with retries (see the module docstring).

    Parameters
    ----------
    backend : Backend
        Whose reads these are (and who tells a lost connection from other errors).
    diagnosis : Diagnosis
        Turns a failure into the caller's error, secrets masked.
    inflight : Inflight
        Where a read a cancelled caller must not cut short runs.
    retries, backoff : int, float
        Extra attempts after a connection error, and the first pause (doubled each time).
    budget : float | None
        Seconds a call may take in all (``None``: unbounded); no retry starts past it.
    closed : Callable[[], bool]
        Whether the journal was closed (a retry is then refused).
    metrics : Metrics
        Where retries are recorded.
    """

    def __init__(
        self,
        backend: Backend,
        diagnosis: Diagnosis,
        inflight: Inflight,
        *,
        retries: int,
        backoff: float,
        budget: float | None,
        closed: Callable[[], bool],
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self._metrics = metrics
        self._backend = backend
        self._diagnosis = diagnosis
        self._inflight = inflight
        self._retries = retries
        self._backoff = backoff
        self._budget = budget
        self._closed = closed

    async def read[T](
        self,
        fetch: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        what: str,
        *,
        in_task: bool = False,
        internal: bool = False,
    ) -> T:
        """``await fetch(*args)``, tried again after a connection error.

        ``what`` names the read in errors and log lines (after "could not").
        ``in_task``: ``fetch`` already runs the query in a task of its own (a
        coalesced read), which a cancelled caller cannot cut short.
        ``internal``: a read the journal's own writing needs (it may run while
        ``close()`` flushes the last writes, so it is not refused as closed).
        """
        attempt = 0
        # each attempt is bounded (connect, ping and statement timeouts), so the call is
        # bounded end to end once retries stop at the budget
        ends = deadline(self._budget)
        while True:
            try:
                pending = self._backend.reads_pending()
                if pending is not None:
                    await pending
                if in_task or self._backend.cancel_safe:
                    return await fetch(*args)
                return await self._inflight.shielded(fetch(*args))
            except Exception as exc:
                if isinstance(exc, JournalError):
                    raise
                error = self._diagnosis.error(exc, what)
                delay = self._backoff * (2**attempt) * (0.5 + random.random())
                if not self._retryable(exc, error) or attempt >= self._retries or past(ends, delay):
                    raise error from exc
                if not internal:
                    self._refuse_if_closed(what, exc)
                attempt += 1
                self._metrics.retried("read", "connection")
                log.warning(
                    "casty_sa: %s failed (%s); retry %d of %d in %.2fs",
                    what,
                    self._diagnosis.describe(exc),
                    attempt,
                    self._retries,
                    delay,
                )
                await asyncio.sleep(delay)
                if not internal:  # close() does not wait for a retry that sleeps
                    self._refuse_if_closed(what, exc)

    def _refuse_if_closed(self, what: str, exc: Exception) -> None:
        if self._closed():
            raise JournalClosed(f"the journal was closed while it retried to {what}") from exc

    def _retryable(self, exc: BaseException, error: JournalError) -> bool:
        if isinstance(error, SchemaError | DatabaseAccessDenied):
            return False  # calling again fails the same way: do not hammer the server
        if isinstance(exc, DBAPIError):
            return bool(exc.connection_invalidated) or isinstance(
                exc, OperationalError | InterfaceError
            )
        return self._backend.is_disconnect(exc) or isinstance(exc, sqlite3.OperationalError)
