"""Writing a group of calls: one transaction, and when it fails, each caller's own outcome.

The group committer (:mod:`casty_sa.batching`) hands :meth:`Writer.write_group` the
calls it gathered. They go to the database as one transaction. If the database refuses
the rows (a sequence number already stored, a value it cannot hold), the culprits are
found by halves and everyone else's rows are stored anyway; a write that was never sent
(a connection the server had just closed) or that the database rolled back whole to break
a deadlock is sent again. Every caller then learns exactly what happened to its rows.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import random
from collections.abc import Sequence

from casty_sa.backends import Backend, ConnectionLost, Contended, WriteRefused
from casty_sa.batching import WriteRequest
from casty_sa.calls import copy_error, deadline, past
from casty_sa.codec import EventRow, Row
from casty_sa.diagnosis import Diagnosis
from casty_sa.errors import (
    CommitOutcomeUnknown,
    DatabaseUnavailable,
    InvalidEventError,
    JournalError,
    SequenceConflict,
)
from casty_sa.metrics import NO_METRICS, Metrics
from casty_sa.reads import RetryingReader
from casty_sa.urls import safe_url

__all__ = ["Writer"]

log = logging.getLogger("casty_sa")

#: Times a write the database rolled back whole (deadlock, serialization failure) is sent
#: again, and the first pause before that (doubled each time, with jitter).
CONTENTION_RETRIES = 3
_CONTENTION_BACKOFF = 0.005

_ENTITY_OF = operator.attrgetter("entity_id")

#: Why a group's transaction failed: its rows were refused, it kept deadlocking, or the
#: database failed (the same answer for every caller).
_Failure = WriteRefused | Contended | JournalError


class Writer:
    """Writes groups of calls through a backend (see the module docstring).

    Parameters
    ----------
    backend : Backend
        Where the rows go.
    diagnosis : Diagnosis
        Turns a failure into the callers' error, secrets masked.
    reads : RetryingReader
        For the one read a refusal needs: which sequence number is already stored.
    budget : float | None
        Seconds a write may take in all, resends included (``None``: unbounded).
    metrics : Metrics
        Where groups and resends are recorded.
    """

    def __init__(
        self,
        backend: Backend,
        diagnosis: Diagnosis,
        reads: RetryingReader,
        metrics: Metrics = NO_METRICS,
        *,
        budget: float | None,
    ) -> None:
        self._backend = backend
        self._metrics = metrics
        self._diagnosis = diagnosis
        self._reads = reads
        self._budget = budget

    async def write_group(self, group: Sequence[WriteRequest]) -> list[BaseException | None]:
        """Write ``group`` in one transaction: each call's outcome, ``None`` when stored."""
        self._metrics.group_written(group)
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
            return [copy_error(failure) for _ in group]
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
        try:
            await self._send(events, snapshots)
        except (WriteRefused, Contended):
            raise
        except ConnectionLost as lost:
            what = _what(events, snapshots)
            if lost.during_commit:
                raise CommitOutcomeUnknown(
                    f"could not {what} on {safe_url(self._diagnosis.url)}: "
                    f"{self._diagnosis.describe(lost.cause)}, after the commit was sent. The "
                    "rows may or may not be stored; reload the entity before writing again"
                ) from lost.cause
            raise self._diagnosis.error(lost.cause, what) from lost.cause
        except Exception as exc:
            raise self._diagnosis.error(exc, _what(events, snapshots)) from exc

    async def _send(self, events: list[EventRow], snapshots: list[Row]) -> None:
        """Send the rows, again when it is safe and may help.

        A write the driver refused before sending anything (a connection the server had
        just ended, now invalidated) is stored nowhere: it goes again, on another
        connection, at most once per connection the pool holds. A transaction the server
        rolled back whole to break a deadlock goes again a few times, after a short
        jittered pause that lets the other transaction finish.
        """
        ends = deadline(self._budget)
        resends = self._backend.capacity
        contended = 0
        while True:
            try:
                await self._backend.write(events, snapshots)
                return
            except ConnectionLost as lost:
                if lost.during_commit or not resends or past(ends):
                    raise
                resends -= 1
                self._metrics.retried("write", "connection")
                log.warning(
                    "casty_sa: a write was not sent (%s); sending it on another connection",
                    self._diagnosis.describe(lost.cause),
                )
            except Contended as exc:
                if contended >= CONTENTION_RETRIES or past(ends):
                    raise
                delay = _CONTENTION_BACKOFF * 2**contended * (0.5 + random.random())
                contended += 1
                self._metrics.retried("write", "contended")
                log.info(
                    "casty_sa: the database rolled back a write of %d events and %d "
                    "snapshots (%s); nothing was stored, sending it again in %.3fs",
                    len(events),
                    len(snapshots),
                    self._diagnosis.describe(exc.cause),
                    delay,
                )
                await asyncio.sleep(delay)

    def _contention_error(self, request: WriteRequest, contended: Contended) -> JournalError:
        """A call whose transaction the database kept rolling back: nothing stored, transient."""
        error = DatabaseUnavailable(
            f"the database rolled back the write for entity {request.entity_id!r} "
            f"{CONTENTION_RETRIES + 1} times to break a deadlock or serialization "
            f"conflict with other transactions ({self._diagnosis.describe(contended.cause)}); "
            "nothing was stored. Call again; if it persists, look for other writers of the "
            "same entities"
        )
        error.__cause__ = contended.cause
        return error

    async def _refusal_error(self, request: WriteRequest, refused: WriteRefused) -> JournalError:
        """A call whose rows the database refused: a sequence conflict, or bad values."""
        if not refused.duplicate or not request.events:
            return InvalidEventError(
                f"the database refused the write for entity {request.entity_id!r}: "
                f"{self._diagnosis.describe(refused.cause)}; nothing was stored"
            )
        low, high = request.events[0][1], request.events[-1][1]
        try:
            stored = await self._reads.read(
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


def _what(events: Sequence[EventRow], snapshots: Sequence[Row]) -> str:
    """A failed write in an error message, after "could not" (built only on failure)."""
    return f"write {len(events)} events and {len(snapshots)} snapshots"
