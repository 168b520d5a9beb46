"""``Projection``: a read model in the application's tables, fed by the journal's events.

A projection hands each event of the journal (:meth:`SAJournal.events
<casty_sa.SAJournal.events>`) to the application's ``handler(session, envelope)``
and commits the handler's writes and its own offset in ONE transaction per batch
(:mod:`casty_sa.projections.worker`): a crash at any moment neither loses an event
nor applies one twice. ``Projection.at_least_once`` is for handlers whose effects
live outside the database (a broker, an e-mail): a crash repeats at most the
batch in hand.

Every node may run the same projection: the entities are split into ``slices``
(``zlib.crc32(entity_id) % slices``), each with its own offset and a lease in the
offsets table, so at any moment one worker applies a slice's events; the others
take over within ``lease_seconds`` when it dies (:mod:`casty_sa.projections.leases`).

Examples
--------
>>> import asyncio
>>> from casty import PersistedEvent
>>> from sqlalchemy import text
>>> from casty_sa import SAJournal
>>> async def main() -> list[tuple[str, int]]:
...     async with SAJournal("sqlite://") as journal:
...         await journal.persist("acct-1", [PersistedEvent(1, 5, 1.0)])
...         await journal.persist("acct-1", [PersistedEvent(2, 7, 2.0)])
...         async with journal.engine.begin() as conn:
...             await conn.execute(text("CREATE TABLE balance (id TEXT PRIMARY KEY, amount INT)"))
...         async def handler(session, envelope):
...             await session.execute(
...                 text("INSERT INTO balance VALUES (:id, :n) ON CONFLICT (id) "
...                      "DO UPDATE SET amount = amount + :n"),
...                 {"id": envelope.entity_id, "n": envelope.event},
...             )
...         balances = Projection("balances", journal, handler)
...         assert await balances.catch_up() == 2
...         async with journal.engine.connect() as conn:
...             return list(await conn.execute(text("SELECT * FROM balance")))
>>> asyncio.run(main())
[('acct-1', 12)]
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Literal, Self

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from casty_sa.diagnosis import describe
from casty_sa.errors import ProjectionBusy, ProjectionLeaseLost
from casty_sa.journal import SAJournal
from casty_sa.projections.checks import check_int, check_name, check_seconds
from casty_sa.projections.leases import Leases
from casty_sa.projections.offsets import OffsetRow, OffsetTable
from casty_sa.projections.status import ProjectionStatus, State, slices_status
from casty_sa.projections.tasks import all_of, cancelled, end_workers, settled
from casty_sa.projections.worker import (
    BatchHandler,
    Handler,
    Mode,
    OutsideHandler,
    Settings,
    Worker,
)
from casty_sa.urls import url_secrets

__all__ = ["MAX_SLICES", "Projection"]

log = logging.getLogger("casty_sa.projections")

#: Most slices a projection may have.
MAX_SLICES = 1024

OnError = Literal["retry", "stop"]


class Projection:
    """A read model kept by ``handler`` from ``journal``'s events (see the module docstring).

    Parameters
    ----------
    name : str
        The projection's name in the offsets table (1 to 255 characters).
    journal : SAJournal
        Whose events it reads.
    handler : Callable[[AsyncSession, EventEnvelope], Awaitable]
        Updates the read model through the session it is given; must not commit.
    sessions : async_sessionmaker | None
        The read model's database (default: ``async_sessionmaker(journal.engine)``); it
        holds the offsets table (migration ``0003``).
    schema : str | None
        Schema of the offsets table (default: the journal's when ``sessions`` is ``None``).
    batch_size : int
        Most events per transaction (1 to 100,000).
    entity_prefix, event_types
        Read only these events (as :meth:`SAJournal.events` filters them).
    slices : int
        Fixed number of parts the entities are split into (1 to 1024); change it with
        :meth:`reset` only.
    max_slices : int | None
        Most slices this object works at once (``None``: all it can take).
    on_error : "retry" or "stop"
        On a handler failure (or an event that cannot be decoded): retry the event, or
        raise :class:`~casty_sa.errors.ProjectionFailed`. Database errors are always retried.
    retry_delay, max_retry_delay : float
        The exponential backoff between attempts, from 0.5 s to 30 s by default.
    lease_seconds : float
        A dead worker's slice is taken over after at most this (plus a poll).
    """

    def __init__(
        self,
        name: str,
        journal: SAJournal,
        handler: Handler,
        *,
        sessions: async_sessionmaker[Any] | None = None,
        schema: str | None = None,
        batch_size: int = 1000,
        entity_prefix: str | None = None,
        event_types: Collection[str] | None = None,
        slices: int = 1,
        max_slices: int | None = None,
        on_error: OnError = "retry",
        retry_delay: float = 0.5,
        max_retry_delay: float = 30.0,
        lease_seconds: float = 5.0,
        _mode: Mode = "event",
    ) -> None:
        check_name(name)
        if not isinstance(journal, SAJournal):
            raise TypeError(f"journal must be an SAJournal, not {type(journal).__name__}")
        if not callable(handler):
            raise TypeError(f"handler must be an async function, not {type(handler).__name__}")
        if sessions is None:
            sessions = async_sessionmaker(journal.engine, expire_on_commit=False)
            schema = journal.schema if schema is None else schema
        elif not isinstance(sessions, async_sessionmaker):
            raise TypeError(f"sessions must be an async_sessionmaker, not {sessions!r}")
        if schema is not None and (type(schema) is not str or not schema):
            raise TypeError(f"schema must be a non-empty str or None, not {schema!r}")
        check_int("slices", slices, 1, MAX_SLICES)
        if max_slices is not None:
            check_int("max_slices", max_slices, 1, slices)
        if on_error not in ("retry", "stop"):
            raise ValueError(f"on_error must be 'retry' or 'stop', not {on_error!r}")
        check_seconds("retry_delay", retry_delay, 0.0, 3600.0)
        check_seconds("max_retry_delay", max_retry_delay, retry_delay, 86400.0)
        check_seconds("lease_seconds", lease_seconds, 0.1, 3600.0)
        # the journal checks batch_size and the filters (at once, without I/O)
        journal.events(None, batch_size=batch_size, entity_prefix=entity_prefix,
                       event_types=event_types)  # fmt: skip
        self.name = name
        self._settings = Settings(
            name=name,
            journal=journal,
            handler=handler,
            mode=_mode,
            sessions=sessions,
            table=OffsetTable(schema),
            batch_size=batch_size,
            entity_prefix=entity_prefix,
            event_types=None if event_types is None else frozenset(event_types),
            slices=slices,
            on_error=on_error,
            retry_delay=retry_delay,
            max_retry_delay=max_retry_delay,
            secrets=journal._diagnosis.secrets | _secrets_of(sessions),
        )
        self._max_slices = slices if max_slices is None else max_slices
        self._leases = Leases(self._settings.table, sessions, name, lease_seconds)
        self._state: State = "stopped"
        self._stopping = asyncio.Event()
        self._workers: dict[int, tuple[Worker, asyncio.Task[int]]] = {}
        self._done: asyncio.Event | None = None  # set when run() or catch_up() ends

    @classmethod
    def at_least_once(
        cls, name: str, journal: SAJournal, handler: OutsideHandler, **options: Any
    ) -> Self:
        """A projection whose ``handler(envelope)`` acts outside the database (a broker, an
        e-mail): it runs outside any transaction and the offset advances after each batch,
        so a crash repeats at most the batch in hand. Same options as the constructor."""
        if not callable(handler):
            raise TypeError(f"handler must be an async function, not {type(handler).__name__}")
        if "sessions" in options and options["sessions"] is None:
            del options["sessions"]
        return cls(name, journal, handler, _mode="outside", **options)  # type: ignore[arg-type]

    @classmethod
    def batched(cls, name: str, journal: SAJournal, handler: BatchHandler, **options: Any) -> Self:
        """A projection whose ``handler(session, envelopes)`` gets each batch's events (its
        slice's, in order) in one call inside the batch's transaction: exactly once, and a
        batch is written in a few statements (an ``executemany`` upsert) instead of one per
        event, which is what lets a read model keep up with a busy journal. When it raises
        on several events, they are applied again one at a time, so the failure is reported
        and retried at its own event. Same options as the constructor."""
        if not callable(handler):
            raise TypeError(f"handler must be an async function, not {type(handler).__name__}")
        return cls(name, journal, handler, _mode="batch", **options)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"Projection({self.name!r}, slices={self._settings.slices}, {self._state})"

    @property
    def owner(self) -> str:
        """This object's owner tag in the offsets table (``host:pid:random``)."""
        return self._leases.owner

    async def catch_up(self) -> int:
        """Apply every event committed so far; how many the handler applied.

        Raises :class:`~casty_sa.errors.ProjectionBusy` when another live worker holds
        one of the slices (at the start: nothing applied; or after taking over a slice it
        lost meanwhile: the batches committed before stay), and
        :class:`~casty_sa.errors.ProjectionFailed` when ``on_error="stop"`` stops it.
        """
        async with self._session("catching up"):
            slices = range(self._settings.slices)
            await self._take(slices)
            renewing = asyncio.ensure_future(self._leases.renewing())
            try:
                counts = await all_of(self._catch_up_slice(index) for index in slices)
            finally:
                await cancelled(renewing)
            return sum(counts)

    async def run(self) -> None:
        """Catch up, then follow new events until :meth:`stop`, on the slices this object
        holds (taking free ones as they come: at most ``max_slices``). Raises
        :class:`~casty_sa.errors.ProjectionFailed` when ``on_error="stop"`` stops it."""
        async with self._session("running"):
            renewing = asyncio.ensure_future(self._leases.renewing())
            try:
                await self._follow()
            finally:
                await cancelled(renewing)

    async def stop(self) -> None:
        """Stop :meth:`run` (or :meth:`catch_up`): a batch in hand commits (or rolls back),
        the leases are released, so others take the slices over at their next look."""
        if self._done is None:
            await asyncio.sleep(0)  # a run() task created just before takes its first step
        done = self._done
        if done is None:
            return
        self._state = "stopping"
        self._stopping.set()
        for worker, task in self._workers.values():
            if worker.idle:
                task.cancel()
        await done.wait()

    async def offset(self, slice: int = 0) -> str | None:
        """The stored offset of ``slice`` (``None``: nothing read yet, or never run)."""
        check_int("slice", slice, 0, self._settings.slices - 1)
        rows = await self._leases.rows(slice)
        return rows[0].last_offset if rows else None

    async def reset(self, clear: Callable[[AsyncSession], Awaitable[object]] | None = None) -> None:
        """Start over from the first event: every slice's offset forgotten, its lease freed,
        its fence raised (a worker of the old run rolls back its batch and starts over).

        ``clear(session)`` empties the read model in the SAME transaction, so no one ever
        sees the old rows with the new offsets. Also how the number of slices changes:
        the rows are made again with this object's ``slices``.
        """
        if clear is not None and not callable(clear):
            raise TypeError(f"clear must be an async function or None, not {clear!r}")
        await settled(self._reset(clear))

    async def _reset(self, clear: Callable[[AsyncSession], Awaitable[object]] | None) -> None:
        settings = self._settings
        async with settings.sessions() as session:
            if not await settings.table.reset(session, self.name, settings.slices):
                await settings.table.install(session, self.name, settings.slices)
            if clear is not None:
                await clear(session)
            await session.commit()

    async def status(self) -> ProjectionStatus:
        """Each slice's offset, owner, lag (events, seconds) and last error, and this
        object's state."""
        settings = self._settings
        # never run: every slice stands before the first event (lag 0 would read "caught up")
        rows = await self._leases.rows() or [
            OffsetRow.unstarted(self.name, index, settings.slices)
            for index in range(settings.slices)
        ]
        found = await slices_status(
            settings.journal,
            rows,
            self._leases.held,
            settings.entity_prefix,
            settings.event_types,
        )
        return ProjectionStatus(self.name, self._state, found)

    # -- inside --------------------------------------------------------------------------------

    def _session(self, state: State) -> _Session:
        return _Session(self, state)

    async def _take(self, slices: Collection[int]) -> None:
        """Take every slice of ``slices`` or none: ProjectionBusy when one is held."""
        for index in slices:
            if await self._leases.acquire(index) is None:
                await self._leases.release_all()
                [row] = await self._leases.rows(index)
                raise ProjectionBusy(
                    f"slice {index} of projection {self.name!r} is held by {row.owner} (its "
                    f"lease runs {max(0, (row.lease_expires_ms or 0) - row.now_ms)} ms more): "
                    "that worker applies its events; stop it or wait for it"
                )

    async def _catch_up_slice(self, index: int) -> int:
        handled = 0
        while True:
            worker = Worker(self._settings, self._leases, index, self._stopping)
            try:
                return handled + await worker.work(live=False)
            except ProjectionLeaseLost:
                # reset or taken over: start again from the stored offset, if free
                handled += worker.handled
                self._leases.held.pop(index, None)
                await self._take([index])

    async def _follow(self) -> None:
        """Hold slices and run their workers until stopped (or one fails for good)."""
        poll = self._leases.lease_seconds / 2
        stopped = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                _reap(self._workers, self._leases.held)
                await self._take_free()
                tasks = [task for _, task in self._workers.values()]
                await asyncio.wait(
                    [stopped, *tasks],
                    timeout=poll * random.uniform(0.5, 1.0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            stopped.cancel()
            self._stopping.set()
            await end_workers(list(self._workers.values()))
        _reap(self._workers, self._leases.held)

    async def _take_free(self) -> None:
        """Take free slices, in random order, up to ``max_slices``."""
        free = [i for i in range(self._settings.slices) if i not in self._workers]
        random.shuffle(free)
        for index in free:
            if len(self._workers) >= self._max_slices or self._stopping.is_set():
                return
            try:
                taken = await self._leases.acquire(index)
            except Exception as exc:  # noqa: BLE001 - the next poll tries again
                log.warning(
                    "projection %r: taking slice %d failed: %s",
                    self.name,
                    index,
                    describe(exc, self._settings.secrets),
                )
                return
            if taken is not None:
                worker = Worker(self._settings, self._leases, index, self._stopping)
                task = asyncio.ensure_future(worker.work(live=True))
                self._workers[index] = (worker, task)


def _reap(workers: dict[int, tuple[Worker, asyncio.Task[int]]], held: dict[int, Any]) -> None:
    """Forget the workers that ended (a lost slice is tried again at the next poll);
    re-raise what ended one for good. An idle worker whose lease was lost goes."""
    for index, (worker, task) in list(workers.items()):
        if not task.done():
            if worker.idle and index not in held:
                task.cancel()
            continue
        del workers[index]
        if task.cancelled():
            continue  # stopped: its lease is released with the others
        failure = task.exception()
        if isinstance(failure, ProjectionLeaseLost):
            held.pop(index, None)
        elif failure is not None:
            raise failure


class _Session:
    """One run() or catch_up() of a Projection: only one at a time; leases released after."""

    def __init__(self, projection: Projection, state: State) -> None:
        self.projection = projection
        self.state = state

    async def __aenter__(self) -> None:
        p = self.projection
        if p._done is not None:
            raise RuntimeError(f"{p!r} is already {p._state}; stop() it first")
        p._done = asyncio.Event()
        p._stopping.clear()
        p._state = self.state
        try:
            await p._leases.install(p._settings.slices)
        except BaseException:
            p._state, p._done = "stopped", None
            raise

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        p = self.projection
        try:
            await p._leases.release_all()
        finally:
            failed = exc is not None and not isinstance(exc, asyncio.CancelledError)
            p._state = "failed" if failed else "stopped"
            p._workers.clear()
            done, p._done = p._done, None
            if done is not None:
                done.set()


def _secrets_of(sessions: async_sessionmaker[Any]) -> frozenset[str]:
    """The secrets of the URL ``sessions`` connect to, when it is bound to one engine."""
    bind = sessions.kw.get("bind")
    url = getattr(bind, "url", None)
    return url_secrets(url) if url is not None else frozenset()
