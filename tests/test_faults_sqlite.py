"""SQLite faults: lock contention, a read-only file system, a full disk.

Contention runs many writers in one process (several journals on one file) and two writer
processes on one file (``tests/support/crash_writer.py``), while this process reads and writes
too: none may ever see "database is locked" within the busy timeout. Read-only and
full-disk faults use a real tmpfs mounted for the test (when this machine lets the test
mount one; otherwise those variants are skipped) and SQLite's own ``max_page_count`` limit,
which produces the same SQLITE_FULL error on any machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from casty import PersistedEvent, Snapshot
from sqlalchemy import event

import casty_sa
from casty_sa import (
    DatabaseFileReplaced,
    DatabaseUnavailable,
    InvalidEventError,
    JournalError,
    SAJournal,
    SequenceConflict,
)

from support import crash_writer as writer
from support import internals, processes
from support.processes import start_writer

#: a row another application writes past the journal (its own place in the global order)
_OTHER_APP_ROW = (
    "INSERT INTO casty_sa_events (entity_id, sequence_nr, timestamp, payload, position) "
    "VALUES ('other-app', 1, 1.0, x'00', -1000000)"
)


def batch(entity_id: str, first: int, size: int) -> list[PersistedEvent[Any]]:
    result: list[PersistedEvent[Any]] = writer.make_batch(entity_id, first, size)
    return result


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def assert_whole(entity_id: str, events: list[PersistedEvent[Any]]) -> None:
    i = 0
    while i < len(events):
        owner, first, size, index = events[i].event
        members = events[i : i + size]
        assert (owner, index) == (entity_id, 0)
        assert [e.event for e in members] == [(entity_id, first, size, k) for k in range(size)]
        i += size


# -- durability settings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "expected"), [(None, 2), ("NORMAL", 1), ("EXTRA", 3), ("OFF", 0)]
)
async def test_connections_use_wal_and_the_chosen_synchronous_level(
    tmp_path: Path, make_journal: Callable[..., SAJournal], setting: str | None, expected: int
) -> None:
    """Default ``synchronous=FULL`` (2): a commit is on disk before ``persist`` returns."""
    options = {} if setting is None else {"sqlite_synchronous": setting}
    journal = make_journal(sqlite_url(tmp_path / "durable.db"), **options)
    await journal.persist("acct", batch("acct", 1, 1))
    async with journal.engine.connect() as conn:
        mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar_one()
        level = (await conn.exec_driver_sql("PRAGMA synchronous")).scalar_one()
        busy = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar_one()
    assert (mode, level, busy) == ("wal", expected, 5000)


# -- contention --------------------------------------------------------------------------------


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "own-transaction"])
async def test_hundred_concurrent_writers_in_one_process_never_see_locked(
    tmp_path: Path, make_journal: Callable[..., SAJournal], group_commit: bool
) -> None:
    url = sqlite_url(tmp_path / "contended.db")
    await casty_sa.upgrade(url)
    # four journals (four pools, up to 60 connections) fight over one file
    journals = [make_journal(url, group_commit=group_commit) for _ in range(4)]
    errors: list[BaseException] = []

    async def writer_task(i: int) -> None:
        journal = journals[i % len(journals)]
        entity_id = f"w{i}"
        seq = 1
        for n in range(8):
            size = 1 + (i + n) % 3
            try:
                await journal.persist(entity_id, batch(entity_id, seq, size))
                if n % 4 == 3:
                    await journal.save_snapshot(entity_id, Snapshot(seq, ("s", seq), 1.0))
                await journal.load(entity_id, seq)  # reads interleaved with the writes
            except JournalError as exc:
                errors.append(exc)
                return
            seq += size

    await asyncio.wait_for(asyncio.gather(*(writer_task(i) for i in range(100))), 90)
    assert not errors, [str(e) for e in errors[:3]]
    for i in range(100):
        events = await journals[0].load(f"w{i}")
        assert_whole(f"w{i}", events)
        assert len(events) == sum(1 + (i + n) % 3 for n in range(8))


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "own-transaction"])
async def test_two_processes_and_this_one_write_one_file(
    tmp_path: Path, make_journal: Callable[..., SAJournal], group_commit: bool
) -> None:
    url = sqlite_url(tmp_path / "shared.db")
    await casty_sa.upgrade(url)
    extra = [] if group_commit else ["--no-group-commit"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    options = ["--entities", "20", "--workers", "10", "--batches", "25", *extra]
    procs = [
        start_writer(url, logs[k], "--prefix", prefix, *options)
        for k, prefix in enumerate(("a", "b"))
    ]
    # meanwhile this process reads everything and writes its own entities
    journal = make_journal(url, group_commit=group_commit)
    errors: list[str] = []
    mine = 0
    while any(p.poll() is None for p in procs):
        try:
            await journal.persist("local", batch("local", mine + 1, 2))
            mine += 2
            await asyncio.gather(*(journal.load(f"{p}{i}") for p in "ab" for i in range(0, 20, 4)))
        except JournalError as exc:
            errors.append(str(exc))
        await asyncio.sleep(0.005)
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert b"locked" not in err
    assert not errors, errors[:3]
    for prefix, log in zip("ab", logs, strict=True):
        await writer.verify(journal, str(log), [f"{prefix}{i}" for i in range(20)])
    assert len(await journal.load("local")) == mine > 0


async def test_a_write_waits_for_another_connections_lock_within_busy_timeout(
    tmp_path: Path, make_journal: Callable[..., SAJournal]
) -> None:
    path = tmp_path / "locked.db"
    await casty_sa.upgrade(sqlite_url(path))
    patient = make_journal(sqlite_url(path))  # busy_timeout 5 s
    impatient = make_journal(sqlite_url(path), busy_timeout=0.3)
    await patient.start()
    await impatient.start()

    locked = threading.Event()

    def hold_write_lock(seconds: float) -> None:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute(_OTHER_APP_ROW)
            locked.set()
            time.sleep(seconds)  # another application's long write transaction
            other.execute("COMMIT")
        finally:
            other.close()

    holder = asyncio.ensure_future(asyncio.to_thread(hold_write_lock, 1.0))
    assert await asyncio.to_thread(locked.wait, 10), "the other connection never took the lock"
    # a reader is never blocked by the writer (WAL)
    started = time.monotonic()
    assert await patient.load("anything") == []
    assert time.monotonic() - started < 0.5
    # a write past its busy timeout fails clearly and stores nothing
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable, match="locked"):
        await impatient.persist("impatient", batch("impatient", 1, 3))
    assert time.monotonic() - started < 0.9
    # a write within its busy timeout waits and succeeds
    await patient.persist("patient", batch("patient", 1, 3))
    assert time.monotonic() - started >= 0.7
    await holder
    assert len(await patient.load("patient")) == 3
    assert await patient.load("impatient") == []
    await impatient.persist("impatient", batch("impatient", 1, 3))  # works once free
    assert len(await impatient.load("impatient")) == 3


async def test_second_process_starting_during_the_first_migration(
    tmp_path: Path, make_journal: Callable[..., SAJournal]
) -> None:
    url = sqlite_url(tmp_path / "fresh.db")
    proc = start_writer(
        url,
        tmp_path / "acks.log",
        "--pause-after-sql",
        "CREATE TABLE casty_sa_events",
        "--pause",
        "1.0",
        "--batches",
        "3",
        "--entities",
        "4",
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
    assert line.strip() == b"paused"
    journal = make_journal(url)  # this process starts while the other one migrates
    try:
        await journal.persist("second", batch("second", 1, 2))
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert len(await journal.load("second")) == 2
    assert await casty_sa.current(url) == casty_sa.head_revision()


# -- read-only file system and full disk -------------------------------------------------------


@functools.cache
def _can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = tempfile.mkdtemp(prefix="casty-sa-mount-probe-")
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", probe], capture_output=True
        )
        if mounted.returncode != 0:
            return False
        subprocess.run(["umount", probe], check=True)
        return True
    finally:
        os.rmdir(probe)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real, small file system of its own, mounted for the test."""
    if not _can_mount():
        pytest.skip("needs permission to mount a tmpfs (root in a privileged container)")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def _lines(log: Path) -> int:
    return log.read_bytes().count(b"\n") if log.exists() else 0


