"""``SAJournal``: casty's ``EventJournal`` over SQLAlchemy.

The unit of work of every call is one transaction on a connection from
SQLAlchemy's pool; the statements themselves are Core constructs compiled
once per dialect (:mod:`casty_sa.backends`). Concurrent writes are grouped by
:mod:`casty_sa.batching`, concurrent reads by :mod:`casty_sa.coalescing`.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import os
import pickle
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self, TypeVar

from casty import JournalKind, PersistedEvent, Snapshot
from sqlalchemy import URL
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker

from casty_sa import migrate as migrations
from casty_sa.backends import (
    ConnectionLost,
    Contended,
    Row,
    WriteRefused,
    backend_for,
)
from casty_sa.batching import DEFAULT_MAX_BATCH_BYTES, GroupCommitter, WriteRequest
from casty_sa.coalescing import ReadCoalescer, SharedAttempt
from casty_sa.codec import (
    MAX_SEQUENCE_NR,
    check_entity_id,
    decode_events,
    decode_snapshot,
    encode_events,
    encode_snapshot,
)
from casty_sa.diagnosis import database_error, describe
from casty_sa.engine import (
    bind_schema,
    open_journal_engine,
    read_connection,
)
from casty_sa.errors import (
    CommitOutcomeUnknown,
    DatabaseAccessDenied,
    DatabaseUnavailable,
    InvalidEventError,
    JournalClosed,
    JournalError,
    SchemaError,
    SequenceConflict,
)
from casty_sa.urls import (
    is_memory_sqlite,
    kind_of,
    safe_url,
    url_secrets,
)

__all__ = ["MAX_SEQUENCE_NR", "SAJournal"]

log = logging.getLogger("casty_sa")
_T = TypeVar("_T")

#: Seconds the group-commit flusher (and its connection) waits for the next write.
_WRITER_LINGER = 0.01

#: Times a write the database rolled back whole (deadlock, serialization failure) is sent
#: again, and the first pause before that (doubled each time, with jitter).
_CONTENTION_RETRIES = 3
_CONTENTION_BACKOFF = 0.005

_ENTITY_OF = operator.attrgetter("entity_id")

#: Why a group's transaction failed: its rows were refused, it kept deadlocking, or the
#: database failed (the same answer for every caller).
_Failure = WriteRefused | Contended | JournalError


class SAJournal:
    """casty ``EventJournal`` storing events and snapshots through SQLAlchemy.

    A drop-in for casty's ``SqliteJournal``: SQLite files are node-local,
    PostgreSQL is shared by the whole cluster (``JournalKind.centralized``, so
    casty's replicas skip persisting). All methods are safe to call
    concurrently from many entities; concurrent ``persist`` calls are written
    together in one transaction (group commit) and each returns only once its
    own events are committed.

    Parameters
    ----------
    url : str | URL | os.PathLike | AsyncEngine | async_sessionmaker
        ``sqlite:///journal.db`` (or ``pathlib.Path("journal.db")``),
        ``sqlite://`` (memory, one database for the journal's lifetime),
        ``postgresql://user:pw@host/db`` (libpq's ``sslmode``,
        ``application_name``, ``connect_timeout`` and ``options=-c name=value``
        are honoured; another parameter asyncpg cannot honour is refused), or an
        application's ``AsyncEngine`` or ``async_sessionmaker`` (its pool is
        shared; ``close()`` leaves it open).
    kind : JournalKind | None
        Override the kind derived from the database.
    serialize, deserialize : Callable
        Turn events and states into bytes and back (pickle by default, which
        executes code from the table when loading: see the README's security
        section).
    schema : str | None
        PostgreSQL schema holding casty-sa's tables (default: the connection's
        ``search_path``, usually ``public``); migrate with the same schema.
    migrate : bool | None
        Bring the schema to head on first use. ``None``: yes for SQLite, no for
        a server database, which must already be at head (:class:`SchemaError`
        otherwise).
    group_commit : bool
        Write concurrent calls in shared transactions (default). ``False``
        gives every call its own transaction.
    max_batch_events : int
        Cap on rows per group transaction.
    max_batch_bytes : int
        Cap on the bytes of one group transaction (payloads plus the rest of
        each row; default 64 MiB), so that large calls queued together never
        add up to a statement the database refuses (PostgreSQL's messages stop
        at 1 GiB). A single call larger than the cap is written alone.
    max_pending : int
        Cap on queued write calls; more callers wait (back-pressure).
    read_retries : int
        Extra attempts of ``load``/``load_snapshot`` after a connection error,
        with exponential backoff from ``retry_backoff`` seconds. casty cannot
        recover an entity whose activation failed, so a blip must not fail it.
    busy_timeout : float | None
        SQLite: seconds a writer waits for another process's lock (default 5).
    sqlite_synchronous : str | None
        SQLite: ``FULL`` (default, durable on power loss), ``NORMAL`` (faster,
        may lose the last commits on power loss), ``OFF``.
    connect_timeout : float | None
        PostgreSQL: seconds before a connection attempt fails (default: the
        URL's ``connect_timeout``, else 10).
    statement_timeout : float | None
        PostgreSQL: seconds before a statement fails, on the client and as the
        server's ``statement_timeout`` (default: the URL's ``options=-c
        statement_timeout=…``, else 30). A call's budget is the two together:
        a pooled connection that does not answer a liveness ping within the
        shorter of them fails the call (the server is taken for hung), and
        reads are not retried once the budget is spent.

    **engine_options
        Passed to ``create_async_engine`` (``pool_size``, ``echo``, …). The
        journal's own reads and writes run on the raw driver connection, so
        ``echo``, ``before_cursor_execute`` listeners and SQLAlchemy
        instrumentation (OpenTelemetry, Sentry) see the schema check and
        migrations, not those statements.

    Notes
    -----
    ``busy_timeout`` and ``sqlite_synchronous`` apply when casty-sa creates the
    engine from a URL. With an application's PostgreSQL engine,
    ``connect_timeout`` and ``statement_timeout`` are the journal's own budget
    (default 10 and 30 s, whatever the engine's ``connect_args``, which cannot
    be read back reliably): every statement of the journal carries the
    statement timeout, and pings and retries are bounded as above; opening a
    connection is bounded by the engine's own ``timeout`` connect argument, so
    set it too. With an application's SQLite engine, the journal does not hold
    a connection of its own, so it cannot tell that the ``-wal`` file was
    deleted under it (see :class:`~casty_sa.errors.DatabaseFileReplaced`).

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
        **engine_options: Any,
    ) -> None:
        tuning = {"busy_timeout": busy_timeout, "sqlite_synchronous": sqlite_synchronous}
        engine_options.update({k: v for k, v in tuning.items() if v is not None})
        self._engine, self._owns_engine, timeouts = open_journal_engine(
            url, engine_options, budget=(connect_timeout, statement_timeout)
        )
        self._url = self._engine.url
        # every secret of the URL, to scrub from driver errors (the engine's URL may lack
        # some of the given one's: TLS parameters go to asyncpg apart)
        self._secrets = url_secrets(self._url) | (
            url_secrets(url) if isinstance(url, str | URL) else frozenset()
        )
        self._dialect = self._engine.dialect.name

        migrations.check_schema(self._dialect, schema)
        self._schema = schema
        self._bind = bind_schema(self._engine, schema)
        self._kind = kind if kind is not None else kind_of(self._url)
        self._serialize = serialize
        self._deserialize = deserialize
        self._migrate = self._dialect == "sqlite" if migrate is None else migrate
        # the flusher keeps its connection while writes keep coming, when the pool has
        # another one for readers (see casty_sa.backends.pooled)
        self._backend = backend_for(
            self._engine, schema, timeouts, hold_writes=group_commit, hold_linger=_WRITER_LINGER
        )
        self._read_retries = read_retries
        self._retry_backoff = retry_backoff
        # a call's budget, end to end (PostgreSQL; SQLite's calls wait at most busy_timeout)
        self._budget = None if timeouts is None else timeouts.budget
        # one connection for a memory database: calls must take turns on it
        self._serial = asyncio.Lock() if is_memory_sqlite(self._url) else None
        self._committer: GroupCommitter | None = None
        if group_commit:
            self._committer = GroupCommitter(
                self._write_group,
                max_batch_events=max_batch_events,
                max_batch_bytes=max_batch_bytes,
                max_pending=max_pending,
                linger=_WRITER_LINGER,
                on_idle=self._backend.release_held,
                pipeline=min(self._backend.write_pipeline, max(1, self._backend.capacity - 1)),
                direct=self._backend.cancel_safe,
            )
        self._ready = False
        self._starting = SharedAttempt(self._start_once, "casty_sa-start", track=self._track)
        self._closed = False
        self._closing: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        # reads that queue up (many entities recovering at once) share one query each
        backend = self._backend
        options: dict[str, Any] = {
            "max_keys": backend.max_read_keys,
            "concurrency": 1 if self._serial is not None else backend.read_concurrency,
            "track": self._track,
            "inline": backend.cancel_safe,
        }
        self._event_reads = ReadCoalescer(self._batched(backend.fetch_events_of), **options)
        self._snapshot_reads = ReadCoalescer(self._batched(backend.fetch_snapshots_of), **options)

    # -- public face -------------------------------------------------------------------------

    @property
    def kind(self) -> JournalKind:
        """``local`` for SQLite, ``centralized`` for PostgreSQL, unless overridden."""
        return self._kind

    @property
    def engine(self) -> AsyncEngine:
        """The engine in use (the application's own when one was passed in)."""
        return self._engine

    def __repr__(self) -> str:
        schema = f", schema={self._schema!r}" if self._schema is not None else ""
        return f"SAJournal({safe_url(self._url)!r}, kind={self._kind.value}{schema})"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

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
        if self._closed:
            raise JournalClosed()
        if self._ready:
            return
        try:
            # the first call, or the attempt before this one failed: try (again). Callers
            # that come while it runs share its outcome instead of queueing up for attempts
            # of their own, one after another, against a database that does not answer; a
            # caller cancelled half-way never leaves a migration (or the transaction that
            # reads the revision) cut in two.
            await self._starting()
        except JournalError as exc:
            raise _copy_error(exc) from exc.__cause__  # each caller its own traceback
        if self._closed:  # close() ran while this call waited for the schema check
            raise JournalClosed("this SAJournal was closed while the call started")

    async def _start_once(self) -> None:
        await self._ensure_schema()
        self._ready = True

    async def close(self) -> None:
        """Finish queued writes, then release the engine if the journal created it.

        Safe to call again, also after a ``close()`` that was cancelled half-way:
        the closing runs in a task of its own, which every call waits for.
        """
        if self._closing is None:
            self._closed = True
            self._closing = asyncio.get_running_loop().create_task(
                self._close(), name="casty_sa-close"
            )
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        if self._committer is not None:
            await self._committer.close()
        # reads already under way finish (new ones are refused by start()), those waiting
        # for the backend's reader too
        await self._backend.reads_settled()
        await self._event_reads.drain()
        await self._snapshot_reads.drain()
        # tasks still running, including any that one of them started meanwhile (a finished
        # task leaves the set only when its callback runs, so look at done() instead)
        while running := [task for task in self._inflight if not task.done()]:
            await asyncio.gather(*running, return_exceptions=True)
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
        check_entity_id(entity_id)
        if type(from_sequence_nr) is not int:
            raise InvalidEventError(
                f"from_sequence_nr must be an int, not {type(from_sequence_nr).__name__}"
            )
        if from_sequence_nr > MAX_SEQUENCE_NR:
            return []
        rows = await self._read(
            self._event_reads.get,
            ((entity_id, max(from_sequence_nr, 0)),),
            f"load events of {entity_id!r}",
            in_task=True,
        )
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
        row = await self._read(
            self._snapshot_reads.get,
            (entity_id,),
            f"load the snapshot of {entity_id!r}",
            in_task=True,
        )
        return decode_snapshot(entity_id, row, self._deserialize)

    # -- writing -------------------------------------------------------------------------------

    async def _submit(self, request: WriteRequest) -> None:
        await self.start()
        if self._committer is not None:
            await self._committer.submit(request)
            return
        outcome = (await self._shielded(self._write_group([request])))[0]
        if outcome is not None:
            raise outcome

    async def _write_group(self, group: Sequence[WriteRequest]) -> list[BaseException | None]:
        """Write ``group`` in one transaction; if the rows are refused, isolate the culprits."""
        failure = await self._attempt(group)
        if failure is None:
            return [None] * len(group)
        return await self._isolate(group, failure)

    async def _attempt(self, group: Sequence[WriteRequest]) -> _Failure | None:
        """Write ``group`` in one transaction: ``None`` when committed, else why it failed."""
        try:
            await self._write(group)
        except (WriteRefused, Contended, JournalError) as exc:
            return exc
        return None

    async def _isolate(
        self, group: Sequence[WriteRequest], failure: _Failure | None
    ) -> list[BaseException | None]:
        """Outcomes of ``group``, whose shared transaction failed with ``failure``.

        The culprits are found by halves: each half goes as one transaction, and a
        half that fails is split again, the earlier half first (so that of two calls
        claiming one sequence number, the first made wins). One stale caller among
        ``n`` costs at most about ``2 log2 n`` transactions instead of ``n``, and its
        neighbours never wait for one transaction each. Splitting is chosen over asking
        the database which keys are already stored because it is the same on every
        backend and finds every kind of culprit: duplicates of stored rows, two calls
        of one group claiming the same number, rows the database refuses for any
        other reason, and transactions that keep deadlocking. ``failure`` is ``None``
        for a half that was not sent whole but must hold a culprit (its twin went
        through): it is split at once, and a single call is always tried on its own
        before it is told it failed.
        """
        if len(group) == 1 and failure is None:
            failure = await self._attempt(group)
            if failure is None:
                return [None]
        if isinstance(failure, JournalError):
            # unreachable, timed out, outcome unknown: the same answer for every caller
            return [_copy_error(failure) for _ in group]
        if len(group) == 1 and isinstance(failure, Contended):  # (a single call's failure)
            return [self._contention_error(group[0], failure)]
        if len(group) == 1 and isinstance(failure, WriteRefused):
            return [await self._refusal_error(group[0], failure)]
        middle = len(group) // 2
        left, right = group[:middle], group[middle:]
        left_failure = await self._attempt(left)
        if left_failure is None:
            outcomes: list[BaseException | None] = [None] * len(left)
            return outcomes + await self._isolate(right, None)
        outcomes = await self._isolate(left, left_failure)
        right_failure = await self._attempt(right)
        if right_failure is None:
            return outcomes + [None] * len(right)
        return outcomes + await self._isolate(right, right_failure)

    async def _write(self, group: Sequence[WriteRequest]) -> None:
        """One transaction for the group; failures become ``JournalError``, ``WriteRefused``
        (the rows were refused) or ``Contended`` (deadlocked again and again)."""
        if len(group) == 1:
            request = group[0]
            events = request.events
            snapshots = [request.snapshot] if request.snapshot is not None else []
        else:
            # rows in one order (entity id, then sequence number: a call's events ascend, and
            # the sort is stable) on every node, so that two groups touching the same entities
            # take their locks in the same order rather than deadlocking
            ordered = sorted(group, key=_ENTITY_OF)
            events = [row for request in ordered for row in request.events]
            snapshots = [request.snapshot for request in ordered if request.snapshot is not None]
        deadline = None if self._budget is None else time.monotonic() + self._budget
        try:
            # a write the driver refused before sending anything (a connection the server
            # had just ended, now invalidated) is stored nowhere: it goes again, on another
            # connection, at most once per connection the pool holds; a transaction the
            # server rolled back whole to break a deadlock goes again a few times, after a
            # short jittered pause that lets the other transaction finish
            resends = self._backend.capacity
            contended = 0
            while True:
                try:
                    await self._write_rows(events, snapshots)
                    break
                except ConnectionLost as lost:
                    if lost.during_commit or not resends or _past(deadline):
                        raise
                    resends -= 1
                    log.warning(
                        "casty_sa: a write was not sent (%s); sending it on another connection",
                        self._describe(lost.cause),
                    )
                except Contended as exc:
                    if contended >= _CONTENTION_RETRIES or _past(deadline):
                        raise
                    delay = _CONTENTION_BACKOFF * 2**contended * (0.5 + random.random())
                    contended += 1
                    log.info(
                        "casty_sa: the database rolled back a write of %d events and %d "
                        "snapshots (%s); nothing was stored, sending it again in %.3fs",
                        len(events),
                        len(snapshots),
                        self._describe(exc.cause),
                        delay,
                    )
                    await asyncio.sleep(delay)
        except (WriteRefused, Contended):
            raise
        except ConnectionLost as lost:
            what = f"write {len(events)} events and {len(snapshots)} snapshots"
            if lost.during_commit:
                raise CommitOutcomeUnknown(
                    f"could not {what} on {safe_url(self._url)}: {self._describe(lost.cause)}, "
                    "after the commit was sent. The rows may or may not be stored; reload "
                    "the entity before writing again"
                ) from lost.cause
            raise self._database_error(lost.cause, what) from lost.cause
        except Exception as exc:
            what = f"write {len(events)} events and {len(snapshots)} snapshots"
            raise self._database_error(exc, what) from exc

    async def _write_rows(self, events: list[Row], snapshots: list[Row]) -> None:
        if self._serial is None:  # the common case, without a context manager per write
            await self._backend.write(events, snapshots)
        else:
            async with self._serial:
                await self._backend.write(events, snapshots)

    def _contention_error(self, request: WriteRequest, contended: Contended) -> JournalError:
        """A call whose transaction the database kept rolling back: nothing stored, transient."""
        error = DatabaseUnavailable(
            f"the database rolled back the write for entity {request.entity_id!r} "
            f"{_CONTENTION_RETRIES + 1} times to break a deadlock or serialization "
            f"conflict with other transactions ({self._describe(contended.cause)}); nothing "
            "was stored. Call again; if it persists, look for other writers of the "
            "same entities"
        )
        error.__cause__ = contended.cause
        return error

    async def _refusal_error(self, request: WriteRequest, refused: WriteRefused) -> JournalError:
        if not refused.duplicate or not request.events:
            return InvalidEventError(
                f"the database refused the write for entity {request.entity_id!r}: "
                f"{self._describe(refused.cause)}; nothing was stored"
            )
        low, high = request.events[0][1], request.events[-1][1]
        try:
            stored = await self._read(
                self._backend.min_stored,
                (request.entity_id, low, high),
                "find the conflicting sequence number",
                internal=True,
            )
        except JournalError:
            stored = None
        conflict = SequenceConflict(request.entity_id, stored if stored is not None else low)
        conflict.__cause__ = refused.cause
        return conflict

    # -- reading -------------------------------------------------------------------------------

    async def _read(
        self,
        fetch: Callable[..., Awaitable[_T]],
        args: tuple[Any, ...],
        what: str,
        *,
        in_task: bool = False,
        internal: bool = False,
    ) -> _T:
        """Run a read with bounded retries of connection errors, safe from cancellation.

        ``in_task``: ``fetch`` already runs the query in a task of its own (a
        coalesced read), which a cancelled caller cannot cut short.
        ``internal``: a read the journal's own writing needs (it may run while
        ``close()`` flushes the last writes, so it is not refused as closed).
        """
        if not internal:
            await self.start()
        attempt = 0
        # retries stop once the call's budget is spent: each attempt is bounded (connect,
        # ping and statement timeouts), so the call is bounded end to end
        deadline = None if self._budget is None else time.monotonic() + self._budget
        while True:
            try:
                pending = self._backend.reads_pending()
                if pending is not None:
                    await pending
                if in_task:
                    return await fetch(*args)
                if not self._backend.cancel_safe:
                    return await self._shielded(self._fetch(fetch, args))
                return await self._fetch(fetch, args)
            except Exception as exc:
                if isinstance(exc, JournalError):
                    raise
                error = self._database_error(exc, what)
                delay = self._retry_backoff * (2**attempt) * (0.5 + random.random())
                if (
                    not self._retryable(exc, error)
                    or attempt >= self._read_retries
                    or _past(deadline, delay)
                ):
                    raise error from exc
                if not internal:
                    self._refuse_retry_if_closed(what, exc)
                attempt += 1
                log.warning(
                    "casty_sa: %s failed (%s); retry %d of %d in %.2fs",
                    what,
                    self._describe(exc),
                    attempt,
                    self._read_retries,
                    delay,
                )
                await asyncio.sleep(delay)
                if not internal:  # close() does not wait for a retry that sleeps
                    self._refuse_retry_if_closed(what, exc)

    def _refuse_retry_if_closed(self, what: str, exc: Exception) -> None:
        if self._closed:
            raise JournalClosed(f"the journal was closed while it retried to {what}") from exc

    async def _fetch(self, fetch: Callable[..., Awaitable[_T]], args: tuple[Any, ...]) -> _T:
        if self._serial is None:  # the common case, without a context manager per read
            return await fetch(*args)
        async with self._serial:
            return await fetch(*args)

    def _retryable(self, exc: BaseException, error: JournalError) -> bool:
        if isinstance(error, SchemaError | DatabaseAccessDenied):
            return False  # calling again fails the same way: do not hammer the server
        if isinstance(exc, DBAPIError):
            return bool(exc.connection_invalidated) or isinstance(
                exc, OperationalError | InterfaceError
            )
        return self._backend.is_disconnect(exc) or isinstance(exc, sqlite3.OperationalError)

    def _batched(
        self, fetch: Callable[[Sequence[Any]], Awaitable[Sequence[_T]]]
    ) -> Callable[[Sequence[Any]], Awaitable[Sequence[_T]]]:
        """``fetch`` taking turns on a memory database's single connection."""

        async def run(keys: Sequence[Any]) -> Sequence[_T]:
            return await self._fetch(fetch, (keys,))

        return run

    def _track(self, task: asyncio.Task[Any]) -> None:
        """Let ``close()`` wait for ``task`` (a read running on its own)."""
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _shielded(self, work: Coroutine[Any, Any, _T]) -> _T:
        """Run ``work`` to completion even if the caller is cancelled.

        A database call cut off half-way can leave a pooled connection in an
        unknown state; the caller still sees its ``CancelledError`` at once,
        while the work finishes (or fails) on its own and ``close()`` waits
        for it.
        """
        task = asyncio.get_running_loop().create_task(work)
        self._track(task)
        return await asyncio.shield(task)

    # -- plumbing ------------------------------------------------------------------------------

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """Take turns on a memory database's single connection; free-for-all otherwise."""
        if self._serial is None:
            yield
        else:
            async with self._serial:
                yield

    @asynccontextmanager
    async def _read_connection(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads outside the hot paths (on SQLite it takes no write lock)."""
        async with self._turn(), read_connection(self._bind) as connection:
            yield connection

    async def _ensure_schema(self) -> None:
        await migrations.ensure_schema(
            self._engine,
            schema=self._schema,
            migrate=self._migrate,
            secrets=self._secrets,
            turn=self._turn,
        )

    def _describe(self, exc: BaseException) -> str:
        """``exc`` in a message or log line, with every secret of the journal's URL masked."""
        return describe(exc, self._secrets)

    def _database_error(self, exc: BaseException, what: str) -> JournalError:
        return database_error(exc, self._url, what, secrets=self._secrets, schema=self._schema)


def _past(deadline: float | None, ahead: float = 0.0) -> bool:
    """Whether ``deadline`` (a ``time.monotonic()`` value) is passed ``ahead`` seconds from now."""
    return deadline is not None and time.monotonic() + ahead >= deadline


def _copy_error(exc: JournalError) -> JournalError:
    """A fresh instance per caller, so tracebacks of different callers do not pile up."""
    clone = type(exc).__new__(type(exc))
    clone.__dict__.update(exc.__dict__)
    clone.args = exc.args
    clone.__cause__ = exc.__cause__
    return clone
