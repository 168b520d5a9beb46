"""A journal writer process for the crash and contention tests (not a test module).

It recovers every entity from the journal, then persists batches from many concurrent
workers (group commit on by default) and appends each *acknowledged* call to a log file,
flushed and fsynced after the ``await`` returned::

    E <entity> <first sequence nr> <size>     a persist call returned
    S <entity> <sequence nr>                  a save_snapshot call returned

Every event says which batch it belongs to, ``(entity, first, size, index)``, so a reader
can tell a partial batch from a whole one. Snapshot states are ``("state", entity, seq)``.
The test kills this process with SIGKILL at random points, or lets it stop after
``--batches`` calls per worker (exit status 0; any journal error: status 3).

``--kill-after-sql PREFIX`` makes the process SIGKILL itself right after the first SQL
statement that starts with PREFIX has run, to crash at an exact point (inside a migration,
say) instead of a random one; ``--pause-after-sql PREFIX`` instead prints ``paused`` and
holds still there for ``--pause`` seconds, so another process can act at that moment.

Usage::

    python tests/support/crash_writer.py URL LOG [--entities 40] [--workers 16] [--prefix e]
        [--batches 0] [--no-group-commit] [--migrate] [--kill-after-sql PREFIX]
        [--pause-after-sql PREFIX] [--pause 1.5] [--seed 1] [--pace 0]

``--pace SECONDS`` makes each worker wait that long after each batch (a steady load
instead of the most the database takes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import time
from typing import Any

from casty import PersistedEvent, Snapshot
from sqlalchemy import event

from casty_sa import SAJournal

SNAPSHOT_EVERY = 7


class AckLog:
    """Append-only, fsynced log of acknowledged calls."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, line: str) -> None:
        os.write(self._fd, line.encode() + b"\n")
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def read_acks(path: str) -> tuple[dict[str, set[tuple[int, int]]], dict[str, int]]:
    """Acknowledged batches ``{entity: {(first, size)}}`` and highest acknowledged snapshots.

    A torn last line (the process died inside ``os.write``) is ignored: its call was not
    acknowledged yet.
    """
    batches: dict[str, set[tuple[int, int]]] = {}
    snapshots: dict[str, int] = {}
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if not line.endswith("\n"):
                break
            kind, entity_id, *numbers = line.split()
            if kind == "E":
                batches.setdefault(entity_id, set()).add((int(numbers[0]), int(numbers[1])))
            else:
                snapshots[entity_id] = max(snapshots.get(entity_id, 0), int(numbers[0]))
    return batches, snapshots


async def verify(journal: SAJournal, log_path: str, entities: list[str]) -> dict[str, int]:
    """Check the journal against the acknowledgement log; return the next sequence numbers.

    Raises ``AssertionError`` when an acknowledged batch or snapshot is missing, when a
    batch is stored partially, or when an entity's sequence numbers are not ``1..n``.
    """
    acked, acked_snapshots = read_acks(log_path)
    unknown = set(acked) - set(entities)
    if unknown:
        raise AssertionError(f"the log names entities the test does not know: {unknown}")
    next_seq: dict[str, int] = {}
    for entity_id in entities:
        events = await journal.load(entity_id)
        stored: set[tuple[int, int]] = set()
        i = 0
        while i < len(events):
            owner, first, size, index = events[i].event
            members = events[i : i + size]
            expected = [(entity_id, first, size, k) for k in range(size)]
            if owner != entity_id or index != 0 or [e.event for e in members] != expected:
                raise AssertionError(f"{entity_id}: partial batch at sequence number {first}")
            if [e.sequence_nr for e in members] != list(range(first, first + size)):
                raise AssertionError(f"{entity_id}: batch {first} has wrong sequence numbers")
            stored.add((first, size))
            i += size
        seqs = [e.sequence_nr for e in events]
        if seqs != list(range(1, len(seqs) + 1)):
            raise AssertionError(f"{entity_id}: sequence numbers are not 1..n: {seqs[:30]}")
        missing = acked.get(entity_id, set()) - stored
        if missing:
            raise AssertionError(f"{entity_id}: acknowledged batches lost: {sorted(missing)}")
        snapshot = await journal.load_snapshot(entity_id)
        if entity_id in acked_snapshots and (
            snapshot is None or snapshot.sequence_nr < acked_snapshots[entity_id]
        ):
            raise AssertionError(
                f"{entity_id}: acknowledged snapshot {acked_snapshots[entity_id]} lost "
                f"(found {snapshot})"
            )
        if snapshot is not None and (
            snapshot.state != ("state", entity_id, snapshot.sequence_nr)
            or snapshot.sequence_nr > len(seqs)
        ):
            raise AssertionError(f"{entity_id}: snapshot does not match its events: {snapshot}")
        next_seq[entity_id] = len(seqs) + 1
    return next_seq


