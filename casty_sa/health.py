"""``await journal.health()``: can the journal reach its database, and is the schema at head.

Made for a readiness probe: the check returns within its time limit (``within``) whatever the
database does (down, frozen, refusing the login), never raises for it, and its
message names the database with the password masked. It reads the schema revision
on a connection of the journal's own pool, so it also proves that the pool can hand
one out. ``casty-sa check`` runs the same check (:func:`health_of`).

Examples
--------
>>> import asyncio, pathlib, tempfile
>>> import casty_sa
>>> url = f"sqlite:///{pathlib.Path(tempfile.mkdtemp()) / 'journal.db'}"
>>> async def main() -> Health:
...     async with casty_sa.SAJournal(url) as journal:
...         return await journal.health()
>>> report = asyncio.run(main())
>>> report.ok, report.reachable, report.revision == report.head
(True, True, True)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from casty_sa.backends import Backend
from casty_sa.calls import Inflight
from casty_sa.diagnosis import Diagnosis
from casty_sa.engine import bind_schema, open_engine, read_connection
from casty_sa.errors import JournalError, SchemaError
from casty_sa.lifecycle import Lifecycle
from casty_sa.revisions import SchemaState, check_report, head_revision, read_state
from casty_sa.urls import UrlLike, engine_secrets, safe_url

__all__ = ["DEFAULT_HEALTH_TIMEOUT", "Health", "HealthCall", "health_of", "probe"]

#: Seconds ``health()`` waits for the database by default (below a readiness probe's own
#: timeout, which is 1 s by default on Kubernetes: set both).
DEFAULT_HEALTH_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Health:
    """What :meth:`SAJournal.health <casty_sa.SAJournal.health>` found.

    Attributes
    ----------
    ok : bool
        The database answered and the journal can use its tables as they are (at head,
        or made by the application's own migrations): ready.
    reachable : bool
        The journal connected and read the schema (possibly to find old tables); a refused
        login, a missing database or SQLite directory count as unreachable.
    revision : str | None
        The database's casty-sa schema revision (``None``: none, or not read).
    head : str
        The revision this casty-sa needs.
    latency : float | None
        Seconds the check took (connection and one read); ``None`` when it timed out.
    message : str
        One line for people and logs: the database (password masked), and what is wrong.
    error : JournalError | None
        The error a journal call would have raised, when the check failed on one.
    """

    ok: bool
    reachable: bool
    revision: str | None
    head: str
    latency: float | None
    message: str
    error: JournalError | None = field(default=None, repr=False, compare=False)


async def probe(
    engine: AsyncEngine,
    diagnosis: Diagnosis,
    *,
    within: float | None = DEFAULT_HEALTH_TIMEOUT,
    turn: Callable[[], AbstractAsyncContextManager[object]] = contextlib.nullcontext,
    start: Callable[[Coroutine[Any, Any, SchemaState]], asyncio.Future[SchemaState]] = (
        asyncio.ensure_future
    ),
    bound: float | None = None,
) -> Health:
    """The :class:`Health` of ``engine``'s database, within ``within`` seconds.

    The read runs in a task of its own (``start``: the journal's, so that ``close()``
    waits for one still running): a check that times out leaves it to end on its own
    rather than cutting a driver off mid-statement, within ``bound`` seconds (the
    journal's call budget; ``None``: unbounded). A pooled connection to a server that
    stopped answering (SIGSTOP, a dead host) never ends a read by itself: without
    ``bound`` it, its connection and ``close()`` would wait for the server for ever.
    """
    head = head_revision()
    where = safe_url(diagnosis.url)
    began = time.perf_counter()
    task = start(_read_state(engine, diagnosis.schema, turn, bound))
    done, _ = await asyncio.wait({task}, timeout=within)
    latency = time.perf_counter() - began
    if not done:
        task.add_done_callback(_retrieve)
        return Health(False, False, None, head, None, f"{where}: no answer within {within:g}s")
    if task.cancelled():
        return Health(False, False, None, head, None, f"{where}: the check was cancelled")
    failure = task.exception()
    if failure is not None:
        error = (
            failure
            if isinstance(failure, JournalError)
            else diagnosis.error(failure, "read the schema revision", "nothing was changed")
        )
        if error is not failure:
            error.__cause__ = failure
        return Health(False, isinstance(error, SchemaError), None, head, latency, str(error), error)
    state = task.result()
    return Health(state.usable, True, state.revision, head, latency, check_report(where, state))


class HealthCall:
    """The ``health()`` call of :class:`~casty_sa.SAJournal` (its parts, set by the journal)."""

    _engine: AsyncEngine
    _diagnosis: Diagnosis
    _backend: Backend
    _inflight: Inflight
    _life: Lifecycle
    _budget: float | None
    _health_read: asyncio.Future[SchemaState] | None = None

    async def health(self, within: float | None = DEFAULT_HEALTH_TIMEOUT) -> Health:
        """Whether the journal reaches its database and may use its tables as they are: a
        readiness probe. Answers within ``within`` seconds (``None``: the connection's
        own timeouts), never raises for a database that is down, and starts (migrates)
        nothing: call ``start()`` at start-up. See :mod:`casty_sa.health`.

        Examples
        --------
        >>> async def ready(journal: SAJournal) -> bool:
        ...     return (await journal.health(within=0.8)).ok
        """
        if self._life.closed:
            message = f"{safe_url(self._diagnosis.url)}: the journal is closed"
            return Health(False, False, None, head_revision(), None, message)
        turn, start = self._backend.turn, self._start_health_read
        return await probe(
            self._engine, self._diagnosis, within=within, turn=turn, start=start, bound=self._budget
        )

    def _start_health_read(
        self, work: Coroutine[Any, Any, SchemaState]
    ) -> asyncio.Future[SchemaState]:
        """The read of a check; a check that finds the last one still running waits for it
        rather than taking one more connection (probes every few seconds of a database
        that does not answer would take the whole pool)."""
        running = self._health_read
        if running is not None and not running.done():
            work.close()
            return running
        self._health_read = self._inflight.start(work)
        return self._health_read


async def health_of(
    target: UrlLike | AsyncEngine,
    *,
    schema: str | None = None,
    within: float | None = DEFAULT_HEALTH_TIMEOUT,
    **engine_options: Any,
) -> Health:
    """:func:`probe` on an engine opened for ``target`` (disposed of after; an engine passed
    in is left open): ``casty-sa check``, or a probe of a database without a journal.

    A missing SQLite file is created empty (and reported without tables): check first
    where that matters.
    """
    engine, owned = open_engine(target, **engine_options)
    try:
        diagnosis = Diagnosis(engine.url, engine_secrets(engine.url, target), schema)
        return await probe(engine, diagnosis, within=within)
    finally:
        if owned:
            await engine.dispose()


async def _read_state(
    engine: AsyncEngine,
    schema: str | None,
    turn: Callable[[], AbstractAsyncContextManager[object]],
    bound: float | None = None,
) -> SchemaState:
    async with asyncio.timeout(bound):
        async with turn(), read_connection(bind_schema(engine, schema)) as connection:
            return await connection.run_sync(read_state, schema)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Take the outcome of a check nobody waits for any more (else asyncio logs it)."""
    if not task.cancelled():
        task.exception()
