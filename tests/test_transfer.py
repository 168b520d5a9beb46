"""``casty-sa import`` / ``export``: casty's own SqliteJournal files in and out of casty-sa.

Source files are written by casty's real ``SqliteJournal``, exported files are read back with
it, and targets are real SQLite files and the suite's PostgreSQL (both backends through the
``db_url`` fixtures). Interruptions are real too: an exception thrown mid-copy, and a
``casty-sa import`` process killed with SIGINT and SIGKILL.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import json
import math
import pickle
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from casty import PersistedEvent, Snapshot, SqliteJournal
from sqlalchemy import URL, event, text

from casty_sa import SAJournal, SchemaError
from casty_sa.cli import ExitCode, main
from casty_sa.engine import open_engine
from casty_sa.errors import InvalidEventError
from casty_sa.transfer import (
    CastyFile,
    EntityStats,
    JournalDatabase,
    JournalStats,
    Progress,
    TransferReport,
    copy_journal,
    export_casty_file,
    import_casty_file,
)

from support.dbtools import plain

TIMEOUT = 60
UNICODE_ID = "ação-ü 口座"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``casty-sa argv`` in-process; return the exit code, stdout and stderr."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@dataclass
class Journal:
    """What a journal holds, loaded through casty's protocol."""

    events: dict[str, list[PersistedEvent[Any]]]
    snapshots: dict[str, Snapshot[Any] | None]

    @property
    def event_count(self) -> int:
        return sum(len(events) for events in self.events.values())


async def load_all(journal: Any, entities: list[str]) -> Journal:
    """Load every entity's events and snapshot through the ``EventJournal`` protocol."""
    return Journal(
        {entity: await journal.load(entity) for entity in entities},
        {entity: await journal.load_snapshot(entity) for entity in entities},
    )


def load_casty_file(path: Path, entities: list[str]) -> Journal:
    journal = SqliteJournal(path)
    try:
        return asyncio.run(load_all(journal, entities))
    finally:
        journal.close()


def load_database(url: URL | str, entities: list[str]) -> Journal:
    async def load() -> Journal:
        async with SAJournal(url) as journal:
            return await load_all(journal, entities)

    return asyncio.run(load())


def write_casty_file(path: Path, events: dict[str, list[Any]], snapshots: dict[str, int]) -> None:
    """A journal file written by casty's own SqliteJournal."""
    journal = SqliteJournal(path)

    async def write() -> None:
        start = time.time()
        for entity, payloads in events.items():
            batch = [
                PersistedEvent(i, payload, start + i * 1e-6)
                for i, payload in enumerate(payloads, start=1)
            ]
            for chunk in range(0, len(batch), 50):  # several persist calls, as casty makes them
                await journal.persist(entity, batch[chunk : chunk + 50])
        for entity, seq in snapshots.items():
            await journal.save_snapshot(entity, Snapshot(seq, {"state-of": entity}, start + seq))

    try:
        asyncio.run(write())
    finally:
        journal.close()


