"""How many connections an engine's pool has checked out: the suite's leak check.

A ``QueuePool`` counts them itself. A ``StaticPool`` (the one connection of a memory SQLite
database) keeps no count, and its checkin event is not a count either: it hands its one
connection to two callers at once and reports one checkin for the pair. So for it, every
connection handed out from the moment :func:`watch` is called (before the engine's first
connection) is kept, weakly, and counted while it is neither returned nor detached.
"""

from __future__ import annotations

import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

_handed_out: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()


def watch(engine: AsyncEngine) -> None:
    """Note what ``engine``'s pool hands out from now on, when it keeps no count itself."""
    sync_engine = engine.sync_engine
    if hasattr(sync_engine.pool, "checkedout") or sync_engine in _handed_out:
        return
    handed_out = _handed_out[sync_engine] = weakref.WeakSet()

    def checkout(_dbapi_connection: Any, _record: Any, proxy: Any) -> None:
        handed_out.add(proxy)

    event.listen(sync_engine, "checkout", checkout)


def checked_out(engine: AsyncEngine) -> int:
    """Connections of ``engine``'s pool checked out now."""
    pool: Any = engine.sync_engine.pool
    if hasattr(pool, "checkedout"):
        return int(pool.checkedout())
    if engine.sync_engine not in _handed_out:
        raise AssertionError(f"{engine!r}: its pool keeps no count and watch() was not called")
    # returned: no DBAPI connection left; detached: no longer the pool's
    handed_out = _handed_out[engine.sync_engine]
    return sum(1 for c in handed_out if c.dbapi_connection is not None and not c.is_detached)
