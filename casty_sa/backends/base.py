"""The interface the journal runs its statements through, and what every dialect shares.

:class:`Backend` declares what a dialect provides (writes, reads, telling a
broken connection from a refused statement) and holds what they share: the
journal's settings, the read statements compiled once for the engine's dialect
(and schema), and batched reads answered one list per key::

    backend = backend_for(engine, schema=None)  # a Backend for the engine's dialect
    await backend.write(events, snapshots)  # one transaction: all or nothing
    rows = await backend.fetch_events_of([("acct-1", 1), ("acct-2", 5)])
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Table, and_, bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.compiler import Compiled

from casty_sa.backends.read_statements import EventPage, Place
from casty_sa.codec import EventRow, Row, Stored
from casty_sa.dialects import Timeouts
from casty_sa.models import journal_tables, newer_snapshot_wins

__all__ = ["Backend", "BackendSettings", "Listener", "latest_per_entity", "quietly"]


class Listener(Protocol):
    """A connection waiting for the database's word that events were committed."""

    def alive(self) -> bool:
        """Whether it still listens (its connection is open)."""
        ...

    async def close(self) -> None:
        """Stop listening and close its connection."""
        ...


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """How a backend uses its connections: the journal's choices.

    Parameters
    ----------
    timeouts : Timeouts
        Bound every PostgreSQL statement (``statement``) and liveness ping (``ping``).
    hold_writes : bool
        Keep the writer's connection between write groups (group commit has one
        flusher) where readers have another one, or where the journal alone uses
        its one connection; it goes back whenever a reader waits for it.
    hold_linger : float
        Seconds a kept writer connection may sit unused before it goes back to the pool.
    """

    timeouts: Timeouts = field(default_factory=Timeouts)
    hold_writes: bool = False
    hold_linger: float = 0.01