async def _crashed_writer_leaves_wal(url: str, log: Path) -> None:
    """Run a writer and SIGKILL it, so the file keeps its -wal and -shm (an unclean stop)."""
    proc = start_writer(url, log, "--entities", "5", "--workers", "5")
    deadline = time.monotonic() + 30
    while _lines(log) < 5:
        assert proc.poll() is None and time.monotonic() < deadline, "the writer did not run"
        await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


@pytest.mark.parametrize("stop", ["clean-close", "after-crash"])
async def test_read_only_file_system_fails_clearly_and_recovers(
    tmp_path: Path,
    make_journal: Callable[..., SAJournal],
    stop: str,
) -> None:
    with tmpfs(tmp_path / "fs", "16m") as fs:
        url = sqlite_url(fs / "journal.db")
        log = tmp_path / "acks.log"
        if stop == "clean-close":
            first = SAJournal(url)
            await first.persist("e0", batch("e0", 1, 2))
            await first.close()
            log.write_text("E e0 1 2\n")
        else:
            await _crashed_writer_leaves_wal(url, log)
            assert (fs / "journal.db-wal").exists()
        entities = [f"e{i}" for i in range(5)]
        remount(fs, "ro")
        journal = make_journal(url)
        try:
            with pytest.raises(DatabaseUnavailable) as info:
                await journal.persist("e0", batch("e0", 100, 3))
            assert "readonly" in str(info.value) or "unable to open" in str(info.value)
            with pytest.raises(DatabaseUnavailable):
                await journal.save_snapshot("e0", Snapshot(1, ("state", "e0", 1), 1.0))
        finally:
            remount(fs, "rw")
        # the same journal works again, and nothing of the failed calls was stored
        next_seq = await writer.verify(journal, str(log), entities)
        await journal.persist("e0", batch("e0", next_seq["e0"], 3))
        assert len(await journal.load("e0")) == next_seq["e0"] + 2
        await journal.close()


