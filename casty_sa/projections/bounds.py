"""How long a projection's transaction may go quiet, and wait for a lock: a lease at most.

A process frozen (stopped, paused, cut off behind a half-open connection) between a
statement on its slice's row and its ``COMMIT`` holds the row's lock: without a bound no
other worker could ever take the slice over (its ``acquire`` waits on the lock), and on
PostgreSQL the open transaction would hold back the horizon of every live reader. A
transaction that went quiet that long had lost its lease anyway.

- PostgreSQL: ``idle_in_transaction_session_timeout`` and ``lock_timeout``, ``SET LOCAL``
  (this transaction's own);
- MariaDB: ``idle_transaction_timeout`` and ``innodb_lock_wait_timeout``; MySQL 8: the
  latter only (it has no idle-transaction bound: a frozen worker's row stays locked until
  its connection ends, ``wait_timeout``, and meanwhile the other workers' attempts fail
  after a lease and are retried). Neither has a transaction's own setting, so the
  session's are read once per connection and put back when the connection returns to
  its pool: the application's other work on it keeps its own bounds.

Seconds are whole on MySQL (a lease of 1.5 s waits 2 s).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import event, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import Pool

__all__ = ["end_if_frozen"]

_log = logging.getLogger("casty_sa.projections")

#: In a pooled connection's ``info``: the ``SET SESSION`` that restores its own bounds, and
#: whether a projection changed them since it was checked out.
_RESTORE = "casty_sa_restore_bounds"
_CHANGED = "casty_sa_bounds_changed"


async def end_if_frozen(session: AsyncSession, lease_ms: int) -> None:
    """Bound the session's transaction by ``lease_ms``: idle at most that long (where the
    server can), and no lock waited for longer (see the module docstring)."""
    dialect = session.get_bind().dialect
    if dialect.name == "postgresql":
        idle = func.set_config("idle_in_transaction_session_timeout", f"{lease_ms}ms", True)
        # and a row some other session keeps locked fails the statement after a lease
        # (a retried failure) instead of holding the worker, its renewals and stop()
        locked = func.set_config("lock_timeout", f"{lease_ms}ms", True)
        await session.execute(select(idle, locked))
    elif dialect.name in ("mysql", "mariadb"):
        await _bound_mysql(session, max(1, -(-lease_ms // 1000)))


async def _bound_mysql(session: AsyncSession, seconds: int) -> None:
    connection = await session.connection()  # the dialect knows MariaDB once connected
    names = ["innodb_lock_wait_timeout"]
    if getattr(connection.dialect, "is_mariadb", False):
        names.append("idle_transaction_timeout")
    info = (await connection.get_raw_connection()).info
    if _RESTORE not in info:
        current = await session.execute(text(f"SELECT @@SESSION.{', @@SESSION.'.join(names)}"))
        values = current.one()
        info[_RESTORE] = "SET SESSION " + ", ".join(
            f"{name} = {int(value)}" for name, value in zip(names, values, strict=True)
        )
        _restore_on_checkin(connection.sync_engine.pool)
    info[_CHANGED] = True
    await session.execute(text("SET SESSION " + ", ".join(f"{name} = {seconds}" for name in names)))


def _restore_on_checkin(pool: Pool) -> None:
    if not event.contains(pool, "checkin", _restore):
        event.listen(pool, "checkin", _restore)


def _restore(dbapi_connection: Any, record: Any) -> None:
    """Put a connection's own bounds back as it returns to its pool (SQLAlchemy runs this
    where the async driver can be awaited); one that cannot be restored is discarded."""
    if dbapi_connection is None or not record.info.pop(_CHANGED, False):
        return
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(record.info[_RESTORE])
        finally:
            cursor.close()
    except Exception as exc:  # noqa: BLE001 (whatever failed: the connection goes)
        _log.debug("could not restore a connection's lock and idle bounds: %r", exc)
        record.invalidate(exc)
