"""What wakes a journal's live readers: its own commits, the database's word, a timer.

A live reader that has read everything waits here until one of three things:

- the journal committed a write group (:meth:`Wakeups.ring`, called by the write path
  after every commit: an increment and, only when a reader waits, one ``set()``);
- the database announced a commit (PostgreSQL: ``NOTIFY`` on the journal's channel,
  heard on one ``LISTEN`` connection that all the journal's live readers share,
  opened when the first one waits and closed when the last one leaves);
- the backend's polling interval passed. Polling is the guarantee: a lost
  notification, or a listening connection that died, only costs latency.

A reader takes a :meth:`~Wakeups.ticket` before it reads, and waits with it: a
commit in between makes the wait return at once, so no wake-up falls between the
read and the wait.

Examples
--------
>>> import asyncio
>>> async def main() -> bool:
...     wakeups = Wakeups(None)
...     ticket = wakeups.ticket()
...     wakeups.ring()  # a commit after the reader's last read
...     return await wakeups.wait(ticket, within=10.0)
>>> asyncio.run(main())
True
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from casty_sa.backends.base import Listener
from casty_sa.batching import GroupWriter, WriteRequest

__all__ = ["Wakeups"]

log = logging.getLogger("casty_sa")

#: Seconds between two attempts at opening a listening connection that failed.
_REOPEN_AFTER = 1.0


class Wakeups:
    """A journal's live readers waiting for new events (see the module docstring).

    Parameters
    ----------
    open_listener : Callable | None
        Opens a connection that calls its argument on every commit the database
        announces (``None``, or returning ``None``: the readers poll only).
    describe : Callable
        A failure to open it, for the log (passwords masked).
    """

    def __init__(
        self,
        open_listener: Callable[[Callable[[], None]], Awaitable[Listener | None]] | None,
        describe: Callable[[BaseException], str] = repr,
    ) -> None:
        self._open_listener = open_listener
        self._describe = describe
        self._generation = 0
        self._rung: asyncio.Event | None = None
        self._members = 0
        self._listener: Listener | None = None
        self._opening: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._failed_at = -_REOPEN_AFTER
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the readers' (set by join)

    def ring(self) -> None:
        """Something was committed: wake every waiting reader."""
        self._generation += 1
        rung, self._rung = self._rung, None
        if rung is not None:
            rung.set()

    def after_each(self, write: GroupWriter) -> GroupWriter:
        """``write`` (a journal's group writer), ringing after every group however it ended:
        a write whose outcome is unknown may have committed, and a reader woken for
        nothing just looks again."""

        async def write_and_ring(group: Sequence[WriteRequest]) -> list[BaseException | None]:
            try:
                return await write(group)
            finally:
                self.ring()

        return write_and_ring

    def ticket(self) -> int:
        """Taken before a read; :meth:`wait` returns at once if a commit came since."""
        return self._generation

    async def wait(self, ticket: int, within: float) -> bool:
        """Wait for a commit after ``ticket``, at most ``within`` seconds; True if one came."""
        if self._generation != ticket:
            return True
        if self._rung is None:
            self._rung = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._rung.wait()
        return self._generation != ticket

    @property
    def listening(self) -> bool:
        """Whether a listening connection is open."""
        return self._listener is not None

    async def join(self) -> None:
        """A live reader starts waiting: make sure the database's word is listened for.

        The first reader opens the listening connection; a failure to open it is
        logged and leaves the readers polling (tried again a second later).
        """
        self._loop = asyncio.get_running_loop()
        self._members += 1
        await self.check_listener()

    async def check_listener(self) -> None:
        """Open the listening connection if members want one and it is not open (or died)."""
        if self._listener is not None and not self._listener.alive():
            self._drop_listener()
        if self._open_listener is None or self._members == 0 or self._closed:
            return
        if self._listener is None and self._opening is None:
            if time.monotonic() - self._failed_at < _REOPEN_AFTER:
                return
            self._opening = asyncio.get_running_loop().create_task(
                self._open(), name="casty_sa-listen"
            )
        if self._opening is not None:
            # shielded: a reader cancelled meanwhile leaves the opening to finish (and the
            # connection to be closed if nobody wants it any more)
            await asyncio.shield(self._opening)

    def leave(self) -> None:
        """A live reader is gone: the last one out closes the listening connection.

        Callable from any thread: a reader collected by the garbage collector in another
        one (a driver's, an executor's) leaves on the readers' loop.
        """
        loop = self._loop
        if loop is not None and _running_loop() is not loop:
            with contextlib.suppress(RuntimeError):  # a closed loop: nothing runs there any more
                loop.call_soon_threadsafe(self._leave)
            return
        self._leave()

    def _leave(self) -> None:
        self._members -= 1
        if self._members == 0:
            self._drop_listener()

    async def close(self) -> None:
        """Wake every reader (the journal is closing) and close the listening connection."""
        self._closed = True
        self.ring()
        if self._opening is not None:
            await asyncio.gather(self._opening, return_exceptions=True)
        self._drop_listener()
        # a finished task whose discard never ran (its loop is gone) is not waited for again
        while pending := [task for task in self._closing if not task.done()]:
            await asyncio.gather(*pending, return_exceptions=True)
        self._closing.clear()

    async def _open(self) -> None:
        try:
            assert self._open_listener is not None
            listener = await self._open_listener(self.ring)
        except Exception as exc:  # noqa: BLE001 - polling goes on; the next wait tries again
            self._failed_at = time.monotonic()
            log.warning("casty_sa: live readers poll: could not LISTEN (%s)", self._describe(exc))
            return
        finally:
            self._opening = None
        self._listener = listener
        if self._members == 0 or self._closed:
            self._drop_listener()

    def _drop_listener(self) -> None:
        """Close the listening connection in a task of its own (:meth:`close` waits for it)."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a reader collected after its loop ended: nothing to run it on
            return
        task = loop.create_task(listener.close(), name="casty_sa-unlisten")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
