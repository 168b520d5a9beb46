"""OpenTelemetry metrics of a journal, and its slow-call warning.

Recorded through the OpenTelemetry *API* only (``pip install 'casty-sa[otel]'``): the
application's SDK decides where they go (Prometheus, OTLP, …), and without the API
package every hook is a no-op. The meter is ``casty_sa``; :data:`INSTRUMENTS` lists every
instrument with its unit and attributes (the docs' table is checked against it).

Each layer makes one call per event it knows of (the group committer its back-pressure,
the writer its groups and resends, the coalescer its batches, the journal its calls), on
the journal's :class:`Metrics`. Instruments are created once per meter provider: the
observable ones (queue depth, projection lag) read what every journal and projection
worker of the process registered, through weak references.

Examples
--------
>>> import asyncio
>>> metrics = Metrics("sqlite", slow_call_threshold=None, record=False)
>>> async def answer() -> int:
...     return 42
>>> asyncio.run(metrics.measured("load", "acct-1", answer()))
42
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence, Sized
from typing import Any, Protocol
from weakref import WeakKeyDictionary

from sqlalchemy.ext.asyncio import AsyncEngine

from casty_sa.revisions import package_version

try:
    from opentelemetry import metrics as otel
except ImportError:  # the optional extra is not installed: nothing is recorded
    otel = None  # type: ignore[assignment,unused-ignore]

__all__ = [
    "DEFAULT_SLOW_CALL_THRESHOLD",
    "INSTRUMENTS",
    "METER_NAME",
    "NO_METRICS",
    "Instrumented",
    "Metrics",
    "SliceLag",
]

log = logging.getLogger("casty_sa")

METER_NAME = "casty_sa"
#: Seconds a journal call may take before it is logged as slow (``slow_call_threshold``).
DEFAULT_SLOW_CALL_THRESHOLD = 0.3

#: name -> (kind, unit, attributes, meaning): the instruments, one place for code and docs.
INSTRUMENTS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "casty_sa.write.duration": (
        "histogram", "s", ("db.system", "operation"),
        "a write call (persist, save_snapshot) from the call to its commit, queueing included",
    ),
    "casty_sa.read.duration": (
        "histogram", "s", ("db.system", "operation"),
        "a read call (load, load_snapshot), retries included",
    ),
    "casty_sa.group_commit.events": (
        "histogram", "{event}", ("db.system",), "events written by one group transaction",
    ),
    "casty_sa.group_commit.calls": (
        "histogram", "{call}", ("db.system",), "write calls sharing one group transaction",
    ),
    "casty_sa.write.queue_depth": (
        "observable gauge", "{call}", ("db.system",), "write calls queued for group commit",
    ),
    "casty_sa.write.backpressure.duration": (
        "histogram", "s", ("db.system",),
        "time a write call waited for room in a full queue (max_pending); only calls that waited",
    ),
    "casty_sa.read.batch_size": (
        "histogram", "{key}", ("db.system", "kind"),
        "entities one coalesced read query asked for (kind: events or snapshots)",
    ),
    "casty_sa.retries": (
        "counter", "{retry}", ("db.system", "operation", "reason"),
        "reads tried again and writes sent again (operation: read or write; reason: "
        "connection or contended)",
    ),
    "casty_sa.errors": (
        "counter", "{error}", ("db.system", "operation", "error.type"),
        "journal calls that raised, by the exception's class name",
    ),
    "casty_sa.projection.lag": (
        "observable gauge", "s", ("projection", "slice"),
        "per slice this process runs: the age of the oldest event it holds and has not yet "
        "applied; when it holds none: 0 once caught up (waiting for new events), else how old "
        "its last batch was when applied",
    ),
}  # fmt: skip

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_COUNTS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class _Call(Protocol):
    @property
    def entity_id(self) -> str: ...
    @property
    def events(self) -> Sized: ...
    @property
    def snapshot(self) -> object: ...


class _Queue(Protocol):
    @property
    def pending(self) -> int: ...


class _Instruments:
    """The instruments of one meter provider, shared by every journal that records to it."""

    def __init__(self, meter: Any) -> None:
        def histogram(name: str, bounds: tuple[float, ...]) -> Any:
            _, unit, _, meaning = INSTRUMENTS[name]
            return meter.create_histogram(
                name, unit, meaning, explicit_bucket_boundaries_advisory=bounds
            )

        def counter(name: str) -> Any:
            return meter.create_counter(name, INSTRUMENTS[name][1], INSTRUMENTS[name][3])

        def gauge(name: str, observe: Callable[[Any], Iterable[Any]]) -> None:
            _, unit, _, meaning = INSTRUMENTS[name]
            meter.create_observable_gauge(name, [observe], unit, meaning)

        self.write = histogram("casty_sa.write.duration", _SECONDS)
        self.read = histogram("casty_sa.read.duration", _SECONDS)
        self.group_events = histogram("casty_sa.group_commit.events", _COUNTS)
        self.group_calls = histogram("casty_sa.group_commit.calls", _COUNTS)
        self.backpressure = histogram("casty_sa.write.backpressure.duration", _SECONDS)
        self.read_batch = histogram("casty_sa.read.batch_size", _COUNTS)
        self.retries = counter("casty_sa.retries")
        self.errors = counter("casty_sa.errors")
        #: what the observable gauges read, each with its attributes; gone with its owner
        self.queues: WeakKeyDictionary[_Queue, dict[str, str]] = WeakKeyDictionary()
        self.slices: WeakKeyDictionary[SliceLag, dict[str, Any]] = WeakKeyDictionary()
        gauge("casty_sa.write.queue_depth", self._observe_queues)
        gauge("casty_sa.projection.lag", self._observe_slices)

    def _observe_queues(self, _options: Any) -> Iterable[Any]:
        depth: dict[str, int] = {}  # journals on one database system add up
        for queue, attributes in list(self.queues.items()):
            system = attributes["db.system"]
            depth[system] = depth.get(system, 0) + queue.pending
        return [otel.Observation(n, {"db.system": system}) for system, n in depth.items()]

    def _observe_slices(self, _options: Any) -> Iterable[Any]:
        found = [(lag.lag, attributes) for lag, attributes in list(self.slices.items())]
        return [otel.Observation(lag, attributes) for lag, attributes in found if lag is not None]


_by_provider: WeakKeyDictionary[Any, _Instruments] = WeakKeyDictionary()
#: the global provider's instruments, made once: on the API's proxy provider when the first
#: journal came before the application set its provider (the proxy forwards to it)
_global: dict[str, _Instruments] = {}


def _instruments(meter_provider: Any) -> _Instruments | None:
    """The instruments of ``meter_provider`` (``None``: the global one), or ``None``
    without the OpenTelemetry API.

    One set per provider, whenever it was set: a second set on the same meter would get
    the SDK's first instruments back, and the observable gauges' callbacks of the first
    set only, so the queues and slices registered with the second would never be seen.
    """
    if otel is None:
        return None
    current = otel.get_meter_provider()
    if meter_provider is None or meter_provider is current:
        found = _global.get("global")
        if found is None:
            found = _global["global"] = _by_provider.get(current) or _make(current)
        return found
    found = _by_provider.get(meter_provider)
    if found is None:
        found = _by_provider[meter_provider] = _make(meter_provider)
    return found


def _make(provider: Any) -> _Instruments:
    return _Instruments(provider.get_meter(METER_NAME, package_version()))


class Metrics:
    """One journal's hooks: its instruments, its attributes, its slow-call threshold.

    Parameters
    ----------
    engine : AsyncEngine | str
        The journal's engine, or its dialect's name: ``sqlite``, ``postgresql`` or
        ``mysql`` (the ``db.system`` attribute).
    meter_provider : Any
        An OpenTelemetry ``MeterProvider``; ``None``: the global one (which may be set
        after the journal is made).
    slow_call_threshold : float | None
        Seconds above which a call is logged as slow; ``None``: never.
    record : bool
        ``False``: record nothing, whatever is installed.
    """

    __slots__ = ("_attributes", "_by_operation", "_on", "_slow", "db_system")

    def __init__(
        self,
        engine: AsyncEngine | str,
        meter_provider: Any = None,
        slow_call_threshold: float | None = DEFAULT_SLOW_CALL_THRESHOLD,
        *,
        record: bool = True,
    ) -> None:
        self.db_system = db_system = engine if isinstance(engine, str) else engine.dialect.name
        self._on = _instruments(meter_provider) if record else None
        self._slow = slow_call_threshold
        self._attributes = {"db.system": db_system}
        # built once: a call records with a dict it does not allocate
        self._by_operation = {
            operation: {"db.system": db_system, "operation": operation}
            for operation in ("persist", "save_snapshot", "load", "load_snapshot")
        }

    async def measured[T](self, operation: str, entity_id: str, call: Awaitable[T]) -> T:
        """``await call``, a journal call: its duration, its error, a slow-call warning."""
        started = time.perf_counter()
        try:
            return await call
        except BaseException as exc:
            self.failed(operation, exc)
            raise
        finally:
            elapsed = time.perf_counter() - started
            on = self._on
            if on is not None:
                histogram = on.read if operation.startswith("load") else on.write
                histogram.record(elapsed, self._by_operation[operation])
            if self._slow is not None and elapsed > self._slow:
                # the entity and the operation, never a payload (nor a URL)
                log.warning(
                    "casty_sa: slow call: %s of entity %r took %.3fs (slow_call_threshold %gs)",
                    operation,
                    entity_id,
                    elapsed,
                    self._slow,
                )

    async def write(self, request: _Call, call: Awaitable[None]) -> None:
        """:meth:`measured` for a write call (a persist, or a snapshot's save)."""
        operation = "persist" if request.snapshot is None else "save_snapshot"
        await self.measured(operation, request.entity_id, call)

    def failed(self, operation: str, exc: BaseException) -> None:
        """Count a call that raised ``exc`` (a cancelled caller is not an error)."""
        if self._on is not None and isinstance(exc, Exception):
            error = type(exc).__name__
            attributes = {"db.system": self.db_system, "operation": operation, "error.type": error}
            self._on.errors.add(1, attributes)

    def group_written(self, group: Sequence[_Call]) -> None:
        """A group transaction is sent with the write calls of ``group``."""
        if self._on is not None:
            self._on.group_calls.record(len(group), self._attributes)
            events = sum(len(call.events) for call in group)
            self._on.group_events.record(events, self._attributes)

    def waited_for_room(self, seconds: float) -> None:
        """A write call waited ``seconds`` for room in the full queue (back-pressure)."""
        if self._on is not None:
            self._on.backpressure.record(seconds, self._attributes)

    def read_batches(self, kind: str) -> Callable[[int], None] | None:
        """What a coalescer of ``kind`` reads calls with each batch's size (``None``: off)."""
        on = self._on
        if on is None:
            return None
        attributes = {"db.system": self.db_system, "kind": kind}
        return lambda keys: on.read_batch.record(keys, attributes)

    def retried(self, operation: str, reason: str) -> None:
        """A read was tried again, or a write sent again (``reason``: why)."""
        if self._on is not None:
            attributes = {"db.system": self.db_system, "operation": operation, "reason": reason}
            self._on.retries.add(1, attributes)

    def watch_queue(self, queue: _Queue) -> None:
        """Report ``queue.pending`` as the write queue's depth while ``queue`` lives."""
        if self._on is not None:
            self._on.queues[queue] = self._attributes

    def slice_lag(self, projection: str, index: int) -> SliceLag:
        """The lag of a projection worker's slice, reported while the returned object lives
        (the worker holds it)."""
        lag = SliceLag()
        if self._on is not None:
            self._on.slices[lag] = {"projection": projection, "slice": index}
        return lag


class Instrumented:
    """The ``metrics`` property of :class:`~casty_sa.SAJournal` (its ``_metrics``)."""

    _metrics: Metrics

    @property
    def metrics(self) -> Metrics:
        """The journal's hooks, for casty-sa's own layers (projections)."""
        return self._metrics


class _Stream(Protocol):
    """What :class:`SliceLag` reads of a worker's event stream."""

    caught_up: bool


class SliceLag:
    """How far behind one projection slice is (``casty_sa.projection.lag``).

    The worker calls :meth:`holding` with each batch it took and :meth:`applied` once the
    batch committed. While it holds events, the lag is the age of the oldest (it grows
    while a failing event is retried); while its live stream (:meth:`following`) waits for
    commits, 0; otherwise, the age the last batch's oldest event had when applied.

    Examples
    --------
    >>> lag = SliceLag()
    >>> lag.lag is None
    True
    """

    __slots__ = ("__weakref__", "_applied", "_oldest", "_stream")

    def __init__(self) -> None:
        self._oldest: float | None = None  # timestamp of the oldest event held
        self._applied: float | None = None
        self._stream: _Stream | None = None

    def following(self, stream: _Stream | None) -> None:
        """The stream the worker reads (``None``: none now)."""
        self._stream = stream

    def holding(self, timestamp: float) -> None:
        """The worker took a batch whose oldest event has ``timestamp``."""
        self._oldest = timestamp

    def applied(self) -> None:
        """The batch held committed."""
        if self._oldest is not None:
            self._applied = max(0.0, time.time() - self._oldest)
            self._oldest = None

    @property
    def lag(self) -> float | None:
        """Seconds behind (``None``: nothing applied or held yet)."""
        if self._oldest is not None:
            return max(0.0, time.time() - self._oldest)
        if self._stream is not None and self._stream.caught_up:
            return 0.0  # (an old last batch, e.g. of a rebuild, is not a lag once caught up)
        return self._applied


#: Hooks that record nothing and warn of nothing (layers used without a journal).
NO_METRICS = Metrics("none", slow_call_threshold=None, record=False)
