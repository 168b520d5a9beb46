"""Process crash: SIGKILL a writer at random points; nothing acknowledged is ever lost.

``tests/support/crash_writer.py`` persists batches from many concurrent workers (group commit on)
and logs every acknowledged call, fsynced. This test kills it with SIGKILL at random
moments, ``CASTY_SA_CRASH_KILLS`` times per backend (5 by default, a quick CI size; set
it to 100 for a soak). After each kill a fresh journal on the same database must hold
every acknowledged batch and snapshot, no partial batch, and sequence numbers ``1..n``
per entity, and must keep writing from there: the test appends a batch itself, and the
next writer process recovers and carries on.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from casty import PersistedEvent
from sqlalchemy import URL

import casty_sa
from casty_sa import SAJournal, SequenceConflict

from support import crash_writer as writer
from support import processes

KILLS = int(os.environ.get("CASTY_SA_CRASH_KILLS", "5"))
ENTITIES = 40


def start_writer(url: str, log: Path, seed: float, *extra: str) -> subprocess.Popen[bytes]:
    extra = ("--entities", str(ENTITIES), "--seed", str(seed), *extra)
    return processes.start_writer(url, log, *extra)


def ack_count(log: Path) -> int:
    return log.read_bytes().count(b"\n") if log.exists() else 0


def append_ack(log: Path, line: str) -> None:
    with open(log, "a", encoding="utf-8") as acks:
        acks.write(line + "\n")


async def wait_for_acks(proc: subprocess.Popen[bytes], log: Path, above: int) -> None:
    """Wait until the writer has acknowledged something new (it is mid-run)."""
    deadline = time.monotonic() + 30
    while ack_count(log) <= above:
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the writer exited early ({proc.returncode}): {err.decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the writer acknowledged nothing within 30 s")
        await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_sigkill_never_loses_an_acknowledged_event(
    db_url: URL, tmp_path: Path, make_journal: Callable[..., SAJournal]
) -> None:
    url = db_url.render_as_string(hide_password=False)
    log = tmp_path / "acks.log"
    entities = [f"e{i}" for i in range(ENTITIES)]
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    print(f"crash test seed {seed}")  # shown on failure, to replay a run

    for kill in range(KILLS):
        before = ack_count(log)
        proc = start_writer(url, log, rng.random())
        await wait_for_acks(proc, log, before)
        await asyncio.sleep(rng.uniform(0.0, 0.4))  # a random point mid-run
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"kill {kill}: the writer ended on its own"
        assert ack_count(log) > before

        journal = make_journal(db_url)
        next_seq = await writer.verify(journal, str(log), entities)
        # a fresh journal writes on from the recovered sequence numbers ...
        entity_id = entities[kill % ENTITIES]
        first = next_seq[entity_id]
        await journal.persist(entity_id, writer.make_batch(entity_id, first, 2))
        append_ack(log, f"E {entity_id} {first} 2")
        # ... and the stored ones are taken
        with pytest.raises(SequenceConflict):
            await journal.persist(entity_id, [PersistedEvent(first + 1, "dup", 1.0)])
        await journal.close()

    # a last writer recovers from what the kills left and finishes on its own
    before = ack_count(log)
    proc = start_writer(url, log, rng.random(), "--batches", "10")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert ack_count(log) > before
    journal = make_journal(db_url)
    await writer.verify(journal, str(log), entities)
    acked: dict[str, Any] = writer.read_acks(str(log))[0]
    assert sum(len(b) for b in acked.values()) >= KILLS


@pytest.mark.parametrize(
    "statement", ["CREATE TABLE casty_sa_events", "CREATE TABLE casty_sa_snapshots"]
)
async def test_sigkill_during_the_first_migration_leaves_a_startable_database(
    empty_db_url: URL,
    tmp_path: Path,
    make_journal: Callable[..., SAJournal],
    statement: str,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    """The first writer on a fresh database dies half-way through creating the tables."""
    url = empty_db_url.render_as_string(hide_password=False)
    log = tmp_path / "acks.log"
    proc = start_writer(url, log, 1.0, "--migrate", "--kill-after-sql", statement)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert ack_count(log) == 0

    journal = make_journal(empty_db_url, migrate=True)
    await journal.persist("after-crash", writer.make_batch("after-crash", 1, 3))
    assert len(await journal.load("after-crash")) == 3
    assert await casty_sa.current(empty_db_url) == casty_sa.head_revision()
    # and a writer process recovers and carries on
    proc = start_writer(url, log, 2.0, "--batches", "5")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    await writer.verify(journal, str(log), [f"e{i}" for i in range(ENTITIES)])