def _fill(fs: Path) -> Path:
    """Fill the file system to the last byte with one file; return it."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\xff" * size):
                    pass
    finally:
        os.close(fd)
    return filler


async def test_full_disk_fails_clearly_stores_nothing_and_recovers(
    tmp_path: Path, make_journal: Callable[..., SAJournal]
) -> None:
    with tmpfs(tmp_path / "fs", "4m") as fs:
        url = sqlite_url(fs / "journal.db")
        journal = make_journal(url)
        await journal.persist("small", batch("small", 1, 2))
        filler = _fill(fs)
        big = [PersistedEvent(i, (b"\x00" * 100_000, i), 1.0) for i in range(1, 11)]
        for attempt in range(3):
            with pytest.raises(DatabaseUnavailable) as info:
                await journal.persist(f"big{attempt}", big)
            assert "full" in str(info.value)
            # neighbours in the same moment either succeed whole or fail whole
            results = await asyncio.gather(
                *(
                    journal.persist(f"n{attempt}-{k}", batch(f"n{attempt}-{k}", 1, 3))
                    for k in range(5)
                ),
                return_exceptions=True,
            )
            assert all(r is None or isinstance(r, DatabaseUnavailable) for r in results)
        assert len(await journal.load("small")) == 2  # reads still work
        for attempt in range(3):
            assert await journal.load(f"big{attempt}") == []
            for k in range(5):
                assert_whole(f"n{attempt}-{k}", await journal.load(f"n{attempt}-{k}"))
        filler.unlink()  # space returns: the same journal writes again
        await journal.persist("big0", big)
        assert len(await journal.load("big0")) == 10
        await journal.close()
        fresh = SAJournal(url)
        assert len(await fresh.load("big0")) == 10
        assert len(await fresh.load("small")) == 2
        await fresh.close()


async def _until_pool_idle(journal: SAJournal) -> None:
    """The cap is applied at checkout: wait until the group-commit flusher has given its
    connection back, so the next write checks one out."""
    for _ in range(500):
        if journal.engine.pool.checkedout() == 0:  # type: ignore[attr-defined]
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the journal kept a connection checked out")


async def test_database_full_by_max_page_count_fails_clearly_and_recovers(
    tmp_path: Path, make_journal: Callable[..., SAJournal]
) -> None:
    """SQLITE_FULL from SQLite's own size limit, on any machine."""
    url = sqlite_url(tmp_path / "capped.db")
    journal = make_journal(url)
    await journal.persist("small", batch("small", 1, 2))
    limit: dict[str, int | None] = {"pages": None}

    @event.listens_for(journal.engine.sync_engine, "checkout")
    def _cap(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            pages = limit["pages"]
            cursor.execute(f"PRAGMA max_page_count = {pages if pages else 1073741823}")
        finally:
            cursor.close()

    async with journal.engine.connect() as conn:
        used = (await conn.exec_driver_sql("PRAGMA page_count")).scalar_one()
    limit["pages"] = int(used) + 2
    await _until_pool_idle(journal)
    big = [PersistedEvent(i, (b"\x00" * 50_000, i), 1.0) for i in range(1, 11)]
    with pytest.raises(DatabaseUnavailable, match="full"):
        await journal.persist("big", big)
    with pytest.raises(DatabaseUnavailable, match="full"):
        await journal.save_snapshot("big", Snapshot(1, b"\x00" * 200_000, 1.0))
    assert await journal.load("big") == []
    assert await journal.load_snapshot("big") is None
    assert len(await journal.load("small")) == 2
    limit["pages"] = None  # space returns
    await _until_pool_idle(journal)
    await journal.persist("big", big)
    await journal.save_snapshot("big", Snapshot(10, "s", 1.0))
    assert len(await journal.load("big")) == 10


# -- an I/O error while committing -------------------------------------------------------------


@pytest.fixture(scope="module")
def wal_fsync_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``LD_PRELOAD`` shim that fails the ``fsync`` of ``-wal`` files, built with gcc."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the fsync fault shim")
    built = tmp_path_factory.mktemp("shim") / "fail_wal_fsync.so"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-o", str(built), str(processes.WAL_FSYNC_SHIM), "-ldl"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return built


