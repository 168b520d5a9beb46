"""Driver connections from SQLAlchemy's pool: the gate, the liveness ping, the kept writer.

:class:`PooledBackend` is the :class:`~casty_sa.backends.base.Backend` both
dialects build on. Its connections come from the engine's pool and go back to
it; on the way it adds three things the hot paths need:

- a gate (a semaphore of the pool's capacity), where callers beyond what the
  pool holds wait cheaply instead of in the pool;
- a liveness ping of a connection that sat idle (one round trip, bounded on
  its own), so a connection the server ended is replaced before use;
- the writer's connection kept between write groups (``hold_writes``).

A dialect provides :meth:`~PooledBackend.usable`, :meth:`~PooledBackend.ping`
and :meth:`~PooledBackend.abort` where its driver needs them::

    async with backend.connection() as driver_connection:
        rows = await driver_connection.fetch(sql, entity_id)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import greenlet_spawn

from casty_sa.backends.base import Backend, BackendSettings
from casty_sa.backends.failures import ConnectionLost
from casty_sa.calls import Inflight

__all__ = ["PING_AFTER", "PooledBackend"]

#: Seconds a pooled connection may sit unused before a checkout proves it alive.
PING_AFTER = 0.005
_CHECKOUT_ATTEMPTS = 3
_RELEASED = "casty_sa_released"


class PooledBackend(Backend):
    """A backend on the driver connections of the engine's pool.

    Parameters
    ----------
    engine, schema, settings
        As for :class:`~casty_sa.backends.base.Backend`.
    capacity : int | None
        How many connections it may use at once; ``None``: as many as the pool holds.
    exclusive : bool
        Nothing but this backend uses the engine's connections (see ``hold_writes``).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        schema: str | None,
        settings: BackendSettings,
        *,
        capacity: int | None = None,
        exclusive: bool = False,
    ) -> None:
        capacity = _pool_capacity(engine) if capacity is None else capacity
        super().__init__(engine, schema, settings, capacity=capacity, exclusive=exclusive)
        self._gate = asyncio.Semaphore(capacity)
        self._waiting = 0  # callers waiting at the gate
        self._held: Any = None
        self._idle_check: asyncio.TimerHandle | None = None
        # calls into the pool that cancelled callers left running, and idle releases
        self._pool_work = Inflight()

    #: a call cut off half-way (its caller cancelled) leaves the driver's protocol where it
    #: was: the connection can only be dropped (MySQL's drivers), not reset by the pool
    cut_breaks = False

    def usable(self, driver_connection: Any) -> bool:
        """Whether a held connection may be used again without asking the pool."""
        return True

    def broken(self, exc: BaseException) -> bool:
        """Whether a connection whose call raised ``exc`` must be discarded, not reused
        nor reset: it is gone, its call got no answer in time, or (where
        :attr:`cut_breaks`) its call was cut off half-way."""
        if self.is_disconnect(exc) or isinstance(exc, TimeoutError):
            return True
        return self.cut_breaks and not isinstance(exc, Exception)

    async def ping(self, driver_connection: Any) -> None:
        """Prove the connection alive with one round trip (no-op where not needed)."""

    def abort(self, driver_connection: Any) -> None:
        """Close a connection at once, without a word to the server (no-op where not needed)."""

    async def lend(self, driver_connection: Any) -> None:
        """Ready a connection the pool just handed out for the backend's use (no-op where
        not needed; psycopg's goes to autocommit)."""

    async def reclaim(self, driver_connection: Any) -> None:
        """Undo :meth:`lend` before the connection goes back to the pool, which discards it
        when this raises."""

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        # a place at the gate, like any other user of a connection
        await self._enter()
        try:
            yield
        finally:
            self._gate.release()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A live driver connection from SQLAlchemy's pool, returned on exit.

        A connection that failed at the transport level is invalidated, so the
        pool replaces it instead of handing it out again. With one connection in
        all, a reader takes the writer's kept one (and its place at the gate).
        """
        fairy = await self._acquire(take_held=self.capacity == 1)
        try:
            yield fairy.driver_connection
        except BaseException as exc:
            await self._give_back(fairy, exc if self.broken(exc) else None)
            raise
        await self._give_back(fairy, None)

    async def take_writer(self) -> Any:
        """The pooled connection (fairy) a write uses; hand it back with :meth:`give_back_writer`.

        With ``hold_writes`` on, the connection is kept between groups: group
        commit has one flusher, so consecutive groups share one connection
        instead of a pool checkout each. :meth:`release_held` gives it back
        once the flusher goes idle, and it goes back at once whenever someone
        waits for a connection (readers never starve behind it). The pair is two
        plain calls rather than a context manager because it sits on every
        write's path.
        """
        return await self._acquire(take_held=self.hold_writes)

    async def _acquire(self, *, take_held: bool) -> Any:
        """A connection and its place at the gate: the kept writer's when ``take_held``
        and it is kept and alive, else one from the pool."""
        fairy = await self._take_held() if take_held else None
        if fairy is None:
            await self._enter()
            try:
                fairy = await self._checkout()
            except BaseException:
                self._gate.release()
                raise
        return fairy

    async def _take_held(self) -> Any:
        """The kept writer connection, with its place at the gate, if it is kept and alive."""
        fairy, self._held = self._held, None
        if fairy is None:
            return None
        try:
            alive = await self._alive(fairy)
        except BaseException:
            self._gate.release()  # _alive gave the connection back; its permit too
            raise
        if not alive:
            self._gate.release()
            return None
        return fairy

    async def _enter(self) -> None:
        """Take a place at the gate, counted as waiting meanwhile."""
        self._waiting += 1
        try:
            await self._gate.acquire()
        finally:
            self._waiting -= 1

    async def give_back_writer(self, fairy: Any, exc: BaseException | None) -> None:
        """Return (or keep) the writer's connection; ``exc``: how the write failed, if it did.

        A write cut off by cancellation may still be running on the connection, so the
        connection goes back to the pool, whose reset (a rollback queued behind that
        statement) leaves it clean, instead of being kept for the next write.
        """
        if exc is not None and self.broken(exc):
            await self._give_back(fairy, exc)
        elif self.hold_writes and (exc is None or isinstance(exc, Exception)):
            await self._keep(fairy)
        else:
            await self._give_back(fairy, None)

    async def release_held(self) -> None:
        fairy, self._held = self._held, None
        if fairy is not None:
            await self._give_back(fairy, None)

    async def close(self) -> None:
        if self._idle_check is not None:
            self._idle_check.cancel()
            self._idle_check = None
        await self.release_held()
        await self._pool_work.settle()

    async def _give_back(self, fairy: Any, exc: BaseException | None) -> None:
        """Return a connection to the pool and its permit to the gate, even if cancelled.

        A caller cancelled again while the pool resets the connection (its rollback)
        still gives the permit back, and the reset goes on to its end (see :meth:`_uncut`).
        """
        try:
            await self._release(fairy, exc)
        finally:
            self._gate.release()

    async def _keep(self, fairy: Any) -> None:
        """Hold on to the writer's connection, unless others may need it.

        It goes back when someone waits at the gate, or (with more than one
        connection) when every other one is in use: readers never starve behind
        it. With groups in flight side by side, one connection is kept; the
        others go back to the pool.
        """
        fairy.info[_RELEASED] = time.monotonic()
        if self._held is not None or self._waiting or (self.capacity > 1 and self._gate.locked()):
            await self._give_back(fairy, None)
        else:
            self._held = fairy
            if self._idle_check is None:
                loop = asyncio.get_running_loop()
                self._idle_check = loop.call_later(self.hold_linger, self._check_idle)

    def _check_idle(self) -> None:
        """Give the kept connection back once it sat unused for ``hold_linger``."""
        self._idle_check = None
        fairy = self._held
        if fairy is None:
            return
        loop = asyncio.get_running_loop()
        unused = time.monotonic() - fairy.info[_RELEASED]
        if unused < self.hold_linger:
            self._idle_check = loop.call_later(self.hold_linger - unused, self._check_idle)
            return
        self._pool_work.track(loop.create_task(self.release_held(), name="casty_sa-release-writer"))

    async def _checkout(self) -> Any:
        """A pooled connection, checked to be alive when it sat unused for a while.

        A connection the server ended is replaced by the next one; a ping that timed
        out fails the checkout (see :meth:`_alive`).
        """
        for _ in range(_CHECKOUT_ATTEMPTS):
            fairy = await self._pooled()
            if await self._alive(fairy):
                return fairy
        return await self._pooled()  # its error, if any, surfaces on use

    async def _pooled(self) -> Any:
        """A connection from the pool, which a cancelled caller does not cut off half-way
        (see :meth:`_uncut`): one that comes after its caller was cancelled goes back."""
        checkout = self._pool_work.start(self._lent())
        try:
            return await asyncio.shield(checkout)
        except asyncio.CancelledError:
            checkout.add_done_callback(self._unclaimed)
            raise

    async def _lent(self) -> Any:
        fairy = await self._engine.raw_connection()
        try:
            await self.lend(fairy.driver_connection)
        except BaseException as exc:
            await self._return(fairy, exc)
            raise
        return fairy

    def _unclaimed(self, checkout: asyncio.Task[Any]) -> None:
        """Give back the connection of a checkout whose caller was cancelled."""
        if not checkout.cancelled() and checkout.exception() is None:
            self._pool_work.start(self._return(checkout.result(), None))

    async def _uncut[T](self, work: Coroutine[Any, Any, T]) -> T:
        """Await a call into SQLAlchemy's pool, run to its end even if the caller is cancelled.

        The pool, cut off half-way (while it opens, resets or invalidates a connection),
        closes the connection in hand in a task of its own that nobody awaits; on aiosqlite
        that task may wait forever, for a driver thread that already stopped, and outlive
        the journal's ``close()``. So the call runs in a task of its own (started at once:
        one that never waits costs no trip through the loop) that ``close()`` waits for.
        """
        return await asyncio.shield(self._pool_work.start(work))

    async def _alive(self, fairy: Any) -> bool:
        """False (and the connection invalidated) when the connection is gone.

        A connection used a moment ago is trusted; one that sat idle longer than
        :data:`PING_AFTER` gets one round trip (where the backend needs it), the
        job SQLAlchemy's ``pool_pre_ping`` does in three on asyncpg.

        A ping that gets no answer within :attr:`ping_timeout` raises its
        ``TimeoutError``: the server itself (not this one connection) is most
        likely hung or unreachable, and pinging the pool's other connections
        one after another would multiply the wait.
        """
        driver = fairy.driver_connection
        try:
            if not self.usable(driver):
                raise ConnectionLost(OSError("connection closed"), during_commit=False)
            idle = time.monotonic() - fairy.info.get(_RELEASED, 0.0)
            if idle > PING_AFTER:
                await self.ping(driver)
            return True
        except BaseException as exc:
            # whatever failed ``SELECT 1`` (a server that ended the session, a protocol left
            # mid-way, a caller cancelled mid-ping) makes this connection one not to reuse
            await self._release(fairy, exc)
            if not isinstance(exc, Exception) or isinstance(exc, TimeoutError):
                raise
            return False

    async def _release(self, fairy: Any, exc: BaseException | None) -> None:
        """Back to the pool, or invalidated first when ``exc`` says it is broken (to the
        end even if the caller is cancelled, see :meth:`_uncut`)."""
        await self._uncut(self._return(fairy, exc))

    async def _return(self, fairy: Any, exc: BaseException | None) -> None:
        fairy.info[_RELEASED] = time.monotonic()
        if exc is None:
            try:
                await self.reclaim(fairy.driver_connection)
            except Exception as refused:  # noqa: BLE001 - any refusal: not reusable
                exc = refused  # in no state to go back: discarded
        if exc is not None:
            if isinstance(exc, TimeoutError) or not isinstance(exc, Exception):
                # a call without an answer in time, or cut off: no goodbye either (SQLAlchemy's
                # invalidation tries a graceful close first), for a server that may not answer
                self.abort(fairy.driver_connection)
            await greenlet_spawn(fairy.invalidate, exc if isinstance(exc, Exception) else None)
        await greenlet_spawn(fairy.close)


def _pool_capacity(engine: AsyncEngine) -> int:
    """How many connections the engine's pool can hand out at once (at least 1)."""
    pool: Any = engine.pool
    size = getattr(pool, "size", None)
    overflow = getattr(pool, "_max_overflow", 0)
    if not callable(size):
        return 64  # a pool without a size (NullPool and the like): a generous bound
    return max(1, int(size()) + max(0, int(overflow)))