SOURCE_EVENTS: dict[str, list[Any]] = {
    "acct-1": [{"deposit": i} for i in range(1, 121)],
    UNICODE_ID: [("opened", 1), ("renamed", "ü"), None],
    "it's 100%_": [decimal.Decimal("1.10"), datetime.datetime(2026, 1, 1, 12, 0)],
    "big": [b"\x00\xff" * (512 * 1024)],  # 1 MiB payload
}
SOURCE_SNAPSHOTS = {"acct-1": 100, UNICODE_ID: 2, "snapshot-only": 7}
ENTITIES = [*SOURCE_EVENTS, "snapshot-only"]
SOURCE_EVENT_COUNT = sum(len(events) for events in SOURCE_EVENTS.values())


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A casty SqliteJournal file with several entities, odd ids, a big payload, snapshots."""
    path = tmp_path / "casty-journal.db"
    write_casty_file(path, SOURCE_EVENTS, SOURCE_SNAPSHOTS)
    return path


def raw_file_rows(path: Path) -> set[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return set(conn.execute("SELECT entity_id, sequence_nr, timestamp, event_data FROM events"))


def raw_database_rows(url: URL | str) -> set[tuple[Any, ...]]:
    async def read() -> set[tuple[Any, ...]]:
        engine, _ = open_engine(url)
        try:
            async with engine.connect() as conn:
                result = await conn.execute(
                    text("SELECT entity_id, sequence_nr, timestamp, payload FROM casty_sa_events")
                )
                return {(e, s, t, bytes(p)) for e, s, t, p in result}
        finally:
            await engine.dispose()

    return asyncio.run(read())


def event_count(url: URL | str) -> int:
    async def count() -> int:
        engine, _ = open_engine(url)
        try:
            async with engine.connect() as conn:
                query = text("SELECT count(*) FROM casty_sa_events")
                return int((await conn.execute(query)).scalar_one())
        finally:
            await engine.dispose()

    return asyncio.run(count())


@dataclass(frozen=True)
class Side:
    """What one side of a copy holds of entity ``X``: events at positions, and a snapshot.

    Two sides with the same ``tag`` hold the same history (byte for byte) where they overlap.
    """

    events: range = range(0)
    snapshot: int | None = None
    tag: str = "history"

    def rows(self) -> tuple[list[PersistedEvent[Any]], Snapshot[Any] | None]:
        events = [PersistedEvent(n, f"{self.tag}-{n}", float(n)) for n in self.events]
        if self.snapshot is None:
            return events, None
        return events, Snapshot(self.snapshot, f"{self.tag}-state", float(self.snapshot))

    async def write(self, journal: Any) -> None:
        """Write the rows through casty's protocol, then close a casty file's journal."""
        events, snapshot = self.rows()
        try:
            if events:
                await journal.persist("X", events)
            if snapshot is not None:
                await journal.save_snapshot("X", snapshot)
        finally:
            if isinstance(journal, SqliteJournal):
                journal.close()

    async def write_to(self, url: URL) -> None:
        async with SAJournal(url) as journal:
            await self.write(journal)


def _lay_out(source_side: Side, target_side: Side, tmp_path: Path, target: URL) -> Path:
    """A casty file holding ``source_side`` and a target database holding ``target_side``."""
    source = tmp_path / "node-a.db"
    asyncio.run(source_side.write(SqliteJournal(source)))
    asyncio.run(target_side.write_to(target))
    return source


# -- import ------------------------------------------------------------------------------------


class TestImport:
    def test_copies_every_event_and_snapshot_identically(
        self, source: Path, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        url = plain(db_url)
        code, out, err = run(
            capsys, "-v", "import", "--from", str(source), "--url", url, "--batch-size", "7"
        )
        assert code == ExitCode.OK, err
        assert f"{SOURCE_EVENT_COUNT} copied, 0 already there" in out
        assert "3 copied, 0 already there" in out and "verified" in out
        assert "DEBUG casty_sa.transfer: events: read 7 in" in err  # batch sizes and timings

        expected = load_casty_file(source, ENTITIES)
        assert load_database(db_url, ENTITIES) == expected
        assert expected.event_count == SOURCE_EVENT_COUNT
        assert raw_database_rows(db_url) == raw_file_rows(source)  # the very bytes

        code, out, _ = run(capsys, "import", "--from", str(source), "--url", url, "--json")
        report = json.loads(out)
        assert code == ExitCode.OK
        assert (report["events_copied"], report["snapshots_copied"]) == (0, 0)
        assert (report["events_present"], report["snapshots_present"]) == (SOURCE_EVENT_COUNT, 3)
        assert (report["entities"], report["verified"]) == (len(ENTITIES), True)
        assert load_database(db_url, ENTITIES) == expected

    def test_into_a_new_database(
        self,
        source: Path,
        empty_db_url: URL,
        backend: str,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        url = plain(empty_db_url)
        if backend != "sqlite":  # a server database is never migrated implicitly
            code, _, err = run(capsys, "import", "--from", str(source), "--url", url)
            assert code == ExitCode.DATABASE_ERROR and "casty-sa upgrade" in err
            # the command line's words, not the library's
            assert "pass --migrate to casty-sa import" in err and "migrate=True" not in err
            code, _, err = run(capsys, "export", "--url", url, "--to", str(source) + ".out")
            assert code == ExitCode.DATABASE_ERROR and "casty-sa upgrade" in err
            assert "migrate" not in err.replace("casty-sa upgrade", "")
            argv = ["import", "--from", str(source), "--url", url, "--migrate"]
        else:  # a new SQLite file is created and migrated, as SAJournal does
            argv = ["import", "--from", str(source), "--url", url]
        assert run(capsys, *argv)[0] == ExitCode.OK
        assert load_database(empty_db_url, ENTITIES) == load_casty_file(source, ENTITIES)

    def test_writes_in_batches(self, source: Path, tmp_path: Path) -> None:
        engine, _ = open_engine(f"sqlite:///{tmp_path / 'journal.db'}")
        inserts: list[str] = []

        @event.listens_for(engine.sync_engine, "before_cursor_execute")
        def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if statement.startswith("INSERT INTO casty_sa_events"):
                inserts.append(statement)

        async def copy() -> TransferReport:
            try:
                return await import_casty_file(source, engine, batch_size=50)
            finally:
                await engine.dispose()

        report = asyncio.run(copy())
        assert report.events_copied == SOURCE_EVENT_COUNT and report.verified
        assert len(inserts) == -(-SOURCE_EVENT_COUNT // 50)  # one statement per batch

    def test_keeps_the_newer_snapshot(
        self, source: Path, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        # the same history imported earlier, with an older snapshot of UNICODE_ID then; the
        # application ran on and saved a newer snapshot of acct-1 (the target holds its events)
        earlier = source.with_name("earlier.db")
        earlier.write_bytes(source.read_bytes())
        with sqlite3.connect(earlier) as conn:
            conn.execute("UPDATE snapshots SET sequence_nr = 1 WHERE entity_id = ?", (UNICODE_ID,))
        url = plain(db_url)
        assert run(capsys, "import", "--from", str(earlier), "--url", url)[0] == ExitCode.OK

        async def prepare() -> None:
            async with SAJournal(db_url) as journal:
                await journal.save_snapshot("acct-1", Snapshot(110, "target's newer", 5.0))

        asyncio.run(prepare())
        code, out, _ = run(capsys, "import", "--from", str(source), "--url", url, "--json")
        report = json.loads(out)
        assert code == ExitCode.OK and report["verified"]
        assert (report["snapshots_copied"], report["snapshots_present"]) == (1, 2)
        assert report["snapshots_newer"] == 1
        found = load_database(db_url, ENTITIES).snapshots
        assert found["acct-1"] == Snapshot(110, "target's newer", 5.0)
        assert found[UNICODE_ID] == load_casty_file(source, ENTITIES).snapshots[UNICODE_ID]

    def test_interrupted_import_resumes(
        self, source: Path, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        class Interrupted(Exception):
            pass

        calls: list[Progress] = []

        def stop_after_three_batches(progress: Progress) -> None:
            calls.append(progress)
            if len(calls) == 3:
                raise Interrupted

        with pytest.raises(Interrupted):
            asyncio.run(
                import_casty_file(
                    source, db_url, batch_size=10, on_progress=stop_after_three_batches
                )
            )
        assert event_count(db_url) == 30  # whole batches, nothing more
        assert [p.events_done for p in calls] == [10, 20, 30]

        code, out, _ = run(
            capsys, "import", "--from", str(source), "--url", plain(db_url), "--json"
        )
        report = json.loads(out)
        assert code == ExitCode.OK and report["verified"]
        assert report["events_copied"] == SOURCE_EVENT_COUNT - 30
        assert report["events_present"] == 30
        assert load_database(db_url, ENTITIES) == load_casty_file(source, ENTITIES)

    @pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
    def test_killed_import_resumes(
        self, sig: signal.Signals, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        source = tmp_path / "casty.db"
        write_casty_file(source, {f"e{n:02}": list(range(100)) for n in range(20)}, {"e00": 50})
        target = tmp_path / "journal.db"
        url = f"sqlite:///{target}"
        command = ["import", "--from", str(source), "--url", url, "--batch-size", "1"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "casty_sa.cli", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + TIMEOUT
            while _rows_in(target) == 0:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the import never started writing"
                time.sleep(0.01)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if sig == signal.SIGINT:
            assert proc.returncode == ExitCode.INTERRUPTED
            assert "interrupted (run the same command again to copy the rest)" in err
        else:
            assert proc.returncode == -signal.SIGKILL
        copied = _rows_in(target)
        assert 0 < copied < 2000

        code, out, _ = run(capsys, "import", "--from", str(source), "--url", url, "--json")
        report = json.loads(out)
        assert code == ExitCode.OK and report["verified"]
        assert (report["events_copied"], report["events_present"]) == (2000 - copied, copied)
        assert report["snapshots_copied"] == 1
        entities = [f"e{n:02}" for n in range(20)]
        assert load_database(url, entities) == load_casty_file(source, entities)

    def test_a_target_losing_rows_fails_verification(
        self, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        url = f"sqlite:///{tmp_path / 'journal.db'}"
        assert run(capsys, "upgrade", "--url", url)[0] == ExitCode.OK
        with sqlite3.connect(tmp_path / "journal.db") as conn:  # a target that drops writes
            conn.execute(
                "CREATE TRIGGER lose AFTER INSERT ON casty_sa_events WHEN NEW.entity_id = 'big' "
                "BEGIN DELETE FROM casty_sa_events WHERE entity_id = 'big'; END"
            )
        code, out, _ = run(capsys, "import", "--from", str(source), "--url", url)
        assert code == ExitCode.NOT_VERIFIED
        assert "NOT VERIFIED: 1 entities differ" in out
        assert "'big': events: first differs at sequence number 1: source has event 1" in out
        assert out.rstrip().endswith("target none")

    def test_a_source_changing_during_the_copy_is_reported(
        self, source: Path, tmp_path: Path
    ) -> None:
        url = f"sqlite:///{tmp_path / 'journal.db'}"

        wrote: list[bool] = []

        def app_still_writing(progress: Progress) -> None:
            if progress.events_done > 120 and not wrote:  # acct-1, first in key order, is done
                wrote.append(True)
                with sqlite3.connect(source) as live:  # as casty's SqliteJournal writes a row
                    live.execute(
                        "INSERT INTO events (entity_id, sequence_nr, event_data, timestamp) "
                        "VALUES ('acct-1', 121, ?, 9.0)",
                        (pickle.dumps("late"),),
                    )

        report = asyncio.run(
            import_casty_file(source, url, batch_size=10, on_progress=app_still_writing)
        )
        assert report.source_changed and not report.verified
        assert [(m.entity_id, m.sequence_nr, m.found) for m in report.mismatches] == [
            ("acct-1", 121, "none")
        ]
        again = asyncio.run(import_casty_file(source, url))
        assert again.verified and again.events_copied == 1 and not again.source_changed


def _rows_in(path: Path) -> int:
    """Events in a SQLite target, read like any later process would (recovering the WAL)."""
    try:  # mode=rw: never create the file; read-only connections cannot recover a killed WAL
        with sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM casty_sa_events").fetchone()[0])
    except sqlite3.OperationalError:  # not created or not migrated yet
        return 0


#: Big-ish events: 40 of 10,000 bytes (10,021 as the byte caps count a row), in two entities.
BIG_EVENTS: dict[str, list[Any]] = {
    entity: [bytes([i]) * 10_000 for i in range(20)] for entity in ("big-1", "big-2")
}
#: A cap that three such rows fit under and four do not: 14 batches for 40 events.
BATCH_BYTES = 35_000


def event_batches(progress: list[Progress]) -> list[int]:
    """The events each batch carried, from the progress reported after every batch."""
    done = [p.events_done for p in progress if p.snapshots_done == 0]
    return [b - a for a, b in zip([0, *done], done, strict=False) if b > a]


class TestBatchBytes:
    """Batches are capped by bytes as well as rows, so large events never add up to a
    statement PostgreSQL refuses (1 GiB per message) or a batch that fills memory."""

    def test_import_batches_by_bytes(self, db_url: URL, tmp_path: Path) -> None:
        source = tmp_path / "big.db"
        write_casty_file(source, BIG_EVENTS, {"big-1": 20})
        engine, _ = open_engine(db_url)
        inserts: list[str] = []

        @event.listens_for(engine.sync_engine, "before_cursor_execute")
        def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if statement.startswith("INSERT INTO casty_sa_events"):
                inserts.append(statement)

        progress: list[Progress] = []

        async def copy() -> TransferReport:
            try:
                return await import_casty_file(
                    source, engine, batch_bytes=BATCH_BYTES, on_progress=progress.append
                )
            finally:
                await engine.dispose()

        report = asyncio.run(asyncio.wait_for(copy(), TIMEOUT))
        assert report.events_copied == 40 and report.verified
        assert event_batches(progress) == [3] * 13 + [1]  # 1,000 rows a batch allowed
        assert len(inserts) == 14  # one statement per batch, each under the cap
        assert load_database(db_url, list(BIG_EVENTS)) == load_casty_file(source, list(BIG_EVENTS))

    def test_export_batches_by_bytes(self, db_url: URL, tmp_path: Path) -> None:
        async def fill() -> None:
            async with SAJournal(db_url) as journal:
                for entity, payloads in BIG_EVENTS.items():
                    events = [PersistedEvent(i, p, 1.5 * i) for i, p in enumerate(payloads, 1)]
                    await journal.persist(entity, events)

        asyncio.run(fill())
        progress: list[Progress] = []
        exported = tmp_path / "exported.db"
        report = asyncio.run(
            asyncio.wait_for(
                export_casty_file(
                    db_url, exported, batch_bytes=BATCH_BYTES, on_progress=progress.append
                ),
                TIMEOUT,
            )
        )
        assert report.events_copied == 40 and report.verified
        assert event_batches(progress) == [3] * 13 + [1]
        assert load_casty_file(exported, list(BIG_EVENTS)) == load_database(
            db_url, list(BIG_EVENTS)
        )

    def test_a_row_larger_than_the_cap_goes_alone(self, db_url: URL, tmp_path: Path) -> None:
        source = tmp_path / "big.db"
        write_casty_file(source, BIG_EVENTS, {})
        progress: list[Progress] = []
        report = asyncio.run(
            asyncio.wait_for(
                import_casty_file(source, db_url, batch_bytes=1, on_progress=progress.append),
                TIMEOUT,
            )
        )
        assert report.events_copied == 40 and report.verified
        assert event_batches(progress) == [1] * 40


class TestBadFiles:
    def test_import_refuses_what_is_not_a_casty_journal(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        target = tmp_path / "journal.db"
        url = f"sqlite:///{target}"
        not_sqlite = tmp_path / "notes.txt"
        not_sqlite.write_text("hello " * 1000)
        other_app = tmp_path / "other.db"
        with sqlite3.connect(other_app) as conn:
            conn.execute("CREATE TABLE events (id INTEGER, body TEXT)")
        for path, message in (
            (tmp_path / "missing.db", "no such file"),
            (not_sqlite, "not a casty SqliteJournal file"),
            (other_app, "not a casty SqliteJournal file"),
        ):
            code, _, err = run(capsys, "import", "--from", str(path), "--url", url)
            assert code == ExitCode.BAD_FILE, err
            assert message in err
            assert not target.exists()  # the target is not even created
        assert not (tmp_path / "missing.db").exists()

    def test_import_refuses_ids_casty_sa_cannot_store(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        source = tmp_path / "casty.db"
        write_casty_file(source, {"fine": [1, 2], "x" * 600: [1]}, {})
        url = f"sqlite:///{tmp_path / 'journal.db'}"
        code, _, err = run(capsys, "import", "--from", str(source), "--url", url)
        assert code == ExitCode.BAD_FILE and "nothing was copied" in err
        assert _rows_in(tmp_path / "journal.db") == 0

    def test_import_refuses_an_entity_id_that_is_not_utf8(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        source = tmp_path / "casty.db"
        write_casty_file(source, {"fine": [1, 2]}, {})
        with sqlite3.connect(source) as conn:  # TEXT bytes no str holds (a UTF-8 surrogate)
            conn.execute(
                "INSERT INTO events VALUES (CAST(? AS TEXT), 1, ?, 1.0)",
                (b"acct-\xed\xa0\x80", pickle.dumps("x")),
            )
        target = tmp_path / "journal.db"
        code, _, err = run(capsys, "import", "--from", str(source), "--url", f"sqlite:///{target}")
        assert code == ExitCode.BAD_FILE and "UTF-8" in err, err
        assert _rows_in(target) == 0

    def test_copy_refuses_an_id_the_journal_refuses_for_its_text(self, tmp_path: Path) -> None:
        """The journal's own rule (casty_sa.codec), reasons beyond length and NUL included."""
        source = tmp_path / "casty.db"
        write_casty_file(source, {"fine": [1, 2]}, {})
        target = tmp_path / "journal.db"

        class SurrogateIds(CastyFile):  # no file hands one over: sqlite3 refuses to decode it
            async def stats(self) -> JournalStats:
                held = await super().stats()
                return JournalStats({**held.events, "acct-\ud800": EntityStats(1, 1, 1)}, {})

        async def copy() -> None:
            async with (
                SurrogateIds.open(source) as origin,
                JournalDatabase.open(f"sqlite:///{target}") as sink,
            ):
                await copy_journal(origin, sink)

        with pytest.raises(InvalidEventError) as refused:
            asyncio.run(asyncio.wait_for(copy(), TIMEOUT))
        message = str(refused.value)
        assert message.startswith("the source holds entity id 'acct-\\ud800'")
        assert "not valid Unicode text" in message and message.endswith("nothing was copied")
        assert _rows_in(target) == 0

    def test_export_refuses_to_write_into_another_file(
        self, db_url: URL, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        other = tmp_path / "app.db"
        with sqlite3.connect(other) as conn:
            conn.execute("CREATE TABLE invoices (id INTEGER)")
        before = other.read_bytes()
        code, _, err = run(capsys, "export", "--url", plain(db_url), "--to", str(other))
        assert code == ExitCode.BAD_FILE and "invoices" in err
        assert other.read_bytes() == before


# -- export ------------------------------------------------------------------------------------


class TestExport:
    def test_round_trip_loads_identically_in_casty(
        self, source: Path, db_url: URL, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        url = plain(db_url)
        assert run(capsys, "import", "--from", str(source), "--url", url)[0] == ExitCode.OK

        async def more() -> None:  # the database moves on after the import
            async with SAJournal(db_url) as journal:
                await journal.persist("acct-1", [PersistedEvent(121, "after", 3.25)])
                await journal.persist("new", [PersistedEvent(1, {"k": "v"}, 4.5)])
                await journal.save_snapshot("new", Snapshot(1, "s", 4.5))

        asyncio.run(more())
        entities = [*ENTITIES, "new"]
        exported = tmp_path / "exported.db"
        code, out, err = run(
            capsys, "export", "--url", url, "--to", str(exported), "--batch-size", "9", "--json"
        )
        report = json.loads(out)
        assert code == ExitCode.OK, err
        assert (report["events_copied"], report["snapshots_copied"]) == (SOURCE_EVENT_COUNT + 2, 4)
        in_database = load_database(db_url, entities)
        assert load_casty_file(exported, entities) == in_database  # read by casty's own journal
        assert raw_file_rows(exported) == raw_database_rows(db_url)

        code, out, _ = run(capsys, "export", "--url", url, "--to", str(exported), "--json")
        assert code == ExitCode.OK and json.loads(out)["events_copied"] == 0

        back = f"sqlite:///{tmp_path / 'back.db'}"
        assert run(capsys, "import", "--from", str(exported), "--url", back)[0] == ExitCode.OK
        assert load_database(back, entities) == in_database

    @pytest.mark.only_backends("sqlite", "postgresql")
    def test_a_negative_zero_timestamp_is_written_as_zero_and_said_so(
        self, db_url: URL, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """casty's file format (a REAL column) cannot hold the sign of zero: the export says
        so, compares every other bit, and a rerun is the same history, not another one.
        (MySQL's DOUBLE cannot hold it either: the journal refuses -0.0 there.)"""

        async def write() -> None:
            async with SAJournal(db_url) as journal:
                await journal.persist("acct", [PersistedEvent(1, "opened", -0.0)])
                await journal.persist("acct", [PersistedEvent(2, "paid", 0.0)])
                await journal.save_snapshot("acct", Snapshot(2, "state", -0.0))

        asyncio.run(write())
        url, exported = plain(db_url), tmp_path / "exported.db"
        for run_number in (1, 2):
            code, out, _ = run(capsys, "export", "--url", url, "--to", str(exported))
            assert code == ExitCode.OK, out
            assert "verified   content compared" in out and "REFUSED" not in out
            assert (
                "note       2 timestamps -0.0 written as 0.0: casty's file format cannot hold "
                "the sign of zero" in out
            ), out
            assert ("1 copied" in out) == (run_number == 1)
        with sqlite3.connect(exported) as conn:
            stamps = conn.execute(
                "SELECT timestamp FROM events UNION ALL SELECT timestamp FROM snapshots"
            )
            assert [math.copysign(1.0, t) for (t,) in stamps] == [1.0, 1.0, 1.0]
        code, out, _ = run(capsys, "export", "--url", url, "--to", str(exported), "--json")
        report = json.loads(out)
        assert (code, report["verified"], report["zero_signs_lost"]) == (ExitCode.OK, True, 2)

        # a timestamp that differs in any other bit is still another history
        with sqlite3.connect(exported) as conn:
            conn.execute("UPDATE events SET timestamp = 5e-324 WHERE sequence_nr = 1")
            conn.execute("UPDATE snapshots SET timestamp = -5e-324")
        code, out, _ = run(capsys, "export", "--url", url, "--to", str(exported))
        assert code == ExitCode.NOT_VERIFIED and "timestamp differs" in out
        assert "another history for 1 entities" in out  # one entity, however many rows differ

    def test_export_needs_an_existing_database(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, _, err = run(
            capsys, "export", "--url", f"sqlite:///{tmp_path / 'typo.db'}", "--to", "x.db"
        )
        assert code == ExitCode.DATABASE_ERROR and "no such SQLite file" in err
        assert not (tmp_path / "typo.db").exists()


class TestProgress:
    def test_progress_bar_on_request_only(
        self, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        url = f"sqlite:///{tmp_path / 'journal.db'}"
        code, out, err = run(capsys, "import", "--from", str(source), "--url", url, "--progress")
        assert code == ExitCode.OK
        assert "\rimport [" in err and "100%" in err
        assert f"{SOURCE_EVENT_COUNT:,}/{SOURCE_EVENT_COUNT:,} events, 3/3 snapshots" in err
        assert "\r" not in out
        code, _, err = run(capsys, "import", "--from", str(source), "--url", url)
        assert code == ExitCode.OK and "\r" not in err  # stderr is not a terminal here


class TestForkedHistories:
    """A target holding other content under the source's keys is never called verified."""

    def test_two_local_node_files_are_never_mixed(
        self, db_url: URL, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        node_a, node_b = tmp_path / "node-a.db", tmp_path / "node-b.db"
        write_casty_file(node_a, {"acct-1": ["opened", "deposit 10", "deposit 5"]}, {})
        # node b ran the same entity with another history: the same first event, then others
        write_casty_file(node_b, {"acct-1": ["opened", "withdraw 7"], "other": [1]}, {})
        with sqlite3.connect(node_a) as conn:
            row = conn.execute(
                "SELECT event_data, timestamp FROM events WHERE sequence_nr = 1"
            ).fetchone()
        with sqlite3.connect(node_b) as conn:  # the same first event, byte for byte
            conn.execute(
                "UPDATE events SET event_data = ?, timestamp = ? "
                "WHERE entity_id = 'acct-1' AND sequence_nr = 1",
                row,
            )
        url = plain(db_url)
        assert run(capsys, "import", "--from", str(node_a), "--url", url)[0] == ExitCode.OK
        before = raw_database_rows(db_url)

        code, out, err = run(capsys, "import", "--from", str(node_b), "--url", url)
        assert code == ExitCode.NOT_VERIFIED, err
        assert "verified" not in out.replace("NOT VERIFIED", "")
        assert "REFUSED" in out and "nothing was written" in out
        assert "'acct-1': events: first differs at sequence number 2" in out
        assert "'other'" not in out  # only the entity that differs is named
        assert raw_database_rows(db_url) == before  # not even 'other' was copied

        code, out, _ = run(capsys, "import", "--from", str(node_b), "--url", url, "--json")
        report = json.loads(out)
        assert code == ExitCode.NOT_VERIFIED
        assert (report["refused"], report["verified"], report["fork_count"]) == (True, False, 1)
        assert [(f["entity_id"], f["sequence_nr"]) for f in report["forks"]] == [("acct-1", 2)]

        code, out, _ = run(capsys, "import", "--from", str(node_a), "--url", url)
        assert code == ExitCode.OK and "verified   content compared" in out
        assert raw_database_rows(db_url) == before

    @pytest.mark.parametrize(
        ("source_side", "target_side", "why"),
        [
            pytest.param(  # the review's case: no key in common, so nothing was compared
                Side(snapshot=7),
                Side(events=range(1, 10), tag="other"),
                "target events 1..9, 7 of them at or below 7 not in the source",
                id="source-snapshot-only-over-target-events",
            ),
            pytest.param(
                Side(range(10, 13), snapshot=7),
                Side(events=range(1, 10), tag="other"),
                "target events 1..9, 9 of them at or below 12 not in the source",
                id="source-snapshot-and-later-events-over-target-events",
            ),
            pytest.param(  # the same content at 8..10, but 1..7 cannot be compared
                Side(range(8, 11), snapshot=7, tag="same"),
                Side(events=range(1, 11), tag="same"),
                "target events 1..10, 7 of them at or below 10 not in the source",
                id="source-from-a-snapshot-target-from-the-start",
            ),
            pytest.param(  # a target snapshot would cover the source's events 10..12
                Side(events=range(1, 13)),
                Side(snapshot=9, tag="other"),
                "target a snapshot at 9 without its events 1..9",
                id="target-snapshot-only-within-the-source",
            ),
            pytest.param(
                Side(events=range(1, 6)),
                Side(snapshot=9, tag="other"),
                "target a snapshot at 9 without its events 1..9",
                id="target-snapshot-only-beyond-the-source",
            ),
            pytest.param(
                Side(range(8, 11), snapshot=7),
                Side(range(11, 13), snapshot=9, tag="other"),
                "target a snapshot at 9 without its events 1..9",
                id="snapshots-at-different-positions",
            ),
            pytest.param(
                Side(events=range(1, 6)),
                Side(events=range(8, 13), tag="other"),
                "no row in common to compare",
                id="nothing-in-common",
            ),
            pytest.param(  # gaps: the target's events are counted, not inferred
                Side(snapshot=7),
                Side(events=range(1, 10, 2), tag="other"),
                "target 5 events from 1 to 9, 4 of them at or below 7 not in the source",
                id="target-events-with-gaps",
            ),
            pytest.param(
                Side(range(1, 13), tag="same"),
                Side(range(1, 10, 2), snapshot=5, tag="same"),
                "target a snapshot at 5 without its events 1..5",
                id="target-snapshot-over-a-gap",
            ),
        ],
    )
    def test_an_entity_held_by_both_must_be_proven_one_history(
        self,
        source_side: Side,
        target_side: Side,
        why: str,
        db_url: URL,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Both sides hold entity X, but no key or too few keys in common: refused, untouched."""
        source = _lay_out(source_side, target_side, tmp_path, db_url)
        before = raw_database_rows(db_url), load_database(db_url, ["X"]).snapshots
        code, out, _ = run(capsys, "import", "--from", str(source), "--url", plain(db_url))
        assert code == ExitCode.NOT_VERIFIED, out
        assert "REFUSED" in out and "verified" not in out.replace("NOT VERIFIED", "")
        assert "'X': history: " in out and why in out, out
        assert (raw_database_rows(db_url), load_database(db_url, ["X"]).snapshots) == before

    @pytest.mark.parametrize(
        ("source_side", "target_side"),
        [
            pytest.param(Side(range(1, 13), 10), Side(range(1, 6)), id="resumed-prefix"),
            pytest.param(Side(range(1, 6), 3), Side(range(1, 13), 10), id="target-ran-on"),
            pytest.param(Side(range(1, 13), 10), Side(range(1, 9), 5), id="source-ran-on"),
            pytest.param(Side(snapshot=7), Side(snapshot=7), id="same-snapshot-only"),
            pytest.param(Side(range(1, 13), 10), Side(range(1, 10, 2)), id="target-with-gaps"),
            pytest.param(Side(range(8, 11), 7), Side(range(8, 13), 7), id="from-the-same-snapshot"),
        ],
    )
    def test_one_history_held_in_part_by_each_side_is_copied(
        self,
        source_side: Side,
        target_side: Side,
        db_url: URL,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        source = _lay_out(source_side, target_side, tmp_path, db_url)
        code, out, _ = run(capsys, "import", "--from", str(source), "--url", plain(db_url))
        assert code == ExitCode.OK and "verified   content compared" in out, out
        held = load_database(db_url, ["X"])
        expected = sorted({*source_side.events, *target_side.events})
        assert [event.sequence_nr for event in held.events["X"]] == expected
        snapshot = held.snapshots["X"]
        assert snapshot is not None
        assert snapshot.sequence_nr == max(source_side.snapshot or 0, target_side.snapshot or 0)

    def test_a_timestamp_one_ulp_away_is_another_history(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        source = tmp_path / "casty.db"
        write_casty_file(source, {"e": ["x"]}, {})
        url = f"sqlite:///{tmp_path / 'journal.db'}"
        assert run(capsys, "import", "--from", str(source), "--url", url)[0] == ExitCode.OK
        with sqlite3.connect(source) as conn:  # same payload, timestamp one ulp away
            conn.execute("UPDATE events SET timestamp = timestamp + timestamp * 2.3e-16")
        code, out, _ = run(capsys, "import", "--from", str(source), "--url", url)
        assert code == ExitCode.NOT_VERIFIED
        assert "first differs at sequence number 1" in out and "timestamp differs" in out

    def test_the_application_already_ran_on_the_new_tables(
        self, source: Path, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        async def app_started_from_nothing() -> None:
            async with SAJournal(db_url) as journal:
                await journal.persist("acct-1", [PersistedEvent(1, {"deposit": 99}, 1.0)])

        asyncio.run(app_started_from_nothing())
        before = raw_database_rows(db_url)
        code, out, _ = run(capsys, "import", "--from", str(source), "--url", plain(db_url))
        assert code == ExitCode.NOT_VERIFIED
        assert "'acct-1': events: first differs at sequence number 1" in out
        assert raw_database_rows(db_url) == before

    def test_a_differing_snapshot_at_the_same_position_is_a_fork(
        self, source: Path, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        url = plain(db_url)
        assert run(capsys, "import", "--from", str(source), "--url", url)[0] == ExitCode.OK

        async def overwrite() -> None:
            async with SAJournal(db_url) as journal:
                snapshot = await journal.load_snapshot("acct-1")
                assert snapshot is not None
                await journal.save_snapshot("acct-1", Snapshot(100, "other", snapshot.timestamp))

        asyncio.run(overwrite())
        code, out, _ = run(capsys, "import", "--from", str(source), "--url", url)
        assert code == ExitCode.NOT_VERIFIED
        assert "'acct-1': snapshot: first differs at sequence number 100" in out
        assert "payload differs" in out

    def test_export_into_a_file_of_another_history_is_refused(
        self, source: Path, db_url: URL, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        url = plain(db_url)
        assert run(capsys, "import", "--from", str(source), "--url", url)[0] == ExitCode.OK
        other = tmp_path / "other-node.db"
        write_casty_file(other, {"acct-1": ["something else"]}, {})
        before = raw_file_rows(other)
        code, out, _ = run(capsys, "export", "--url", url, "--to", str(other))
        assert code == ExitCode.NOT_VERIFIED and "REFUSED" in out
        assert "'acct-1': events: first differs at sequence number 1" in out
        assert raw_file_rows(other) == before

    def test_verification_compares_content_not_counts(
        self, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        target = tmp_path / "journal.db"
        url = f"sqlite:///{target}"
        assert run(capsys, "upgrade", "--url", url)[0] == ExitCode.OK
        with sqlite3.connect(target) as conn:  # a target that mangles what it is given
            conn.execute(
                "CREATE TRIGGER mangle AFTER INSERT ON casty_sa_events "
                "WHEN NEW.entity_id = 'acct-1' AND NEW.sequence_nr = 7 BEGIN "
                "UPDATE casty_sa_events SET payload = x'00' "
                "WHERE entity_id = NEW.entity_id AND sequence_nr = 7; END"
            )
        code, out, _ = run(capsys, "import", "--from", str(source), "--url", url)
        assert code == ExitCode.NOT_VERIFIED
        assert "NOT VERIFIED: 1 entities differ" in out
        assert "'acct-1': events: first differs at sequence number 7" in out


class TestOpeningACastyFile:
    """``SAJournal`` on a file of casty's ``SqliteJournal`` refuses instead of starting over."""

    def test_refuses_and_names_the_import_command(
        self, source: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        tables_before = _table_names(source)

        async def open_it() -> None:
            async with SAJournal(f"sqlite:///{source}") as journal:
                await journal.load("acct-1")

        with pytest.raises(SchemaError) as refused:
            asyncio.run(asyncio.wait_for(open_it(), TIMEOUT))
        message = str(refused.value)
        assert "casty's own SqliteJournal" in message and "from nothing" in message
        new_file = source.with_name("casty-journal-casty-sa.db")
        command = f"casty-sa import --from '{source}' --url 'sqlite:///{new_file}'"
        assert command in message
        assert _table_names(source) == tables_before  # no casty_sa_ tables beside casty's

        # the command in the message does what it says
        argv = shlex.split(command)[1:]
        code, _, err = run(capsys, *argv)
        assert code == ExitCode.OK, err
        assert load_database(f"sqlite:///{new_file}", ENTITIES) == load_casty_file(source, ENTITIES)

    def test_a_file_holding_only_casty_snapshots_is_refused_too(self, tmp_path: Path) -> None:
        path = tmp_path / "casty.db"
        SqliteJournal(path).close()
        with sqlite3.connect(path) as conn:
            conn.execute("DROP TABLE events")

        async def open_it() -> None:
            async with SAJournal(f"sqlite:///{path}") as journal:
                await journal.load("x")

        with pytest.raises(SchemaError, match="'snapshots' tables"):
            asyncio.run(asyncio.wait_for(open_it(), TIMEOUT))

    def test_other_tables_named_events_are_left_alone(self, tmp_path: Path) -> None:
        path = tmp_path / "app.db"
        with sqlite3.connect(path) as conn:  # an application's own, unrelated 'events'
            conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, body TEXT)")

        async def use_it() -> list[PersistedEvent[Any]]:
            async with SAJournal(f"sqlite:///{path}") as journal:
                await journal.persist("e", [PersistedEvent(1, "x", 1.0)])
                return await journal.load("e")

        assert asyncio.run(asyncio.wait_for(use_it(), TIMEOUT)) == [PersistedEvent(1, "x", 1.0)]


def _table_names(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}


HOSTILE_ROWS = {
    "blob entity id": ((b"acct", 1, b"x", 1.0), "entity id that is BLOB, not TEXT"),
    "null entity id": ((None, 1, b"x", 1.0), "entity id that is NULL, not TEXT"),
    "integer entity id": ((7, 1, b"x", 1.0), "entity id that is INTEGER, not TEXT"),
    "text sequence number": (("a", "one", b"x", 1.0), "sequence number that is TEXT"),
    "real sequence number": (("a", 1.5, b"x", 1.0), "sequence number that is REAL"),
    "null sequence number": (("a", None, b"x", 1.0), "sequence number that is NULL"),
    "text payload": (("a", 1, "x", 1.0), "payload that is TEXT, not BLOB"),
    "null payload": (("a", 1, None, 1.0), "payload that is NULL, not BLOB"),
    "nan timestamp": (("a", 1, b"x", float("nan")), "timestamp that is NULL"),  # SQLite: NULL
    "text timestamp": (("a", 1, b"x", "NaN"), "timestamp that is TEXT, not REAL"),
}


class TestHostileSourceRows:
    """A file whose rows casty's SqliteJournal never writes is a bad file (exit 4), row named."""

    @pytest.mark.parametrize("table", ["events", "snapshots"])
    @pytest.mark.parametrize("shape", list(HOSTILE_ROWS))
    def test_is_refused_before_anything_is_copied(
        self, shape: str, table: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        source = tmp_path / "hostile.db"
        with sqlite3.connect(source) as conn:  # casty's columns, without its types/constraints
            conn.execute("CREATE TABLE events (entity_id, sequence_nr, event_data, timestamp)")
            conn.execute("CREATE TABLE snapshots (entity_id, sequence_nr, state_data, timestamp)")
            good = [(f"fine-{n}", 1, pickle.dumps("ok"), 1.0) for n in (1, 2)]
            conn.executemany(f"INSERT INTO {table} VALUES (?, ?, ?, ?)", good)
            conn.execute(f"INSERT INTO {table} VALUES (?, ?, ?, ?)", HOSTILE_ROWS[shape][0])
        target = tmp_path / "journal.db"
        code, _, err = run(capsys, "import", "--from", str(source), "--url", f"sqlite:///{target}")
        assert code == ExitCode.BAD_FILE, err
        assert f"row 3 of table {table!r}" in err and HOSTILE_ROWS[shape][1] in err
        assert "Nothing was copied" in err and "internal error" not in err
        assert _rows_in(target) == 0


# -- the global order --------------------------------------------------------------------------


def global_order(url: URL | str) -> list[tuple[Any, ...]]:
    """``(entity_id, sequence_nr, event_type, era, transaction_id, position)`` in global order."""

    async def read() -> list[tuple[Any, ...]]:
        engine, _ = open_engine(url)
        try:
            async with engine.connect() as conn:
                result = await conn.execute(
                    text(
                        "SELECT entity_id, sequence_nr, event_type, era, transaction_id, position"
                        " FROM casty_sa_events ORDER BY era, transaction_id, position"
                    )
                )
                return [tuple(row) for row in result]
        finally:
            await engine.dispose()

    return asyncio.run(read())


class TestGlobalOrderOfCopies:
    """Rows a copy writes get their place in the target's global order, as the journal's do."""

    def test_imported_rows_follow_what_the_target_held(
        self, source: Path, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        asyncio.run(Side(range(1, 3), tag="before").write_to(db_url))
        code, _, err = run(
            capsys, "import", "--from", str(source), "--url", plain(db_url), "--batch-size", "7"
        )
        assert code == ExitCode.OK, err
        asyncio.run(Side(range(3, 4), tag="before").write_to(db_url))  # the journal, after
        rows = global_order(db_url)
        assert [row[:2] for row in rows[:2]] == [("X", 1), ("X", 2)]
        assert rows[-1][:2] == ("X", 3)
        imported = rows[2:-1]
        assert len(imported) == SOURCE_EVENT_COUNT
        # a copy goes in key order, one transaction per batch: so does its global order
        assert [row[:2] for row in imported] == sorted(row[:2] for row in imported)
        assert {row[2] for row in imported} == {None}  # a casty file has no event types
        assert rows[0][2] == "str"
        assert len({row[3:] for row in rows}) == len(rows)  # every place taken once
        assert {row[3] for row in rows} == {0}

    def test_a_copy_between_databases_keeps_event_types(self, tmp_path: Path, db_url: URL) -> None:
        source_url = f"sqlite:///{tmp_path / 'source.db'}"

        async def copy() -> TransferReport:
            async with SAJournal(source_url) as journal:
                await journal.persist("A", [PersistedEvent(1, 1.5, 1.0)])
                await journal.persist("B", [PersistedEvent(1, "b", 1.0), PersistedEvent(2, 2, 2.0)])
            async with (
                JournalDatabase.open(source_url) as source,
                JournalDatabase.open(db_url) as target,
            ):
                return await copy_journal(source, target)

        async def at_a_new_era() -> None:
            """As after a restore into a server whose transaction ids are behind the rows'."""
            engine, _ = open_engine(db_url)
            try:
                async with engine.begin() as conn:
                    await conn.execute(
                        text(
                            "INSERT INTO casty_sa_events (entity_id, sequence_nr, timestamp,"
                            " payload, era, transaction_id, position)"
                            " VALUES ('restored', 1, 0.0, :payload, 0, :far, 1000000)"
                        ),
                        {"payload": pickle.dumps("r"), "far": 2**62},
                    )
            finally:
                await engine.dispose()

        postgresql = db_url.get_backend_name() == "postgresql"
        if postgresql:
            asyncio.run(at_a_new_era())
        report = asyncio.run(copy())
        assert report.events_copied == 3 and report.verified
        rows = [row for row in global_order(db_url) if row[0] != "restored"]
        assert [row[:3] for row in rows] == [("A", 1, "float"), ("B", 1, "str"), ("B", 2, "int")]
        # PostgreSQL: the era of the target, after the restored rows
        assert {row[3] for row in rows} == ({1} if postgresql else {0})