async def _eio_writer(path: Path, shim: Path, mode: str) -> dict[str, Any]:
    """Run ``eio_writer.py`` on ``path`` under the fsync-failing shim; the outcome it printed."""
    flag = path.parent / "fail-now"
    env = {**os.environ, "LD_PRELOAD": str(shim), "FAIL_WAL_SYNC_FLAG": str(flag)}
    run = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(processes.EIO_WRITER), sqlite_url(path), str(flag), mode],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    outcome: dict[str, Any] = json.loads(run.stdout.decode().strip().splitlines()[-1])
    return outcome


@pytest.mark.parametrize("mode", ["single", "transaction", "app-engine"])
async def test_an_io_error_while_committing_is_commit_outcome_unknown(
    tmp_path: Path, wal_fsync_shim: Path, mode: str
) -> None:
    """The WAL's fsync fails (EIO) at commit: the commit frame may already be in the WAL, so
    "nothing stored" would be a lie; the rows may show up once the WAL is read again."""
    path = tmp_path / "eio.db"
    outcome = await _eio_writer(path, wal_fsync_shim, mode)
    assert outcome["error"] == "CommitOutcomeUnknown", outcome
    assert "may or may not be stored" in outcome["message"]
    assert "I/O error" in outcome["message"]
    # the next process reads the WAL the writer left: whatever it finds, the batch is whole
    # (all of it or none), and the error above did not claim it was not stored
    fresh = SAJournal(sqlite_url(path))
    try:
        target = await asyncio.wait_for(fresh.load("target"), 30)
        assert [e.sequence_nr for e in target] in ([], list(range(1, len(target) + 1)))
        assert len(target) in (0, {"single": 3, "transaction": 1500, "app-engine": 3}[mode])
        assert len(await fresh.load("warm-up")) == 1
    finally:
        await fresh.close()


async def test_an_io_error_while_committing_a_deletion_is_commit_outcome_unknown(
    tmp_path: Path, wal_fsync_shim: Path
) -> None:
    """A deletion's COMMIT hits the failing fsync: "nothing deleted" would be a lie (the
    commit frame may be in the WAL); whatever the next process finds, it is the whole
    deletion with its tombstone, or none of it."""
    path = tmp_path / "eio.db"
    outcome = await _eio_writer(path, wal_fsync_shim, "delete")
    assert outcome["error"] == "CommitOutcomeUnknown", outcome
    assert "may or may not be deleted" in outcome["message"]
    fresh = SAJournal(sqlite_url(path))
    try:
        left = [e.sequence_nr for e in await asyncio.wait_for(fresh.load("target"), 30)]
        assert left in ([], [1, 2, 3])
        assert await fresh.highest_sequence_nr("target") == 3
        if not left:  # deleted: the tombstone came with it, so 3 is never written again
            with pytest.raises(SequenceConflict):
                await fresh.persist("target", [PersistedEvent(3, "again", 1.0)])
    finally:
        await fresh.close()


# -- the file under a running journal ----------------------------------------------------------


def _backup(path: Path, to: Path) -> Path:
    """An online backup of the SQLite file at ``path`` (sqlite3's backup API), written to ``to``."""
    with (
        contextlib.closing(sqlite3.connect(path)) as source,
        contextlib.closing(sqlite3.connect(to)) as target,
    ):
        source.backup(target)
    return to