class Backend(ABC):
    """Statements of one dialect and the code that runs them on a driver connection.

    Parameters
    ----------
    engine : AsyncEngine
        The journal's engine; its pool hands out the driver connections.
    schema : str | None
        The schema the tables live in (``None``: the default).
    settings : BackendSettings
        How the backend uses its connections.
    capacity : int
        How many connections the backend may use at once (at least 1).
    """

    # -- what a dialect provides ---------------------------------------------------------------

    @abstractmethod
    async def write(self, events: Sequence[EventRow], snapshots: Sequence[Row]) -> None:
        """Store events and snapshot upserts atomically (all or nothing)."""

    @abstractmethod
    async def fetch_events(self, entity_id: str, from_nr: int) -> list[Stored]:
        """``(sequence_nr, payload, timestamp)`` rows, ascending."""

    @abstractmethod
    async def fetch_snapshot(self, entity_id: str) -> Stored | None:
        """The snapshot row of an entity, if any."""

    @abstractmethod
    async def min_stored(self, entity_id: str, low: int, high: int) -> int | None:
        """Lowest stored sequence number of ``entity_id`` within ``[low, high]``."""

    @abstractmethod
    async def _fetch_events_batch(
        self, keys: Sequence[tuple[str, int]]
    ) -> Sequence[tuple[int, int, bytes, float]]:
        """``(key number, sequence_nr, payload, timestamp)`` rows, by key and sequence."""

    @abstractmethod
    async def _fetch_snapshots_batch(
        self, entity_ids: Sequence[str]
    ) -> Sequence[tuple[int, int, bytes, float]]:
        """``(key number, sequence_nr, payload, timestamp)`` of the entities with one."""

    @abstractmethod
    async def event_page(
        self, after: Place, stop: Place, limit: int, prefix: str | None, types: list[str] | None
    ) -> EventPage:
        """Up to ``limit`` committed events after ``after`` and at most ``stop``, in the
        global order (see :class:`~casty_sa.backends.read_statements.EventPage`)."""

    @abstractmethod
    async def event_backlog(
        self, after: Place, limit: int, prefix: str | None, types: list[str] | None
    ) -> tuple[int, float | None]:
        """How many events follow ``after`` (at most ``limit``) and the oldest timestamp among
        them (see :func:`~casty_sa.backends.read_statements.event_backlog`)."""

    @abstractmethod
    async def entity_id_page(self, after: str, limit: int, prefix: str | None) -> list[str]:
        """Up to ``limit`` entity ids after ``after`` in the column's order: those with
        ``prefix`` among them (the caller filters), stopping early where it can."""

    @abstractmethod
    async def highest_sequence_nr(self, entity_id: str) -> int:
        """The entity's highest stored sequence number, 0 when it has none."""

    async def open_listener(self, woken: Callable[[], None]) -> Listener | None:
        """A connection calling ``woken`` whenever events are committed (``None``: the
        database has no such thing, and live readers poll)."""
        return None

    #: Seconds between two looks for new events when nothing wakes a live reader sooner.
    live_poll = 0.05

    @abstractmethod
    def is_disconnect(self, exc: BaseException) -> bool:
        """True when ``exc`` means the connection itself is gone."""

    # -- what the connection machinery provides (see casty_sa.backends.pooled) ----------------

    @abstractmethod
    def turn(self) -> AbstractAsyncContextManager[None]:
        """A place among the users of the backend's connections, for work done beside it.

        Held around work on the engine outside the backend (the schema check), so
        that a database with a single connection (memory SQLite) is used in turns.
        """

    @abstractmethod
    async def release_held(self) -> None:
        """Return the connection kept for writes to the pool."""

    @abstractmethod
    async def close(self) -> None:
        """Release what the backend holds outside the pool (kept connections)."""

    # -- shared --------------------------------------------------------------------------------

    #: Write groups in flight at once (see :mod:`casty_sa.batching`): 1 where the database
    #: has a single writer anyway.
    write_pipeline = 1

    #: Whether a statement whose caller is cancelled still runs to its end on its own (the
    #: driver finishes it on the connection's thread), so callers may run reads and writes
    #: in their own task; otherwise the journal runs them in a task that cannot be cut off
    #: half-way (:meth:`casty_sa.calls.Inflight.shielded`): that could leave the connection
    #: unusable.
    cancel_safe = False

    #: Most entities one batched read asks for (1: every read is sent alone).
    max_read_keys = 500

    #: Number of the first key in a batch query's rows (0 on SQLite, 1 on PostgreSQL).
    _ordinal_base = 0

    def __init__(
        self,
        engine: AsyncEngine,
        schema: str | None,
        settings: BackendSettings,
        *,
        capacity: int,
        exclusive: bool = False,
    ) -> None:
        self._engine = engine
        # callers beyond what the pool holds wait for one of these places, cheaply, instead
        # of in the pool
        self.capacity = capacity
        # the writer's connection is kept between groups (see PooledBackend) when readers
        # have another one, or when the journal is the only user of its one connection
        # (``exclusive``: its own memory database); anyone else wanting that connection
        # would wait in SQLAlchemy's pool, where the journal cannot see them waiting
        self.hold_writes = settings.hold_writes and (capacity >= 2 or exclusive)
        #: seconds a kept writer connection may sit unused before it goes back to the pool
        self.hold_linger = settings.hold_linger
        #: seconds a liveness ping may take: a server that does not answer ``SELECT 1``
        #: by then is taken for gone
        self.ping_timeout = settings.timeouts.ping
        events, snapshots = journal_tables(schema)
        self.events, self.snapshots = events, snapshots
        self._load_events = self._compile(
            select(events.c.sequence_nr, events.c.payload, self._timestamp(events))
            .where(events.c.entity_id == bindparam("entity_id"))
            .where(events.c.sequence_nr >= bindparam("from_nr"))
            .order_by(events.c.sequence_nr)
        )
        self._load_snapshot = self._compile(
            select(snapshots.c.sequence_nr, snapshots.c.payload, self._timestamp(snapshots)).where(
                snapshots.c.entity_id == bindparam("entity_id")
            )
        )
        self._min_stored = self._compile(
            select(func.min(events.c.sequence_nr))
            .where(events.c.entity_id == bindparam("entity_id"))
            .where(events.c.sequence_nr >= bindparam("low"))
            .where(events.c.sequence_nr <= bindparam("high"))
        )

    @property
    def read_concurrency(self) -> int:
        """Most batched reads in flight at once (see :mod:`casty_sa.coalescing`)."""
        return self.capacity

    def reads_pending(self) -> Awaitable[object] | None:
        """What every read must wait for before it is queued (``None``: nothing).

        Awaited by each read on its own, before read coalescing, so that reads
        arriving together share one outcome (see
        :class:`~casty_sa.backends.sqlite.SqliteBackend`).
        """
        return None

    async def reads_settled(self) -> None:
        """Wait until what :meth:`reads_pending` returned is over (for ``close()``).

        The reads that waited for it are woken first, so by the time this
        returns they are queued for coalescing, where ``close()`` waits for them.
        """
        return None

    async def fetch_events_of(self, keys: Sequence[tuple[str, int]]) -> list[list[Stored]]:
        """:meth:`fetch_events` of many ``(entity_id, from_nr)`` keys in one query."""
        if len(keys) == 1:
            return [await self.fetch_events(*keys[0])]
        found: list[list[Stored]] = [[] for _ in keys]
        base = self._ordinal_base
        for k, seq, payload, ts in await self._fetch_events_batch(keys):
            found[k - base].append((seq, payload, ts))
        return found

    async def fetch_snapshots_of(self, entity_ids: Sequence[str]) -> list[Stored | None]:
        """:meth:`fetch_snapshot` of many entities in one query."""
        if len(entity_ids) == 1:
            return [await self.fetch_snapshot(entity_ids[0])]
        found: list[Stored | None] = [None] * len(entity_ids)
        base = self._ordinal_base
        for k, seq, payload, ts in await self._fetch_snapshots_batch(entity_ids):
            found[k - base] = (seq, payload, ts)
        return found

    # -- statements ----------------------------------------------------------------------------

    def _timestamp(self, table: Table) -> Any:
        """The ``timestamp`` column of ``table`` as reads select it (a float)."""
        return table.c.timestamp

    def _compile(self, statement: Any) -> str:
        compiled: Compiled = statement.compile(dialect=self._engine.dialect)
        return compiled.string

    def _newer_snapshot_wins(self, upsert: Any) -> str:
        """``upsert`` (the dialect's ``INSERT``) made to replace only an older snapshot."""
        return self._compile(newer_snapshot_wins(upsert, self.snapshots, replace_equal=True))

    def _events_of_keys(self, keys: Any, number: Any, entity_id: Any, from_nr: Any) -> str:
        """The events of every ``(entity_id, from_nr)`` row of ``keys``, led by its ``number``."""
        events = self.events
        return self._compile(
            select(number, events.c.sequence_nr, events.c.payload, self._timestamp(events))
            .join_from(
                keys,
                events,
                and_(events.c.entity_id == entity_id, events.c.sequence_nr >= from_nr),
            )
            .order_by(number, events.c.sequence_nr)
        )

    def _snapshots_of_keys(self, keys: Any, number: Any, entity_id: Any) -> str:
        """The snapshot of each ``entity_id`` row of ``keys`` that has one, led by ``number``."""
        snapshots = self.snapshots
        return self._compile(
            select(
                number, snapshots.c.sequence_nr, snapshots.c.payload, self._timestamp(snapshots)
            ).join_from(keys, snapshots, snapshots.c.entity_id == entity_id)
        )


def latest_per_entity(snapshots: Sequence[Row]) -> Sequence[Row]:
    """Of each entity's snapshots, the one at the highest sequence number (the later of a tie).

    An upsert statement may touch a row only once.
    """
    if len(snapshots) < 2:
        return snapshots
    latest: dict[str, Row] = {}
    for row in snapshots:
        kept = latest.get(row[0])
        if kept is None or row[1] >= kept[1]:
            latest[row[0]] = row
    return list(latest.values())


async def quietly(awaitable: Awaitable[Any]) -> None:
    """Await a clean-up step whose own failure must not hide the original error."""
    with contextlib.suppress(Exception):
        await awaitable
