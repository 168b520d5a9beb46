"""A projection process for the process-level projection tests (not a test module).

It opens an :class:`~casty_sa.SAJournal` on ``URL`` and runs
:class:`casty_sa.Projection` ``NAME`` with :func:`handler`, which folds every event
into a one-row-per-entity table and leaves evidence of each application:

``rm_balances``
    One row per entity: how many events were applied, the sum of their sequence
    numbers and the last one (the fold a test compares with the journal).
``rm_applied``
    One row per application: the event's offset, entity, sequence number and the
    lease it was applied under (slice, fence, owner) plus a ``batch`` id, one per
    transaction. An event applied twice has two rows; a committed batch is the set of
    rows with its ``batch`` id.
``rm_fences``
    The fence guard: one row per slice with the highest fence a batch was applied
    under. The first event of a batch raises it with ``UPDATE … WHERE fence <= :fence``;
    when that finds no row (a batch under an older fence than one already applied for
    the slice) a row goes to ``rm_violations``, in the batch's own transaction: it is
    there after the test only if the stale batch committed.
``rm_violations``
    Broken rules seen inside committed batches: a stale fence, an entity's events out
    of order or repeated (``sequence_nr`` not one more than the last applied).

The events are those of ``crash_writer.py``; only their sequence numbers matter here.
The tables are made by :func:`create_read_model` (the test, before any node starts).

Modes (``--mode``): ``run`` (until SIGTERM, which stops the projection gracefully and
exits 0; prints ``running`` first and ``stopped`` last), ``catch-up`` (prints
``caught-up N``), ``reset`` (resets the projection, clearing ``rm_balances`` and
``rm_applied`` in the same transaction; prints ``reset``). Any error: its text on
stderr, exit status 3.

``--kill-after-sql PREFIX`` makes the process SIGKILL itself right after the first SQL
statement starting with PREFIX ran (inside its transaction); ``--stop-after-sql PREFIX``
SIGSTOPs it there instead; ``--stop-after-commits N`` makes it SIGSTOP itself after its
N-th committed batch, at a moment when none of its connections is in a transaction
(still holding its lease, but no lock).

Usage::

    python tests/support/projection_node.py URL [--name balances] [--slices 1]
        [--max-slices N] [--lease 1.0] [--batch-size 50] [--mode run|catch-up|reset]
        [--kill-after-sql PREFIX] [--stop-after-sql PREFIX] [--stop-after-commits N]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import uuid
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

import casty_sa
from casty_sa import EventEnvelope, SAJournal

metadata = MetaData()
balances = Table(
    "rm_balances",
    metadata,
    Column("entity_id", String(255), primary_key=True),
    Column("events", Integer, nullable=False),
    Column("seq_sum", BigInteger, nullable=False),
    Column("last_seq", Integer, nullable=False),
)
applied = Table(
    "rm_applied",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_offset", String(36), nullable=False),
    Column("entity_id", String(255), nullable=False),
    Column("sequence_nr", Integer, nullable=False),
    Column("slice", Integer, nullable=False),
    Column("fence", BigInteger, nullable=False),
    Column("owner", String(255), nullable=False),
    Column("batch", String(32), nullable=False),
)
fences = Table(
    "rm_fences",
    metadata,
    # not AUTO_INCREMENT on MySQL, where inserting slice 0 would store the next number
    Column("slice", Integer, primary_key=True, autoincrement=False),
    Column("fence", BigInteger, nullable=False),
)
violations = Table(
    "rm_violations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("slice", Integer, nullable=False),
    Column("fence", BigInteger, nullable=False),
    Column("detail", String(500), nullable=False),
)

#: ``session.info`` key of the batch (transaction) the handler is in: ``(transaction, id)``
_BATCH = "projection_node.batch"


async def create_read_model(engine: AsyncEngine, slices: int) -> None:
    """Make the read model's tables and one fence-guard row per slice (fence 0)."""
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
        await conn.execute(insert(fences), [{"slice": i, "fence": 0} for i in range(slices)])


async def clear(session: AsyncSession) -> None:
    """Empty the read model (what a reset clears in its own transaction); the fence
    guard and the violations stay, so a stale batch after the reset is still caught."""
    await session.execute(delete(applied))
    await session.execute(delete(balances))


async def handler(session: AsyncSession, envelope: EventEnvelope) -> None:
    """Fold ``envelope`` into ``rm_balances`` and record its application (module doc)."""
    lease = session.info["casty_sa.lease"]
    batch = await _batch(session, lease)
    row = (
        await session.execute(
            select(balances.c.events, balances.c.last_seq).where(
                balances.c.entity_id == envelope.entity_id
            )
        )
    ).first()
    last = 0 if row is None else row.last_seq
    if envelope.sequence_nr != last + 1:
        detail = f"{envelope.entity_id}: sequence number {envelope.sequence_nr} after {last}"
        await _violation(session, lease, detail)
    if row is None:
        await session.execute(
            insert(balances).values(
                entity_id=envelope.entity_id,
                events=1,
                seq_sum=envelope.sequence_nr,
                last_seq=envelope.sequence_nr,
            )
        )
    else:
        await session.execute(
            update(balances)
            .where(balances.c.entity_id == envelope.entity_id)
            .values(
                events=balances.c.events + 1,
                seq_sum=balances.c.seq_sum + envelope.sequence_nr,
                last_seq=envelope.sequence_nr,
            )
        )
    await session.execute(
        insert(applied).values(
            event_offset=envelope.offset,
            entity_id=envelope.entity_id,
            sequence_nr=envelope.sequence_nr,
            slice=lease.slice,
            fence=lease.fence,
            owner=lease.owner,
            batch=batch,
        )
    )


