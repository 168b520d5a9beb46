"""How many connections an engine's pool has checked out: the suite's leak check.

Every connection an engine hands out from the moment :func:`watch` is called (before the
engine's first connection) is kept, weakly, and counted while it is neither returned nor
detached. The pool's own count will not do: a ``StaticPool`` (the one connection of a
memory SQLite database) keeps none, and reports one checkin for two callers it handed its
connection to at once; and ``close()`` disposes of an engine casty-sa made, which swaps in
a fresh pool that knows nothing of the connections the old one handed out.
"""

from __future__ import annotations

import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

_handed_out: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()


def watch(engine: AsyncEngine) -> None:
    """Note what ``engine``'s pool hands out from now on (its pools after a dispose too)."""
    sync_engine = engine.sync_engine
    if sync_engine in _handed_out:
        return
    handed_out = _handed_out[sync_engine] = weakref.WeakSet()

    def checkout(_dbapi_connection: Any, _record: Any, proxy: Any) -> None:
        handed_out.add(proxy)

    event.listen(sync_engine, "checkout", checkout)


def checked_out(engine: AsyncEngine) -> int:
    """Connections ``engine`` handed out since :func:`watch` and has not had back."""
    if engine.sync_engine not in _handed_out:
        raise AssertionError(f"{engine!r}: watch() was not called before its first connection")
    # returned: no DBAPI connection left; detached: no longer the pool's
    handed_out = _handed_out[engine.sync_engine]
    return sum(1 for c in handed_out if c.dbapi_connection is not None and not c.is_detached)
