"""``casty-sa prune``: events a snapshot covers (or older than a date) deleted in bounded
batches, counted first by ``--dry-run``, held back for projections that have not handled
them, resumable after ``SIGKILL``, safe beside writers.

Every test runs on each default setup (a SQLite file, PostgreSQL through asyncpg and
psycopg, MariaDB), on a journal filled through ``SAJournal``; the rows left are read
straight from the table. Projections are real :class:`casty_sa.Projection` objects, and
the interrupted prune is a real ``casty-sa`` process killed with ``SIGKILL`` while a
batch's transaction is open.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from casty import PersistedEvent, Snapshot
from sqlalchemy import URL, make_url

import casty_sa
import casty_sa.prune
from casty_sa import EventEnvelope, Projection, SAJournal, retention
from casty_sa.cli import ExitCode, main
from casty_sa.cli.prune import ProgressLine
from casty_sa.prune import Progress, Rule, projection_holds, prune
from casty_sa.retention import Cut

from support.dbtools import execute, plain, query
from support.offsets import install
from support.processes import PRUNE_RUNNER

pytestmark = pytest.mark.shared_database

#: Seconds any one test may take.
BOUND = 120.0
#: The first event's time; event ``n`` is ``T0 + 10 * n``.
T0 = 1_700_000_000.0
#: Events per entity, and the sequence number each entity's snapshot is at (``None``: none).
PER_ENTITY = 12
SNAPSHOTS: dict[str, int | None] = {
    "a-0": 8,
    "a-1": 12,
    "a-2": None,
    "a-3": 3,
    "a-4": 8,
    "a-5": None,
}


async def fill(
    url: URL,
    snapshots: Mapping[str, int | None] = SNAPSHOTS,
    per_entity: int = PER_ENTITY,
    first: int = 1,
) -> None:
    """``per_entity`` events for each entity (from ``first``), and its snapshot."""
    async with SAJournal(url) as journal:
        for entity, at in snapshots.items():
            events = [PersistedEvent(n, n, T0 + 10 * n) for n in range(first, first + per_entity)]
            await journal.persist(entity, events)
            if at is not None:
                await journal.save_snapshot(entity, Snapshot(at, f"state-{at}", T0 + 10 * at))


async def stored(url: URL) -> dict[str, list[int]]:
    """Each entity's stored sequence numbers, read from the table."""
    rows = await query(url, "SELECT entity_id, sequence_nr FROM casty_sa_events")
    found: dict[str, list[int]] = {}
    for entity, seq in sorted(rows):
        found.setdefault(entity, []).append(seq)
    return found


