"""What differs between PostgreSQL's two async drivers, asyncpg and psycopg 3: one adapter each.

The PostgreSQL backend (:mod:`casty_sa.backends.postgresql`,
:mod:`casty_sa.backends.postgresql_reads`) runs the same statements, with the
same rules, on either driver; it talks to the driver connection only through
a :class:`PgDriver`: statements with positional parameters and a client-side
bound, an explicit transaction, the liveness checks, a ``LISTEN``, and the
facts of an error the failure rule reads.

psycopg's connections come from SQLAlchemy's pool outside autocommit (each
statement would cost a ``BEGIN`` round trip, and a ``ROLLBACK`` on return):
the journal switches a connection to autocommit while it holds it
(:meth:`PgDriver.lend`) and back before it returns to the pool
(:meth:`PgDriver.reclaim`), so a write group stays one round trip and an
application's sessions never get an autocommit connection.

psycopg binds the arrays of an ``unnest(…)`` in binary too
(:mod:`casty_sa.backends.postgresql_arrays`), runs the journal's statements on
one cursor per connection and reads results in binary (both: less work per call).

Examples
--------
>>> driver_for("asyncpg").name, driver_for("psycopg").name
('asyncpg', 'psycopg')
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from sqlalchemy.engine import Dialect

from casty_sa.backends.postgresql_arrays import adapt as adapt_arrays
from casty_sa.backends.postgresql_arrays import arrays as binary_arrays

__all__ = ["PgDriver", "PsycopgDriver", "driver_for", "driver_of_error"]

#: (stop listening) the result of :meth:`PgDriver.listen`
Unlisten = Callable[[], Awaitable[None]]


class PgDriver:
    """asyncpg: its connection already does everything the backend needs.

    Every statement takes ``args`` positionally (in the order of the compiled
    statement's parameters) and ``bound``, its client-side timeout in seconds.
    """

    name = "asyncpg"

    def statement_dialect(self, dialect: Dialect) -> Dialect:
        """The dialect the backend compiles its statements with: positional parameters."""
        return dialect

    def arrays(self, columns: Sequence[list[Any]], types: Sequence[str]) -> Sequence[Any]:
        """The arrays of an ``unnest(…)``, ready to bind: ``columns[i]`` holds values
        of ``types[i]`` (``"text"``, ``"int8"``, ``"float8"`` or ``"bytea"``, never NULL)."""
        return columns

    def placeholder(self, number: int) -> str:
        """The ``number``-th (from 1) positional parameter in hand-written SQL."""
        return f"${number}"

    async def execute(self, conn: Any, sql: str, args: Sequence[Any], bound: float) -> None:
        await conn.execute(sql, *args, timeout=bound)

    async def fetch(self, conn: Any, sql: str, args: Sequence[Any], bound: float) -> list[Any]:
        return await conn.fetch(sql, *args, timeout=bound)  # type: ignore[no-any-return]

    async def fetchrow(self, conn: Any, sql: str, args: Sequence[Any], bound: float) -> Any:
        return await conn.fetchrow(sql, *args, timeout=bound)

    async def fetchval(self, conn: Any, sql: str, args: Sequence[Any], bound: float) -> Any:
        return await conn.fetchval(sql, *args, timeout=bound)

    async def command(self, conn: Any, sql: str, bound: float) -> None:
        """A statement without parameters (``BEGIN``, ``COMMIT``, a ``NOTIFY``)."""
        await conn.execute(sql, timeout=bound)

    async def lend(self, conn: Any) -> None:
        """Make a connection fresh from the pool ready for the journal (autocommit)."""

    async def reclaim(self, conn: Any) -> None:
        """Undo :meth:`lend` before the connection goes back to the pool; raises when the
        connection is in no state to go back (the pool then discards it)."""

    def usable(self, conn: Any) -> bool:
        """Whether the driver still takes the connection for open."""
        return not conn.is_closed()

    async def ping(self, conn: Any, bound: float) -> None:
        await conn.execute("SELECT 1", timeout=bound)

    def abort(self, conn: Any) -> None:
        """Close the connection at once, without a word to the server."""
        conn.terminate()

    async def close(self, conn: Any) -> None:
        """Free a connection (its socket) that is not the pool's, e.g. one already ended."""
        conn.terminate()

    async def listen(self, conn: Any, channel: str, woken: Callable[[], None]) -> Unlisten:
        """Call ``woken`` on each notification on ``channel``; returns how to stop."""

        def notified(*_args: Any) -> None:
            woken()

        await conn.add_listener(channel, notified)

        async def stop() -> None:
            if not conn.is_closed():
                await conn.remove_listener(channel, notified)

        return stop

    # -- the facts of an error (see casty_sa.backends.postgresql._write_failure) --------------

    def owns(self, exc: BaseException) -> bool:
        """Whether this driver raised ``exc``."""
        return type(exc).__module__.startswith("asyncpg")

    def constraint(self, exc: BaseException) -> str | None:
        """The constraint an integrity error names."""
        return getattr(exc, "constraint_name", None)

    def column(self, exc: BaseException) -> tuple[str | None, str | None]:
        """The table and column a ``NOT NULL`` violation names."""
        return getattr(exc, "table_name", None), getattr(exc, "column_name", None)

    def bad_value(self, exc: BaseException) -> bool:
        """A value refused, by the driver or the server."""
        import asyncpg

        return isinstance(exc, asyncpg.DataError)

    def never_sent(self, exc: BaseException) -> bool:
        """Whether the driver refused the operation before sending anything.

        asyncpg checks its protocol state first: a connection the server has just ended
        (its FATAL message read, the protocol left consuming it) or one already closed
        fails there, so the statement (and any COMMIT) never left the client.
        """
        import asyncpg

        text = str(exc)
        if isinstance(exc, asyncpg.InternalClientError):
            return text.startswith("cannot switch to state")
        if isinstance(exc, asyncpg.InterfaceError):
            return text.startswith("cannot perform operation") or text == "connection is closed"
        return False

    def server_error(self, exc: BaseException) -> bool:
        """An error the server answered with (not a broken connection)."""
        import asyncpg

        return isinstance(exc, asyncpg.PostgresError) and not isinstance(
            exc, asyncpg.PostgresConnectionError
        )

    def broken(self, exc: BaseException) -> bool:
        """A driver error that means the connection itself is gone."""
        import asyncpg

        # the last: the protocol was left mid-way, e.g. by a server's FATAL
        return isinstance(
            exc,
            asyncpg.PostgresConnectionError | asyncpg.InterfaceError | asyncpg.InternalClientError,
        )


class PsycopgDriver(PgDriver):
    """psycopg 3: autocommit while the journal holds a connection, a client-side bound that
    shuts the connection's socket when it fires, ``LISTEN`` through ``notifies()``."""

    name = "psycopg"

    def statement_dialect(self, dialect: Dialect) -> Dialect:
        # psycopg takes %s as well as %(name)s: the statements bind the same positional
        # parameters as asyncpg's, in the same order
        make: Any = type(dialect)
        positional: Dialect = make(paramstyle="format")
        return positional

    def placeholder(self, number: int) -> str:
        return "%s"

    def arrays(self, columns: Sequence[list[Any]], types: Sequence[str]) -> Sequence[Any]:
        return binary_arrays(columns, types)

    async def execute(self, conn: Any, sql: str, args: Sequence[Any], bound: float) -> None:
        await _bounded(conn, _cursor(conn).execute(sql, args), bound)

    async def fetch(self, conn: Any, sql: str, args: Sequence[Any], bound: float) -> list[Any]:
        return await _bounded(conn, _rows(conn, sql, args), bound)

    async def fetchrow(self, conn: Any, sql: str, args: Sequence[Any], bound: float) -> Any:
        rows = await _bounded(conn, _rows(conn, sql, args), bound)
        return rows[0] if rows else None

    async def fetchval(self, conn: Any, sql: str, args: Sequence[Any], bound: float) -> Any:
        rows = await _bounded(conn, _rows(conn, sql, args), bound)
        return rows[0][0] if rows else None

    async def command(self, conn: Any, sql: str, bound: float) -> None:
        await _bounded(conn, _cursor(conn).execute(sql), bound)

    async def lend(self, conn: Any) -> None:
        # an application's engine may hand out autocommit connections (its isolation_level
        # "AUTOCOMMIT", or connect_args): reclaim() gives each back as it came
        setattr(conn, _LENT_AUTOCOMMIT, conn.autocommit)
        await conn.set_autocommit(True)

    async def reclaim(self, conn: Any) -> None:
        # the cursor goes (it and the connection would hold each other: a connection the
        # pool lets go would wait for the garbage collector to be closed)
        with contextlib.suppress(AttributeError):
            delattr(conn, _CURSOR)
        autocommit = getattr(conn, _LENT_AUTOCOMMIT, False)
        with contextlib.suppress(AttributeError):
            delattr(conn, _LENT_AUTOCOMMIT)
        # refused (ProgrammingError) unless the connection is idle, whatever the value: one
        # left mid-query or mid-transaction never goes back
        await conn.set_autocommit(autocommit)

    def usable(self, conn: Any) -> bool:
        return not conn.closed

    async def ping(self, conn: Any, bound: float) -> None:
        await _bounded(conn, _cursor(conn).execute("SELECT 1"), bound)

    def abort(self, conn: Any) -> None:
        _shut(conn)

    async def close(self, conn: Any) -> None:
        await conn.close()

    async def listen(self, conn: Any, channel: str, woken: Callable[[], None]) -> Unlisten:
        await conn.set_autocommit(True)
        await conn.execute(f'LISTEN "{channel.replace(chr(34), chr(34) * 2)}"')

        async def wait() -> None:
            async for _ in conn.notifies():
                woken()

        task = asyncio.get_running_loop().create_task(wait(), name="casty_sa-listen")

        async def stop() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        return stop

    def owns(self, exc: BaseException) -> bool:
        return type(exc).__module__.startswith("psycopg")

    def constraint(self, exc: BaseException) -> str | None:
        diag = getattr(exc, "diag", None)
        return None if diag is None else diag.constraint_name

    def column(self, exc: BaseException) -> tuple[str | None, str | None]:
        diag = getattr(exc, "diag", None)
        return (None, None) if diag is None else (diag.table_name, diag.column_name)

    def bad_value(self, exc: BaseException) -> bool:
        import psycopg

        return isinstance(exc, psycopg.DataError)

    def never_sent(self, exc: BaseException) -> bool:
        # psycopg checks the connection before it sends anything: closed, or broken
        # earlier (the server ended it while idle, a bound fired)
        import psycopg

        return isinstance(exc, psycopg.OperationalError) and str(exc) in _NEVER_SENT

    def server_error(self, exc: BaseException) -> bool:
        return getattr(exc, "sqlstate", None) is not None

    def broken(self, exc: BaseException) -> bool:
        import psycopg

        if isinstance(exc, psycopg.InterfaceError):
            return True
        # psycopg's OperationalError also covers server errors (a cancelled statement, a
        # lock not available): those carry the SQLSTATE the server answered with
        return isinstance(exc, psycopg.OperationalError) and getattr(exc, "sqlstate", None) is None


#: psycopg's messages when it refuses to use a connection it knows to be closed
_NEVER_SENT = frozenset({"the connection is closed", "the connection is lost"})

#: libpq's ``PQTRANS_IDLE``
_IDLE = 0


#: the attribute of a psycopg connection that holds the journal's cursor (see _cursor)
_CURSOR = "_casty_sa_cursor"
#: the attribute of a psycopg connection that holds its autocommit before lend()
_LENT_AUTOCOMMIT = "_casty_sa_autocommit"

_ASYNCPG = PgDriver()
_PSYCOPG = PsycopgDriver()
_DRIVERS = {"asyncpg": _ASYNCPG, "psycopg": _PSYCOPG, "psycopg_async": _PSYCOPG}


def driver_for(name: str) -> PgDriver:
    """The adapter of the driver SQLAlchemy calls ``name`` (``engine.dialect.driver``)."""
    return _DRIVERS[name]


def driver_of_error(exc: BaseException) -> PgDriver | None:
    """The adapter of the driver that raised ``exc`` (``None``: neither did)."""
    for driver in (_ASYNCPG, _PSYCOPG):
        if driver.owns(exc):
            return driver
    return None


def _cursor(conn: Any) -> Any:
    """The one cursor the journal's statements use on a psycopg connection while it holds
    it (:meth:`PsycopgDriver.reclaim` drops it), with the arrays' dumpers.

    A fresh cursor per statement would cost a fifth of a short statement's time (its
    adapters looked up anew), e.g. on a writer connection the journal keeps between
    groups. Results come in binary: nothing to parse. The cursor is psycopg's own, with
    tuples for rows, whatever ``cursor_factory`` or ``row_factory`` an application's engine
    gave its connections (a client-side cursor, which SQLAlchemy documents for psycopg,
    refuses binary results).
    """
    cursor = getattr(conn, _CURSOR, None)
    if cursor is None:
        import psycopg
        from psycopg.rows import tuple_row

        adapt_arrays(conn)
        cursor = psycopg.AsyncCursor(conn, row_factory=tuple_row)
        cursor.format = psycopg.pq.Format.BINARY
        setattr(conn, _CURSOR, cursor)
    return cursor


async def _rows(conn: Any, sql: str, args: Sequence[Any]) -> list[Any]:
    cursor = _cursor(conn)
    await cursor.execute(sql, args)
    return await cursor.fetchall()  # type: ignore[no-any-return]


async def _bounded[T](conn: Any, work: Coroutine[Any, Any, T], bound: float) -> T:
    """``work`` on ``conn``, cut off after ``bound`` seconds with ``TimeoutError``.

    The bound shuts the connection's socket rather than cancelling the await: psycopg
    answers a cancellation by asking the server to cancel the statement and waiting for
    it (seconds, against a server that does not answer). Shut, the socket reads as closed
    at once, the statement fails, and the connection is broken: never reused.
    """
    try:
        _refuse_if_ended(conn)
    except BaseException:
        work.close()  # never started: no "coroutine … was never awaited" warning
        raise
    loop = asyncio.get_running_loop()
    fired = False

    def fire() -> None:
        nonlocal fired
        fired = True
        _shut(conn)

    timer = loop.call_later(bound, fire)
    try:
        return await work
    except Exception as exc:
        if fired:
            raise TimeoutError(f"no answer from PostgreSQL within {bound:g} seconds") from exc
        raise
    finally:
        timer.cancel()


def _refuse_if_ended(conn: Any) -> None:
    """Refuse, before sending anything, a statement on an idle connection the server has
    ended: its goodbye (a FATAL message, then the end of the stream) waits in the socket.

    asyncpg reads such a goodbye as it arrives and refuses to send; psycopg reads only when
    it waits for an answer, so without this look the statement would leave and its
    outcome (a COMMIT's) be unknown, although the server never saw it. One ``select`` of
    the socket, and when something waits there, a look at it that leaves it in place
    (:func:`_ended`); the connection, shut, is lost, and the statement goes on another one.
    """
    pgconn = conn.pgconn
    if pgconn.transaction_status != _IDLE or not select.select([pgconn.socket], [], [], 0)[0]:
        return
    if not _ended(pgconn):
        return
    _shut(conn)
    with contextlib.suppress(Exception):
        pgconn.consume_input()  # the end of the stream marks the connection bad
    import psycopg

    raise psycopg.OperationalError("the connection is lost")


#: Messages a server may send an idle connection that leave it usable: a notification (an
#: application's ``LISTEN`` on a connection of the engine it shares), a notice, a parameter's
#: new value
_HARMLESS = frozenset(b"ANS")
_LOOK = 1 << 16  # bytes _ended looks at


def _ended(pgconn: Any) -> bool:
    """Whether what waits in an idle connection's socket is the server's goodbye.

    Read with ``MSG_PEEK``, so nothing is taken from psycopg: the end of the stream, or any
    message but whole notifications, notices and parameter changes, is a goodbye. Over TLS
    the bytes cannot be read without being consumed, so anything waiting counts as one
    (an application's pending notification then costs it that connection); so does more
    than the look takes in (a goodbye may wait behind 64 KiB of notifications).
    """
    if pgconn.ssl_in_use:
        return True
    with socket.socket(fileno=os.dup(pgconn.socket)) as sock:
        try:
            waiting = sock.recv(_LOOK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
    at = 0
    while at < len(waiting):
        if waiting[at] not in _HARMLESS:
            return True
        if at + 5 > len(waiting):
            break  # a harmless message still arriving
        at += 1 + int.from_bytes(waiting[at + 1 : at + 5], "big")
    return not waiting or len(waiting) == _LOOK  # (full: what is behind it is unseen)


def _shut(conn: Any) -> None:
    """Shut a psycopg connection's socket both ways (its descriptor stays open, so the
    event loop's watch on it stays valid): what waits on it fails at once."""
    with contextlib.suppress(Exception):
        fd = conn.pgconn.socket
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