def make_batch(entity_id: str, first: int, size: int) -> list[PersistedEvent[Any]]:
    now = time.time()
    return [PersistedEvent(first + i, (entity_id, first, size, i), now) for i in range(size)]


async def recover(journal: SAJournal, entity_id: str) -> int:
    """The next sequence number of ``entity_id``, checking its stored history is gap-free."""
    events = await journal.load(entity_id)
    seqs = [e.sequence_nr for e in events]
    if seqs != list(range(1, len(seqs) + 1)):
        raise RuntimeError(f"{entity_id}: stored sequence numbers are not 1..n: {seqs[:20]}")
    return len(seqs) + 1


async def worker(
    journal: SAJournal,
    log: AckLog,
    entities: list[str],
    next_seq: dict[str, int],
    rng: random.Random,
    batches: int,
    pace: float = 0.0,
) -> None:
    done = 0
    while batches == 0 or done < batches:
        entity_id = rng.choice(entities)
        first = next_seq[entity_id]
        size = rng.randint(1, 5)
        await journal.persist(entity_id, make_batch(entity_id, first, size))
        log.write(f"E {entity_id} {first} {size}")
        next_seq[entity_id] = first + size
        last = first + size - 1
        if rng.randrange(SNAPSHOT_EVERY) == 0:
            await journal.save_snapshot(
                entity_id, Snapshot(last, ("state", entity_id, last), time.time())
            )
            log.write(f"S {entity_id} {last}")
        done += 1
        if pace:
            await asyncio.sleep(pace)


def stop_after(journal: SAJournal, prefix: str, *, kill: bool, pause: float) -> None:
    """Right after a statement starting with ``prefix`` ran: SIGKILL, or pause once."""
    paused = False

    @event.listens_for(journal.engine.sync_engine, "after_cursor_execute")
    def _stop(*args: Any) -> None:
        nonlocal paused
        statement: str = args[2]
        if not statement.lstrip().startswith(prefix):
            return
        if kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if not paused:
            paused = True
            print("paused", flush=True)
            time.sleep(pause)  # blocks the whole process, as a slow disk or a stop would


async def main(args: argparse.Namespace) -> int:
    journal = SAJournal(
        args.url, group_commit=args.group_commit, migrate=True if args.migrate else None
    )
    if args.kill_after_sql:
        stop_after(journal, args.kill_after_sql, kill=True, pause=0)
    if args.pause_after_sql:
        stop_after(journal, args.pause_after_sql, kill=False, pause=args.pause)
    log = AckLog(args.log)
    entities = [f"{args.prefix}{i}" for i in range(args.entities)]
    try:
        await journal.start()
        next_seq = {e: await recover(journal, e) for e in entities}
        print("recovered", flush=True)
        workers = max(1, min(args.workers, len(entities)))
        # each worker owns its entities, like casty's one-actor-per-entity
        owned = [entities[w::workers] for w in range(workers)]
        rng = random.Random(args.seed)
        await asyncio.gather(
            *(
                worker(
                    journal,
                    log,
                    mine,
                    next_seq,
                    random.Random(rng.random()),
                    args.batches,
                    args.pace,
                )
                for mine in owned
            )
        )
    except Exception as exc:  # noqa: BLE001 - any failure goes to the test via stderr and status
        print(f"ERROR {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 3
    finally:
        await journal.close()
        log.close()
    print("done", flush=True)
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("log")
    parser.add_argument("--entities", type=int, default=40)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--prefix", default="e")
    parser.add_argument("--batches", type=int, default=0, help="per worker; 0: until killed")
    parser.add_argument("--no-group-commit", dest="group_commit", action="store_false")
    parser.add_argument("--migrate", action="store_true", help="migrate on start (server DBs)")
    parser.add_argument("--kill-after-sql", default="", metavar="PREFIX")
    parser.add_argument("--pause-after-sql", default="", metavar="PREFIX")
    parser.add_argument("--pause", type=float, default=1.5)
    parser.add_argument("--seed", type=float, default=1.0)
    parser.add_argument("--pace", type=float, default=0.0, help="seconds between batches")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