def remaining(upto: dict[str, int], per_entity: int = PER_ENTITY) -> dict[str, list[int]]:
    """What is left when each entity's events up to ``upto[entity]`` are gone."""
    left = {entity: list(range(upto.get(entity, 0) + 1, per_entity + 1)) for entity in SNAPSHOTS}
    return {entity: seqs for entity, seqs in left.items() if seqs}


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    """``casty-sa prune … --json`` in this process: exit code, the summary, stderr."""
    code = main(["prune", *argv, "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == ExitCode.OK else {}, captured.err


COVERED = {entity: at for entity, at in SNAPSHOTS.items() if at is not None}


class TestSnapshotRule:
    def test_dry_run_counts_what_the_run_deletes_in_batches(
        self, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        asyncio.run(fill(db_url))
        url = plain(db_url)
        code, dry, err = cli(capsys, "--url", url, "--all", "--snapshot", "--dry-run")
        assert code == ExitCode.OK, err
        assert asyncio.run(stored(db_url)) == remaining({}), "a dry run deleted something"
        expected = sum(COVERED.values())
        assert (dry["events"], dry["pruned"], dry["no_snapshot"]) == (expected, 4, 2)
        assert dry["entities"] == len(SNAPSHOTS) and dry["batches"] == 0

        code, done, err = cli(capsys, "--url", url, "--all", "--snapshot", "--batch-size", "5")
        assert code == ExitCode.OK, err
        assert done["events"] == dry["events"] and done["pruned"] == dry["pruned"]
        # batches of 5 rows, across entities: one transaction each
        assert done["batches"] == math.ceil(sum(COVERED.values()) / 5)
        assert asyncio.run(stored(db_url)) == remaining(COVERED)

        # nothing left to do: a second run deletes nothing; recovery is intact
        code, again, err = cli(capsys, "--url", url, "--all", "--snapshot")
        assert (code, again["events"], again["batches"]) == (ExitCode.OK, 0, 0), err
        assert asyncio.run(recovered(db_url, "a-1")) == (12, "state-12", [], 12)
        assert asyncio.run(recovered(db_url, "a-0")) == (8, "state-8", [9, 10, 11, 12], 12)

    def test_one_entity_and_the_text_summary(
        self, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        asyncio.run(fill(db_url))
        code = main(["prune", "--url", plain(db_url), "--entity", "a-4", "--snapshot"])
        out, err = capsys.readouterr()
        assert code == ExitCode.OK, err
        assert out.splitlines()[0] == (
            "deleted 8 events of 1 entity in 1 batch (1 entity looked at)"
        )
        assert asyncio.run(stored(db_url)) == remaining({"a-4": 8})

    async def test_batches_and_max_rows_bound_each_run(
        self,
        db_url: URL,
        make_journal: Callable[..., SAJournal],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        async with asyncio.timeout(BOUND):
            await fill(db_url)
            journal = make_journal(db_url)
            sizes = spy_on_deletes(monkeypatch)
            counted = await prune(journal, Rule(), batch_size=3, max_rows=7, dry_run=True)
            assert (counted.events, counted.capped, sizes) == (7, True, [])
            report = await prune(journal, Rule(), batch_size=3, max_rows=7)
            assert (report.events, report.capped) == (7, True)
            assert sum(sizes) == 7 and max(sizes) <= 3
            # each run goes on where the last stopped: the same rows in the end
            total = report.events
            while report.capped:
                report = await prune(journal, Rule(), batch_size=3, max_rows=7)
                assert report.events <= 7
                total += report.events
            assert total == sum(COVERED.values()) and max(sizes) <= 3
            assert await stored(db_url) == remaining(COVERED)

    @pytest.mark.only_backends("sqlite")
    async def test_an_entity_whose_snapshot_went_away_meanwhile_is_refused_alone(
        self,
        db_url: URL,
        make_journal: Callable[..., SAJournal],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        async with asyncio.timeout(BOUND):
            await fill(db_url)
            journal = make_journal(db_url)
            calls: list[list[tuple[str, int]]] = []

            async def forgetting_first(engine: Any, cuts: Any, **options: Any) -> list[Cut]:
                if not calls:  # between the plans and the batch, a-3 loses its snapshot
                    await execute(db_url, "DELETE FROM casty_sa_snapshots WHERE entity_id = 'a-3'")
                calls.append(list(cuts))
                return await retention.delete_up_to(engine, cuts, **options)

            monkeypatch.setattr(casty_sa.prune, "delete_up_to", forgetting_first)
            report = await prune(journal, Rule())
            # the batch held every entity's cut: refused whole, then each alone
            assert len(calls[0]) == len(COVERED) and len(calls) == 1 + len(COVERED)
            assert (report.refused, report.pruned) == (1, 3)
            assert report.events == sum(COVERED.values()) - COVERED["a-3"]
            kept = {entity: at for entity, at in COVERED.items() if entity != "a-3"}
            assert await stored(db_url) == remaining(kept)


class TestBeforeRule:
    def test_old_events_the_snapshot_covers_and_with_force_beyond_it(
        self, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        asyncio.run(fill(db_url))
        url = plain(db_url)
        date = datetime.fromtimestamp(T0 + 10 * 5 + 5, UTC).isoformat()  # 1…5 are older
        code, dry, err = cli(capsys, "--url", url, "--all", "--before", date, "--dry-run")
        assert code == ExitCode.OK, err
        old = {entity: min(at, 5) for entity, at in COVERED.items()}
        assert dry["events"] == sum(old.values())
        code, forced, err = cli(
            capsys, "--url", url, "--all", "--before", date, "--force", "--dry-run"
        )
        assert forced["events"] == 5 * len(SNAPSHOTS) and forced["no_snapshot"] == 0

        code, done, err = cli(capsys, "--url", url, "--all", "--before", date)
        assert (code, done["events"]) == (ExitCode.OK, dry["events"]), err
        assert asyncio.run(stored(db_url)) == remaining(old)
        code, done, err = cli(capsys, "--url", url, "--all", "--before", date, "--force")
        assert (code, done["events"]) == (ExitCode.OK, forced["events"] - dry["events"]), err
        assert asyncio.run(stored(db_url)) == remaining(dict.fromkeys(SNAPSHOTS, 5))

    def test_force_alone_is_a_usage_error(
        self, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code = main(["prune", "--url", plain(db_url), "--all", "--snapshot", "--force"])
        assert code == ExitCode.USAGE
        assert "--force goes with --before" in capsys.readouterr().err


class TestProjectionsHoldBack:
    async def test_unhandled_events_stay_and_the_projection_is_named(
        self, db_url: URL, make_journal: Callable[..., SAJournal]
    ) -> None:
        async with asyncio.timeout(BOUND):
            await fill(db_url, dict.fromkeys(SNAPSHOTS, PER_ENTITY))
            journal = make_journal(db_url)
            balances = Projection("balances", journal, ignore, slices=2)
            assert await balances.catch_up() == PER_ENTITY * len(SNAPSHOTS)
            # a projection whose filter matches nothing has handled nothing: it holds all
            idle = Projection("idle", journal, ignore, entity_prefix="zzz-")
            assert await idle.catch_up() == 0
            # three more events each, covered by a snapshot, not handled by balances
            await fill(db_url, dict.fromkeys(SNAPSHOTS, PER_ENTITY + 3), 3, PER_ENTITY + 1)

            holds = await projection_holds(db_url)
            report = await prune(journal, Rule(), holds=holds, dry_run=True)
            assert report.events == 0
            assert report.held["idle"].events == (PER_ENTITY + 3) * len(SNAPSHOTS)
            assert report.held["idle"].slices == {(0, 1, None)}
            assert report.held["balances"].events == 3 * len(SNAPSHOTS)

            holds = await projection_holds(db_url, ignore=["idle"])
            report = await prune(journal, Rule(), holds=holds)
            assert report.events == PER_ENTITY * len(SNAPSHOTS)
            assert set(report.held) == {"balances"}
            assert report.held["balances"].entities == len(SNAPSHOTS)
            left = await stored(db_url)
            assert left == {entity: [13, 14, 15] for entity in SNAPSHOTS}

            assert await balances.catch_up() == 3 * len(SNAPSHOTS)
            holds = await projection_holds(db_url, ignore=["idle"])
            report = await prune(journal, Rule(), holds=holds)
            assert report.events == 3 * len(SNAPSHOTS) and not report.held
            assert await stored(db_url) == {}

    def test_the_cli_names_the_slice_that_holds_events_back(
        self, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        asyncio.run(fill(db_url))
        asyncio.run(start_projection(db_url, "search"))
        code = main(["prune", "--url", plain(db_url), "--all", "--snapshot", "--dry-run"])
        out, err = capsys.readouterr()
        assert code == ExitCode.OK, err
        assert out.splitlines()[0].startswith("would delete 0 events of 0 entities")
        assert f"'search': {sum(COVERED.values())} events of 4 entities" in out
        assert "slice 0/1 has handled nothing" in out
        code, summary, err = cli(
            capsys, "--url", plain(db_url), "--all", "--snapshot", "--ignore-projections"
        )
        assert (code, summary["events"], summary["held"]) == (
            ExitCode.OK,
            sum(COVERED.values()),
            {},
        ), err

    @pytest.mark.only_backends("sqlite")
    def test_a_read_model_in_another_database(
        self, db_url: URL, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        asyncio.run(fill(db_url))
        readmodel = make_url(f"sqlite+aiosqlite:///{tmp_path / 'readmodel.db'}")
        asyncio.run(casty_sa.upgrade(readmodel))
        asyncio.run(install(readmodel, ("remote", 1)))
        argv = ["--url", plain(db_url), "--all", "--snapshot", "--dry-run"]
        code, here, err = cli(capsys, *argv)
        assert (code, here["events"], here["held"]) == (ExitCode.OK, sum(COVERED.values()), {})
        code, there, err = cli(capsys, *argv, "--offsets-url", plain(readmodel))
        assert (code, there["events"]) == (ExitCode.OK, 0), err
        assert there["held"]["remote"]["events"] == sum(COVERED.values())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("date", ["9" * 400 + "d", "2024-13-01", "yesterday"])
def test_a_date_that_is_no_time_is_a_usage_error(
    date: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--before`` with what is not a time (or more days ago than a float holds) is the
    usage error that names it, never a traceback; nothing is opened."""
    url = f"sqlite:///{tmp_path / 'none.db'}"
    assert main(["prune", "--url", url, "--all", "--before", date]) == ExitCode.USAGE
    assert "is not a date" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


def test_the_progress_bar_shows_the_share_done() -> None:
    stream = io.StringIO()
    bar = ProgressLine(stream, "prune", bar=True, every=0.0)
    bar(Progress(entities=2, events=50, total=200))
    bar.close()
    drawn = stream.getvalue()
    assert drawn.startswith("\rprune [" + "#" * 2) and " 25% 50/200 events " in drawn
    assert drawn.endswith("\n") and bar.last == Progress(2, 50, 200)


@pytest.mark.only_drivers("aiosqlite", "asyncpg", "asyncmy")
class TestInterrupted:
    def test_killed_mid_batch_and_run_again_deletes_exactly_the_right_rows(
        self, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        entities = {f"p-{n}": 25 for n in range(4)}
        asyncio.run(fill(db_url, entities, 30))
        argv = ["prune", "--url", plain(db_url), "--all", "--snapshot", "--batch-size", "7"]
        # batches of 7 rows: p-0's 1-7, 8-14, 15-21, then 22-25 with p-1's 1-3, whose
        # second DELETE (the 5th in all, p-1's) has run when the process is killed
        killed = subprocess.run(
            [sys.executable, str(PRUNE_RUNNER), "--kill-in-delete", "5", "--", *argv],
            capture_output=True,
            timeout=BOUND,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
        # three batches committed, nothing of the fourth
        left = asyncio.run(stored(db_url))
        assert left["p-0"] == list(range(22, 31))
        assert all(left[f"p-{n}"] == list(range(1, 31)) for n in (1, 2, 3))

        code, again, err = cli(capsys, *argv[1:])
        assert (code, again["events"]) == (ExitCode.OK, 25 * 4 - 21), err
        assert asyncio.run(stored(db_url)) == {e: list(range(26, 31)) for e in entities}


class TestConcurrentWriters:
    async def test_pruning_beside_writers_keeps_every_event_it_should(
        self, db_url: URL, make_journal: Callable[..., SAJournal]
    ) -> None:
        async with asyncio.timeout(BOUND):
            writer, pruner = make_journal(db_url), make_journal(db_url)
            entities = [f"w-{n}" for n in range(6)]
            done, pruned = asyncio.Event(), asyncio.Event()

            async def write(entity: str) -> None:
                for seq in range(1, 41, 2):
                    events = [PersistedEvent(n, n, T0 + n) for n in (seq, seq + 1)]
                    await writer.persist(entity, events)
                    if (seq + 1) % 10 == 0 and seq + 1 < 40:
                        await writer.save_snapshot(entity, Snapshot(seq + 1, seq + 1, T0))
                    if seq + 1 == 20:  # the rest is written while the pruner deletes
                        await pruned.wait()

            async def keep_pruning() -> int:
                deleted = 0
                while not done.is_set():
                    deleted += (await prune(pruner, Rule(), batch_size=3)).events
                    await check_covered(db_url)
                    if deleted:
                        pruned.set()
                return deleted

            pruning = asyncio.create_task(keep_pruning())
            await asyncio.gather(*(write(entity) for entity in entities))
            done.set()
            deleted = await pruning
            deleted += (await prune(pruner, Rule(), batch_size=3)).events
            assert deleted == 30 * len(entities)
            assert await stored(db_url) == {e: list(range(31, 41)) for e in entities}
            for entity in entities:
                assert await recovered(db_url, entity) == (30, 30, list(range(31, 41)), 40)


# -- helpers -----------------------------------------------------------------------------------


async def ignore(session: Any, envelope: EventEnvelope) -> None:
    """A projection handler with no read model."""


async def start_projection(url: URL, name: str) -> None:
    """A projection whose rows exist and that has handled nothing (its filter matches none)."""
    async with SAJournal(url) as journal:
        assert await Projection(name, journal, ignore, entity_prefix="none-").catch_up() == 0


async def recovered(url: URL, entity: str) -> tuple[int, Any, list[int], int]:
    """What recovery reads of ``entity``: snapshot number and state, the events after it,
    and the highest sequence number the journal reports."""
    async with SAJournal(url) as journal:
        snapshot = await journal.load_snapshot(entity)
        assert snapshot is not None
        events = await journal.load(entity, snapshot.sequence_nr + 1)
        highest = await journal.highest_sequence_nr(entity)
        return snapshot.sequence_nr, snapshot.state, [e.sequence_nr for e in events], highest


async def check_covered(url: URL) -> None:
    """No entity ever lost an event its snapshot does not cover: its tombstone (the highest
    number deleted) is at or below its snapshot, read in one statement."""
    rows = await query(
        url,
        "SELECT t.entity_id, t.sequence_nr, s.sequence_nr FROM casty_sa_tombstones t "
        "LEFT JOIN casty_sa_snapshots s ON s.entity_id = t.entity_id",
    )
    for entity, deleted, snapshot in rows:
        assert snapshot is not None and deleted <= snapshot, (entity, deleted, snapshot)


def spy_on_deletes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows each of prune's deleting transactions deleted, in order."""
    sizes: list[int] = []

    async def delete_up_to(*args: Any, **options: Any) -> list[Cut]:
        cuts = await retention.delete_up_to(*args, **options)
        sizes.append(sum(cut.deleted for cut in cuts))
        return cuts

    monkeypatch.setattr(casty_sa.prune, "delete_up_to", delete_up_to)
    return sizes
