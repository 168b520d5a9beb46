"""``SAJournal``: casty's ``EventJournal`` over SQLAlchemy, wired from the layers below it.

Writes go ``SAJournal -> GroupCommitter`` (:mod:`casty_sa.batching`) ``-> Writer``
(:mod:`casty_sa.writer`) ``-> backend`` (:mod:`casty_sa.backends`) ``-> driver``; reads go
``SAJournal -> ReadCoalescer`` (:mod:`casty_sa.coalescing`) ``-> backend -> driver``, with
retries from :mod:`casty_sa.reads`. Nothing below calls back up into the journal, which
holds the wiring, the lifecycle (start, close) and the four protocol methods; events become
rows in :mod:`casty_sa.codec`.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

from casty import JournalKind, PersistedEvent, Snapshot
from sqlalchemy import URL
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from casty_sa.backends import Backend, backend_for
from casty_sa.batching import (
    DEFAULT_MAX_BATCH_BYTES,
    GroupCommitter,
    GroupWriter,
    OneByOne,
    WriteRequest,
)
from casty_sa.calls import Inflight
from casty_sa.coalescing import ReadCoalescer
from casty_sa.codec import (
    MAX_SEQUENCE_NR,
    check_entity_id,
    decode_events,
    decode_snapshot,
    encode_events,
    encode_snapshot,
    load_key,
)
from casty_sa.diagnosis import Diagnosis
from casty_sa.engine import open_journal_engine
from casty_sa.event_stream import ReadSide
from casty_sa.health import HealthCall
from casty_sa.lifecycle import AsyncContext, Lifecycle
from casty_sa.live import Wakeups
from casty_sa.metrics import DEFAULT_SLOW_CALL_THRESHOLD, Instrumented, Metrics
from casty_sa.migrate import check_schema, ensure_schema
from casty_sa.read_calls import ReadSideCalls
from casty_sa.reads import RetryingReader
from casty_sa.retention import RetentionCalls
from casty_sa.urls import engine_secrets, kind_of, safe_url
from casty_sa.writer import Writer

__all__ = ["MAX_SEQUENCE_NR", "SAJournal"]


#: Seconds the group-commit flusher (and its connection) waits for the next write.
_WRITER_LINGER = 0.01


class SAJournal(ReadSideCalls, RetentionCalls, HealthCall, Instrumented, AsyncContext):
    """casty ``EventJournal`` storing events and snapshots through SQLAlchemy.

    A drop-in for casty's ``SqliteJournal``: SQLite files are node-local,
    PostgreSQL, MySQL and MariaDB are shared by the whole cluster
    (``JournalKind.centralized``, so casty's replicas skip persisting). All methods are safe to call
    concurrently from many entities; concurrent ``persist`` calls are written
    together in one transaction (group commit) and each returns only once its
    own events are committed.

    Parameters
    ----------
    url : str | URL | os.PathLike | AsyncEngine | async_sessionmaker
        ``sqlite:///journal.db`` (or ``pathlib.Path("journal.db")``),
        ``sqlite://`` (memory, one database for the journal's lifetime),
        ``postgresql://user:pw@host/db`` (libpq's ``sslmode``, ``application_name``,
        ``connect_timeout``, ``options=-c name=value``; ``postgresql+psycopg://``: psycopg 3),
        ``mysql://…`` or ``mariadb://…`` (asyncmy; ``mysql+aiomysql://``), or an
        application's ``AsyncEngine`` or ``async_sessionmaker`` (its pool is
        shared; ``close()`` leaves it open).
    kind : JournalKind | None
        Override the kind derived from the database.
    serialize, deserialize : Callable
        Turn events and states into bytes and back (pickle by default, which
        executes code from the table when loading: see the README's security
        section).
    schema : str | None
        PostgreSQL schema holding casty-sa's tables (default: the connection's ``search_path``,
        usually ``public``); migrate with the same schema. Also a read-only property.
    migrate : bool | None
        Bring the schema to head on first use. ``None``: yes for SQLite, no for
        a server database, which must already be at head (:class:`SchemaError`
        otherwise).
    group_commit : bool
        Write concurrent calls in shared transactions (default); ``False``: one each.
    max_batch_events : int
        Cap on rows per group transaction.
    max_batch_bytes : int
        Cap on the bytes of one group transaction (rows; default 64 MiB), so queued
        calls never add up to a statement the database refuses (PostgreSQL's
        messages stop at 1 GiB); a single call larger than the cap is written alone.
    max_pending : int
        Cap on queued write calls; more callers wait (back-pressure).
    read_retries : int
        Extra attempts of ``load``/``load_snapshot`` after a connection error, with
        exponential backoff from ``retry_backoff`` seconds (casty cannot recover an
        entity whose activation failed: a blip must not fail it).
    busy_timeout : float | None
        SQLite: seconds a writer waits for another process's lock (default 5).
    sqlite_synchronous : str | None
        SQLite: ``FULL`` (default, durable on power loss), ``NORMAL`` (faster, may lose
        the last commits on power loss), ``OFF``.
    connect_timeout : float | None
        Servers: seconds a connection attempt takes at most (the URL's ``connect_timeout``; 10).
    statement_timeout : float | None
        Servers: seconds before a statement fails, on the client and the server
        (``statement_timeout``, MariaDB ``max_statement_time``, MySQL ``max_execution_time``;
        default: PostgreSQL's URL's ``options=-c statement_timeout=…``, else 30). A call's
        budget is the two together: a pooled connection that does not answer a liveness
        ping within the shorter of them fails the call (the server is taken for hung),
        and reads are not retried once the budget is spent.
    slow_call_threshold, meter_provider : float | None, MeterProvider | None
        Seconds after which a call is logged as slow (``None``: never); where the metrics
        go (``None``: OpenTelemetry's global provider). See :mod:`casty_sa.metrics`.
    **engine_options
        Passed to ``create_async_engine`` (``pool_size``, ``echo``, …). ``echo``
        and SQLAlchemy instrumentation (OpenTelemetry, Sentry) see the schema
        check and migrations; reads and writes run on the raw driver connection.

    Notes
    -----
    With an application's engine, ``busy_timeout`` and ``sqlite_synchronous`` do
    not apply, ``connect_timeout`` and ``statement_timeout`` are the journal's
    own budget (the engine's cannot be read back; see the configuration page),
    and on SQLite a deleted ``-wal`` file goes unnoticed
    (:class:`~casty_sa.errors.DatabaseFileReplaced`).

    Examples
    --------
    >>> import asyncio
    >>> from casty import PersistedEvent
    >>> async def main() -> list[PersistedEvent]:
    ...     async with SAJournal("sqlite://") as journal:
    ...         await journal.persist("acct-1", [PersistedEvent(1, "opened", 1.5)])
    ...         return await journal.load("acct-1")
    >>> asyncio.run(main())
    [PersistedEvent(sequence_nr=1, event='opened', timestamp=1.5)]
    """

    def __init__(
        self,
        url: str | URL | os.PathLike[str] | AsyncEngine | async_sessionmaker[Any],
        *,
        kind: JournalKind | None = None,
        serialize: Callable[[Any], bytes] = pickle.dumps,
        deserialize: Callable[[bytes], Any] = pickle.loads,
        migrate: bool | None = None,
        schema: str | None = None,
        group_commit: bool = True,
        max_batch_events: int = 2000,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_pending: int = 10_000,
        read_retries: int = 3,
        retry_backoff: float = 0.05,
        busy_timeout: float | None = None,
        sqlite_synchronous: str | None = None,
        connect_timeout: float | None = None,
        statement_timeout: float | None = None,
        slow_call_threshold: float | None = DEFAULT_SLOW_CALL_THRESHOLD,
        meter_provider: Any = None,
        **engine_options: Any,
    ) -> None:
        settings = {
            "busy_timeout": busy_timeout,
            "sqlite_synchronous": sqlite_synchronous,
            "connect_timeout": connect_timeout,
            "statement_timeout": statement_timeout,
        }
        self._engine, self._owns_engine, timeouts = open_journal_engine(
            url, engine_options | settings
        )
        self._url = self._engine.url
        self._timeouts = timeouts  # a deletion's statements are bounded by them too
        check_schema(self._engine.dialect.name, schema)
        self._schema = schema
        self._kind = kind if kind is not None else kind_of(self._url)
        self._serialize = serialize
        self._deserialize = deserialize
        self._migrate = self._engine.dialect.name == "sqlite" if migrate is None else migrate
        # every secret of the URL, to scrub from driver errors
        self._diagnosis = Diagnosis(self._url, engine_secrets(self._url, url), schema)
        self._backend = backend_for(
            self._engine, schema, timeouts, hold_writes=group_commit, hold_linger=_WRITER_LINGER
        )
        # a call's budget, end to end (servers; SQLite's calls wait at most busy_timeout)
        self._budget = budget = None if timeouts is None else timeouts.budget
        self._metrics = hooks = Metrics(self._engine, meter_provider, slow_call_threshold)
        self._inflight = Inflight()
        self._life = Lifecycle(self._ensure_schema, self._close, self._inflight, name="casty_sa")
        self._reads = RetryingReader(
            self._backend,
            self._diagnosis,
            self._inflight,
            retries=read_retries,
            backoff=retry_backoff,
            budget=budget,
            closed=lambda: self._life.closed,
            metrics=hooks,
        )
        self._writer = Writer(self._backend, self._diagnosis, self._reads, hooks, budget=budget)
        # live readers of this journal are woken after each of its commits
        self._wakeups = Wakeups(self._backend.open_listener, self._diagnosis.describe)
        write = self._wakeups.after_each(self._writer.write_group)
        self._committer: GroupCommitter | OneByOne = (
            _committer(self._backend, write, hooks, max_batch_events, max_batch_bytes, max_pending)
            if group_commit
            else OneByOne(write, self._inflight)
        )
        self._read_side = ReadSide(
            self._backend, self._reads, deserialize, self._wakeups, self._life
        )
        self._event_reads, self._snapshot_reads = _coalescers(self._backend, self._inflight, hooks)

    @property
    def kind(self) -> JournalKind:
        """``local`` for SQLite, ``centralized`` for a server database, unless overridden."""
        return self._kind

    @property
    def engine(self) -> AsyncEngine:
        """The engine in use (the application's own when one was passed in)."""
        return self._engine

    @property
    def schema(self) -> str | None:
        return self._schema  # of the journal's tables (None: the connection's default)

    def __repr__(self) -> str:
        schema = f", schema={self._schema!r}" if self._schema is not None else ""
        return f"SAJournal({safe_url(self._url)!r}, kind={self._kind.value}{schema})"

    async def start(self) -> None:
        """Connect and check (or, when allowed, migrate) the schema.

        Called by the first journal call on its own; call it early to fail fast
        on a wrong URL or an old schema.

        Raises
        ------
        SchemaError
            The database is not at casty-sa's head revision and ``migrate`` is off.
        DatabaseUnavailable
            The database cannot be reached.
        """
        await self._life.start()

    async def close(self) -> None:
        """Finish queued writes, then release the engine if the journal created it.

        Safe to call again, also after a ``close()`` that was cancelled half-way:
        the closing runs in a task of its own, which every call waits for.
        """
        await self._life.close()

    async def _close(self) -> None:
        await self._committer.close()
        await self._wakeups.close()  # live readers wake and learn the journal is closed
        # reads already under way finish (new ones are refused by start()), those waiting
        # for the backend's reader too
        await self._backend.reads_settled()
        await self._event_reads.drain()
        await self._snapshot_reads.drain()
        await self._inflight.settle()  # tasks still running, and any they started
        await self._backend.close()
        if self._owns_engine:
            await self._engine.dispose()

    async def persist(self, entity_id: str, events: Sequence[PersistedEvent[Any]]) -> None:
        """Store a batch of events atomically: all of them, or none.

        Parameters
        ----------
        entity_id : str
            The entity (an opaque string, matched exactly).
        events : Sequence[PersistedEvent]
            Events with strictly increasing sequence numbers. Empty: nothing
            happens.

        Raises
        ------
        SequenceConflict
            One of the sequence numbers is already stored for the entity.
        PayloadEncodeError
            The serializer failed on one of the events.
        InvalidEventError
            A bad entity id or sequence number.
        DatabaseUnavailable, CommitOutcomeUnknown
            The database failed; see each class for what was stored.
        """
        if not events:
            return
        rows = encode_events(entity_id, events, self._serialize)
        await self._submit(WriteRequest(entity_id, events=rows))

    async def load(self, entity_id: str, from_sequence_nr: int = 0) -> list[PersistedEvent[Any]]:
        """Events of ``entity_id`` with ``sequence_nr >= from_sequence_nr``, ascending.

        An unknown entity gives ``[]``.

        Raises
        ------
        PayloadDecodeError
            A stored event could not be deserialized (names its sequence number).
        """
        key = load_key(entity_id, from_sequence_nr)
        if key is None:
            return []  # beyond any sequence number a column holds
        await self.start()
        reading = self._reads.read(
            self._event_reads.get, (key,), f"load events of {entity_id!r}", in_task=True
        )
        rows = await self._metrics.measured("load", entity_id, reading)
        return decode_events(entity_id, rows, self._deserialize)

    async def save_snapshot(self, entity_id: str, snapshot: Snapshot[Any]) -> None:
        """Keep ``snapshot`` as the entity's latest, unless a newer one is stored.

        A snapshot with a lower sequence number than the stored one is ignored,
        so a late write from a deposed node never moves recovery backwards.
        """
        row = encode_snapshot(entity_id, snapshot, self._serialize)
        await self._submit(WriteRequest(entity_id, snapshot=row))

    async def load_snapshot(self, entity_id: str) -> Snapshot[Any] | None:
        """The entity's latest snapshot, or ``None``."""
        check_entity_id(entity_id)
        await self.start()
        reading = self._reads.read(
            self._snapshot_reads.get,
            (entity_id,),
            f"load the snapshot of {entity_id!r}",
            in_task=True,
        )
        row = await self._metrics.measured("load_snapshot", entity_id, reading)
        return decode_snapshot(entity_id, row, self._deserialize)

    async def _submit(self, request: WriteRequest) -> None:
        await self.start()
        await self._metrics.write(request, self._committer.submit(request))

    async def _ensure_schema(self) -> None:
        await ensure_schema(
            self._engine,
            schema=self._schema,
            migrate=self._migrate,
            secrets=self._diagnosis.secrets,
            turn=self._backend.turn,
        )


def _committer(
    backend: Backend,
    write: GroupWriter,
    metrics: Metrics,
    max_batch_events: int,
    max_batch_bytes: int,
    max_pending: int,
) -> GroupCommitter:
    """The group committer of a journal writing through ``write``."""
    return GroupCommitter(
        write,
        max_batch_events=max_batch_events,
        max_batch_bytes=max_batch_bytes,
        max_pending=max_pending,
        linger=_WRITER_LINGER,
        on_idle=backend.release_held,
        pipeline=min(backend.write_pipeline, max(1, backend.capacity - 1)),
        direct=backend.cancel_safe,
        metrics=metrics,
    )


def _coalescers(
    backend: Backend, inflight: Inflight, metrics: Metrics
) -> tuple[ReadCoalescer[Any, Any], ReadCoalescer[Any, Any]]:
    """Coalescers of event and snapshot reads: reads that queue up (many entities
    recovering at once) share one query each."""
    options: dict[str, Any] = {
        "max_keys": backend.max_read_keys,
        "concurrency": backend.read_concurrency,
        "track": inflight.track,
        "inline": backend.cancel_safe,
    }
    return (
        ReadCoalescer(backend.fetch_events_of, on_batch=metrics.read_batches("events"), **options),
        ReadCoalescer(
            backend.fetch_snapshots_of, on_batch=metrics.read_batches("snapshots"), **options
        ),
    )