async def _batch(session: AsyncSession, lease: Any) -> str:
    """The id of the batch the session's transaction is; its first event checks the fence."""
    transaction = session.sync_session.get_transaction()
    known = session.info.get(_BATCH)
    if known is not None and known[0] is transaction:
        return str(known[1])
    batch = uuid.uuid4().hex
    session.info[_BATCH] = (transaction, batch)
    raised = await session.execute(
        update(fences)
        .where(fences.c.slice == lease.slice, fences.c.fence <= lease.fence)
        .values(fence=lease.fence)
    )
    if raised.rowcount != 1:  # type: ignore[attr-defined]
        await _violation(session, lease, f"batch under fence {lease.fence} after a higher one")
    return batch


async def _violation(session: AsyncSession, lease: Any, detail: str) -> None:
    await session.execute(
        insert(violations).values(slice=lease.slice, fence=lease.fence, detail=detail[:500])
    )


class NodeSession(Session):
    """The node's sessions (a class of its own, to count their commits)."""


def stop_after_commits(journal: SAJournal, count: int) -> None:
    """SIGSTOP this process once its ``count``-th batch committed and none of its
    connections is inside a transaction (it holds its lease and no lock): a connection
    counts from its transaction's begin until it is back in the pool."""
    done = 0
    busy: set[int] = set()
    engine = journal.engine.sync_engine
    loop = asyncio.get_running_loop()

    def stop_if_idle() -> None:
        nonlocal done
        if done >= count and not busy:
            done = -(2**62)  # once
            os.kill(os.getpid(), signal.SIGSTOP)

    @event.listens_for(engine, "begin")
    def _began(connection: Any) -> None:
        busy.add(id(connection.connection.dbapi_connection))

    @event.listens_for(engine, "checkin")
    def _returned(dbapi_connection: Any, _record: Any) -> None:
        busy.discard(id(dbapi_connection))
        loop.call_soon_threadsafe(stop_if_idle)

    @event.listens_for(NodeSession, "after_commit")
    def _committed(session: Session) -> None:
        nonlocal done
        if session.info.pop(_BATCH, None) is not None:
            done += 1


def signal_after_sql(journal: SAJournal, prefix: str, signum: int) -> None:
    """Send this process ``signum`` (once) right after a statement starting with
    ``prefix`` ran, inside that statement's transaction."""
    sent = False

    @event.listens_for(journal.engine.sync_engine, "after_cursor_execute")
    def _signal(*args: Any) -> None:
        nonlocal sent
        if not sent and str(args[2]).lstrip().startswith(prefix):
            sent = True
            os.kill(os.getpid(), signum)


async def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    journal = SAJournal(args.url)
    if args.kill_after_sql:
        signal_after_sql(journal, args.kill_after_sql, signal.SIGKILL)
    if args.stop_after_sql:
        signal_after_sql(journal, args.stop_after_sql, signal.SIGSTOP)
    if args.stop_after_commits:
        stop_after_commits(journal, args.stop_after_commits)
    sessions = async_sessionmaker(journal.engine, sync_session_class=NodeSession)
    projection = casty_sa.Projection(
        args.name,
        journal,
        handler,
        sessions=sessions,
        batch_size=args.batch_size,
        slices=args.slices,
        max_slices=args.max_slices,
        lease_seconds=args.lease,
        retry_delay=0.05,
        max_retry_delay=0.5,
    )
    try:
        if args.mode == "catch-up":
            print(f"caught-up {await projection.catch_up()}", flush=True)
        elif args.mode == "reset":
            await projection.reset(clear)
            print("reset", flush=True)
        else:
            loop = asyncio.get_running_loop()
            stopping: list[asyncio.Task[None]] = []
            loop.add_signal_handler(
                signal.SIGTERM, lambda: stopping.append(loop.create_task(projection.stop()))
            )
            print(f"running {os.getpid()}", flush=True)
            await projection.run()
            for task in stopping:
                await task
            print("stopped", flush=True)
    except Exception as exc:  # noqa: BLE001 - any failure goes to the test via stderr and status
        print(f"ERROR {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 3
    finally:
        await journal.close()
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--name", default="balances")
    parser.add_argument("--slices", type=int, default=1)
    parser.add_argument("--max-slices", type=int, default=None)
    parser.add_argument("--lease", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--mode", choices=["run", "catch-up", "reset"], default="run")
    parser.add_argument("--kill-after-sql", default="", metavar="PREFIX")
    parser.add_argument("--stop-after-sql", default="", metavar="PREFIX")
    parser.add_argument("--stop-after-commits", type=int, default=0, metavar="N")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