def _remove_file(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


@pytest.mark.parametrize("change", ["deleted", "replaced-by-backup", "directory-removed"])
async def test_writes_after_the_file_is_gone_fail_instead_of_being_acknowledged(
    tmp_path: Path, make_journal: Callable[..., SAJournal], change: str
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "journal.db"
    journal = make_journal(sqlite_url(path))
    await journal.persist("acct", batch("acct", 1, 2))
    if change == "replaced-by-backup":
        backup = _backup(path, tmp_path / "backup.db")
        await journal.persist("acct", batch("acct", 3, 2))  # after the backup was taken
        _remove_file(path)  # the operator restores the backup: a new file at the path
        os.replace(backup, path)
    elif change == "deleted":
        _remove_file(path)
    else:
        shutil.rmtree(folder)
    with pytest.raises(DatabaseFileReplaced) as info:
        await asyncio.wait_for(journal.persist("acct", batch("acct", 5, 2)), 10)
    message = str(info.value)
    assert str(path) in message
    assert "committed into the old file" in message and f"NOT stored at {path}" in message
    # every later call fails the same way: nothing goes into the old file, nothing is
    # recreated at the path, no read answers from a file that is not there any more
    for call in (
        journal.persist("other", batch("other", 1, 1)),
        journal.save_snapshot("acct", Snapshot(6, "s", 1.0)),
        journal.load("acct"),
        journal.load_snapshot("acct"),
    ):
        with pytest.raises(DatabaseFileReplaced, match="nothing of it was stored"):
            await asyncio.wait_for(call, 10)
    if change == "replaced-by-backup":
        fresh = SAJournal(sqlite_url(path))  # a restarted node sees the restored file
        try:
            assert [e.sequence_nr for e in await fresh.load("acct")] == [1, 2]
            assert await fresh.load("other") == []
        finally:
            await fresh.close()
    else:
        assert not path.exists()


@pytest.mark.parametrize("change", ["deleted", "replaced-by-backup"])
async def test_a_live_reader_learns_that_its_file_is_gone(
    tmp_path: Path, make_journal: Callable[..., SAJournal], change: str
) -> None:
    """A live reader alone (its journal writes nothing more) polls a connection that keeps
    the file it opened: once the path names another file, where other processes now
    write, it fails instead of waiting there, silently, for ever."""
    path = tmp_path / "journal.db"
    journal = make_journal(sqlite_url(path))
    await journal.persist("a", batch("a", 1, 3))
    stream = journal.events(live=True)
    first = [await asyncio.wait_for(anext(stream), 10) for _ in range(3)]
    assert [e.sequence_nr for e in first] == [1, 2, 3]
    backup = _backup(path, tmp_path / "backup.db") if change == "replaced-by-backup" else None
    _remove_file(path)
    if backup is not None:
        os.replace(backup, path)
    other = make_journal(sqlite_url(path), migrate=True)  # another node writes at the path
    await other.persist("b", batch("b", 1, 5))
    with pytest.raises(DatabaseFileReplaced, match="this read failed"):
        await asyncio.wait_for(anext(stream), 10)
    await stream.aclose()


async def test_no_new_connection_recreates_a_deleted_file(
    tmp_path: Path, make_journal: Callable[..., SAJournal]
) -> None:
    """A journal whose pooled connections were closed would open a new one on a new, empty
    file (its shared reader keeps the old one; without group commit no writer's connection
    is kept either)."""
    path = tmp_path / "journal.db"
    journal = make_journal(sqlite_url(path), group_commit=False)
    await journal.persist("acct", batch("acct", 1, 2))
    await journal.engine.dispose()
    _remove_file(path)
    with pytest.raises(DatabaseFileReplaced, match="refused before anything was sent"):
        await asyncio.wait_for(journal.persist("acct", batch("acct", 3, 1)), 10)
    assert not path.exists()


async def _settle(journal: SAJournal, entity: str) -> int:
    """Writes until the directory shortcut is trusted (past the tick); the next sequence nr."""
    await journal.persist(entity, batch(entity, 1, 1))
    await journal.load(entity)
    await asyncio.sleep(0.2)
    await journal.persist(entity, batch(entity, 2, 1))
    await journal.persist(entity, batch(entity, 3, 1))
    return 4


@pytest.mark.parametrize(
    "change", ["deleted", "wal-deleted", "replaced-times-restored", "directory-removed"]
)
async def test_the_directory_shortcut_misses_no_change(
    tmp_path: Path, make_journal: Callable[..., SAJournal], change: str
) -> None:
    """Once the directory has been still for a moment, a write checks it with one ``stat`` of
    the directory instead of two of the files: any entry deleted, renamed or created moves
    the directory's ctime, and so does putting its times back (a restore with ``rsync -a``)."""
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "journal.db"
    journal = make_journal(sqlite_url(path))
    seq = await _settle(journal, "acct")
    assert internals.directory_shortcut_on(journal)
    times = folder.stat()
    if change == "deleted":
        path.unlink()
    elif change == "wal-deleted":
        os.unlink(f"{path}-wal")
    elif change == "replaced-times-restored":
        backup = _backup(path, tmp_path / "backup.db")
        os.replace(backup, path)
        os.utime(folder, ns=(times.st_atime_ns, times.st_mtime_ns))
        assert folder.stat().st_mtime_ns == times.st_mtime_ns
    else:
        shutil.rmtree(folder)
    with pytest.raises(DatabaseFileReplaced):
        await asyncio.wait_for(journal.persist("acct", batch("acct", seq, 1)), 10)


@pytest.mark.parametrize("change", ["target-replaced", "target-wal-deleted"])
async def test_a_database_path_that_is_a_symlink_into_another_directory(
    tmp_path: Path, make_journal: Callable[..., SAJournal], change: str
) -> None:
    """``data/journal.db -> ../real/journal.db``: SQLite opens the target and keeps its -wal
    beside it, in ``real/``. Replacing the target changes ``real/``'s ctime, not ``data/``'s,
    so the one-stat shortcut on ``data/`` said "unchanged"; the -wal check looked for
    ``data/journal.db-wal``, which never exists, so it checked nothing at all."""
    real, data = tmp_path / "real", tmp_path / "data"
    real.mkdir()
    data.mkdir()
    target, link = real / "journal.db", data / "journal.db"
    link.symlink_to(Path("..", "real", "journal.db"))
    journal = make_journal(f"sqlite:///{link}")
    async with asyncio.timeout(30):
        seq = await _settle(journal, "acct")
        if change == "target-replaced":
            os.replace(_backup(target, tmp_path / "backup.db"), target)
        else:
            os.unlink(f"{target}-wal")
        with pytest.raises(DatabaseFileReplaced):
            await journal.persist("acct", batch("acct", seq, 1))


async def test_a_file_uri_with_the_localhost_authority(
    tmp_path: Path, make_journal: Callable[..., SAJournal]
) -> None:
    """``file://localhost/abs/path`` names the same file as ``file:///abs/path`` for SQLite;
    the journal took ``localhost/abs/path`` relative to the working directory, found no file
    there, and so never recorded an identity: no check ever ran."""
    path = tmp_path / "journal.db"
    journal = make_journal(f"sqlite:///file://localhost{path}?uri=true")
    async with asyncio.timeout(30):
        seq = await _settle(journal, "acct")
        os.replace(_backup(path, tmp_path / "backup.sqlite"), path)
        with pytest.raises(DatabaseFileReplaced):
            await journal.persist("acct", batch("acct", seq, 1))


_WAL_WRITER = textwrap.dedent(
    """
    import asyncio, os, sys
    from casty import PersistedEvent
    from casty_sa import JournalError, SAJournal

    async def main(url, go, first):
        async with SAJournal(url) as journal:  # start(): a pooled connection opens the -wal
            for seq in range(1, first):
                await journal.persist("acct", [PersistedEvent(seq, f"e{seq}", 1.0)])
            print("ready", flush=True)
            while not os.path.exists(go):
                await asyncio.sleep(0.01)
            for seq in range(first, first + 6):
                try:
                    await journal.persist("acct", [PersistedEvent(seq, f"e{seq}", 1.0)])
                    print("acked", seq, flush=True)
                except JournalError as exc:
                    print("failed", seq, type(exc).__name__, str(exc).replace("\\n", " "),
                          flush=True)
            print("done", flush=True)
            await asyncio.sleep(60)

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


@pytest.mark.parametrize("first", [4, 1], ids=["after-three-writes", "before-the-first-write"])
async def test_writes_after_the_wal_file_is_deleted_are_not_acknowledged_and_lost(
    tmp_path: Path, first: int
) -> None:
    """The ``-wal`` file deleted under a running journal (a clean-up script, ``rm
    journal.db-*``): the journal's connections would keep appending to the unlinked WAL
    and a node killed before a checkpoint would lose every write acknowledged since. The
    journal never read (the reader it opens after its first write keeps the -wal). Deleted
    before the first write, the ``-wal`` is the one the schema check's pooled connection opened
    at ``start()``: each connection records the ``-wal`` it opened, so that is caught too.
    ``first``: the sequence number of the first write after the deletion."""
    path = tmp_path / "journal.db"
    url = sqlite_url(path)
    await casty_sa.upgrade(url)
    script, go = tmp_path / "writer.py", tmp_path / "go"
    script.write_text(_WAL_WRITER)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), url, str(go), str(first), stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    acked: list[int] = []
    failures: list[list[str]] = []
    try:
        async with asyncio.timeout(60):
            assert (await proc.stdout.readline()).decode().strip() == "ready"
            os.unlink(f"{path}-wal")
            go.touch()
            while (line := (await proc.stdout.readline()).decode().split()) != ["done"]:
                assert line, "the writer ended early"
                if line[0] == "acked":
                    acked.append(int(line[1]))
                else:
                    failures.append(line)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)  # the node dies before any checkpoint
        await proc.wait()
    async with asyncio.timeout(60), SAJournal(url) as journal:
        stored = {event.sequence_nr for event in await journal.load("acct")}
    lost = sorted(set(acked) - stored)
    assert not lost, f"acknowledged after the -wal was deleted, then lost: {lost}"
    assert acked == [], acked
    message = " ".join(failures[0])
    assert failures[0][:3] == ["failed", str(first), "DatabaseFileReplaced"], failures[0]
    assert "lost its write-ahead log" in message, message
    # committed into the unlinked log (and says so), or refused at a new connection's open
    assert f"NOT durably stored at {path}" in message or "before anything was sent" in message
    assert all(f[2] == "DatabaseFileReplaced" for f in failures), failures


def _checkpoint_truncate(path: Path) -> int:
    """``PRAGMA wal_checkpoint(TRUNCATE)`` from another connection; the -wal's size after."""
    with contextlib.closing(sqlite3.connect(path)) as other:
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return Path(f"{path}-wal").stat().st_size


async def test_the_wal_check_has_no_false_positives(
    tmp_path: Path, make_journal: Callable[..., SAJournal]
) -> None:
    """What SQLite itself does to the ``-wal`` is not tampering: pool connections closed and
    reopened (the shared reader keeps the -wal, so SQLite never deletes it), a checkpoint
    that truncates it from another connection and process, many writes past the automatic
    checkpoint, and a second journal (another node's process) opening and closing the file."""
    path = tmp_path / "journal.db"
    journal = make_journal(sqlite_url(path), pool_size=2)
    async with asyncio.timeout(60):
        await journal.persist("acct", batch("acct", 1, 1))
        seq = 2
        for round_ in range(4):
            await journal.engine.dispose()  # every pooled connection closed, new ones opened
            assert _checkpoint_truncate(path) == 0  # the -wal truncated, not deleted
            # writes of ~4 KiB pages: past SQLite's automatic checkpoint (1000 pages)
            big = [PersistedEvent(seq + k, b"x" * 8000, 1.0) for k in range(150)]
            await journal.persist(f"big{round_}", big)
            calls = [journal.persist(f"e{k}", batch(f"e{k}", round_ + 1, 1)) for k in range(50)]
            await asyncio.gather(*calls)
            other_journal = SAJournal(sqlite_url(path))
            try:
                await other_journal.persist("other", batch("other", round_ + 1, 1))
            finally:
                await other_journal.close()
            await journal.persist("acct", batch("acct", seq, 1))
            seq += 1
        assert [e.sequence_nr for e in await journal.load("acct")] == list(range(1, seq))


async def test_a_file_replaced_before_the_journal_first_connects_is_not_called_replaced(
    tmp_path: Path, make_journal: Callable[..., SAJournal]
) -> None:
    """An application builds its journal at start-up, then puts a restored or imported file
    at the path (``casty-sa import`` into a new file, then ``mv``): the journal never opened
    the old file, so the new one is simply the file it opens."""
    path, fresh = tmp_path / "journal.db", tmp_path / "imported.db"
    await casty_sa.upgrade(sqlite_url(path))
    await casty_sa.upgrade(sqlite_url(fresh))
    journal = make_journal(sqlite_url(path))
    os.replace(fresh, path)
    async with asyncio.timeout(60):
        await journal.persist("acct", [PersistedEvent(1, "opened", 1.0)])
        assert [e.event for e in await journal.load("acct")] == ["opened"]


# -- reads never take the write lock -----------------------------------------------------------


@contextlib.contextmanager
def another_writer_holding_the_lock(path: Path) -> Iterator[None]:
    """Another connection holds the file's write lock (``BEGIN IMMEDIATE``, a row inserted)."""
    locked, release = threading.Event(), threading.Event()

    def hold_write_lock() -> None:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute(_OTHER_APP_ROW)
            locked.set()
            release.wait(30)
            other.execute("ROLLBACK")
        finally:
            other.close()

    holder = threading.Thread(target=hold_write_lock, daemon=True)
    holder.start()
    try:
        assert locked.wait(10), "the other writer did not get the lock"
        yield
    finally:
        release.set()
        holder.join(30)


async def test_a_fresh_journals_first_read_does_not_wait_for_another_writer(
    tmp_path: Path, make_journal: Callable[..., SAJournal]
) -> None:
    path = tmp_path / "busy.db"
    seed = SAJournal(sqlite_url(path))
    await seed.persist("acct", batch("acct", 1, 3))
    await seed.save_snapshot("acct", Snapshot(3, "s", 1.0))
    await seed.close()
    with another_writer_holding_the_lock(path):
        journal = make_journal(sqlite_url(path), busy_timeout=1.0)
        started = time.monotonic()
        events = await asyncio.wait_for(journal.load("acct"), 10)
        snapshot = await asyncio.wait_for(journal.load_snapshot("acct"), 10)
        assert time.monotonic() - started < 0.5, "the first read waited for the writer"
        assert [e.sequence_nr for e in events] == [1, 2, 3]
        assert snapshot == Snapshot(3, "s", 1.0)
    await journal.persist("acct", batch("acct", 4, 1))  # writes work once the lock is free


@pytest.mark.parametrize(
    "command",
    [["check"], ["current"], ["inspect"], ["inspect", "acct"], ["export", "--to", "{out}"]],
    ids=["check", "current", "inspect", "inspect-entity", "export"],
)
def test_commands_that_only_read_do_not_wait_for_another_writer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    from casty_sa.cli import ExitCode, main

    path = tmp_path / "busy.db"

    async def seed() -> None:
        async with SAJournal(sqlite_url(path)) as journal:
            await journal.persist("acct", batch("acct", 1, 3))

    asyncio.run(seed())
    argv = [arg.format(out=tmp_path / "out.db") for arg in command]
    with another_writer_holding_the_lock(path):
        # the default busy timeout is 5 s: a read that took the write lock would wait that
        # long, then fail with "database is locked"
        started = time.monotonic()
        code = main([*argv, "--url", sqlite_url(path)])
        elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    assert code == ExitCode.OK, err
    assert elapsed < 2.5, f"casty-sa {' '.join(argv)} waited {elapsed:.1f}s for the writer"
    if command[0] == "export":
        assert "3 copied" in out or "3 events" in out, out


async def test_migrate_current_does_not_wait_for_another_writer(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    await casty_sa.upgrade(sqlite_url(path))
    with another_writer_holding_the_lock(path):
        started = time.monotonic()
        revision = await asyncio.wait_for(casty_sa.current(sqlite_url(path)), 10)
        assert time.monotonic() - started < 2.5, "current() waited for the writer"
    assert revision == casty_sa.head_revision()


# -- the shared reader connection --------------------------------------------------------------


async def test_reads_arriving_together_share_one_attempt_to_open_the_reader(
    tmp_path: Path, make_journal: Callable[..., SAJournal]
) -> None:
    """Reads that come while the shared reader connection is being opened share that
    attempt: when it fails (here the pool has no connection to give within pool_timeout),
    they fail together, not one attempt after another (1x the timeout, not Nx)."""
    timeout = 1.0
    journal = make_journal(
        sqlite_url(tmp_path / "j.db"), pool_size=1, max_overflow=0, pool_timeout=timeout
    )
    await journal.start()
    holder = await journal.engine.connect()  # someone else holds the only connection
    await holder.exec_driver_sql("SELECT 1")
    started = time.monotonic()

    async def read(i: int) -> float:
        with pytest.raises(DatabaseUnavailable, match=r"timed out|QueuePool limit"):
            if i % 2:
                await journal.load(f"e{i}")
            else:
                await journal.load_snapshot(f"e{i}")
        return time.monotonic() - started

    try:
        failed_at = await asyncio.wait_for(asyncio.gather(*(read(i) for i in range(64))), 30)
    finally:
        await holder.close()
    assert max(failed_at) < 1.6 * timeout, sorted(failed_at)
    # the connection is back in the pool: the next read opens the reader and works
    assert await asyncio.wait_for(journal.load("e1"), 10) == []


# -- a payload over SQLite's length limit ------------------------------------------------------

LIMIT = 100_000


def _lower_length_limit(journal: SAJournal, limit: int) -> None:
    """Every connection of the journal gets SQLITE_LIMIT_LENGTH = ``limit``."""

    @event.listens_for(journal.engine.sync_engine, "connect")
    def _limit(dbapi_connection: Any, _record: Any) -> None:
        # aiosqlite's sqlite3 connection, shared across threads by SQLAlchemy's dialect
        dbapi_connection._connection._conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, limit)


@pytest.mark.parametrize("size", [LIMIT + 1, LIMIT], ids=["payload-over", "row-over"])
async def test_a_payload_over_the_blob_limit_is_that_callers_refusal_alone(
    tmp_path: Path, make_journal: Callable[..., SAJournal], size: int
) -> None:
    """``row-over``: the payload fits the limit but its row does not, which only SQLite
    itself can tell (``string or blob too big`` while inserting)."""
    journal = make_journal(sqlite_url(tmp_path / "limit.db"), serialize=bytes, deserialize=bytes)
    _lower_length_limit(journal, LIMIT)
    await journal.start()
    neighbours = [f"n{k}" for k in range(6)]
    calls = [journal.persist("big", [PersistedEvent(1, b"\x01" * size, 1.0)])]
    calls += [journal.persist(n, [PersistedEvent(1, n.encode(), 1.0)]) for n in neighbours]
    calls.append(journal.save_snapshot("snap", Snapshot(1, b"\x02" * size, 1.0)))
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 30)
    big, *others, snap = results
    for refused in (big, snap):
        assert isinstance(refused, InvalidEventError), refused
        assert "SQLITE_LIMIT_LENGTH" in str(refused) and f"{LIMIT:,}" in str(refused)
        assert "nothing was stored" in str(refused)
    assert others == [None] * len(neighbours)
    for n in neighbours:
        assert [e.event for e in await journal.load(n)] == [n.encode()]
    assert await journal.load("big") == []
    assert await journal.load_snapshot("snap") is None
    await journal.persist("big", [PersistedEvent(1, b"\x01" * 1000, 1.0)])  # a smaller one fits
