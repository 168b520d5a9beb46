"""The SQLite file under a journal: does its path still name the file the journal opened?

SQLite connections keep the file they opened. Once it is deleted or replaced (a
backup restored over it), or its ``-wal`` is, their commits go into a file no
later process will open, so an acknowledgement would be a lie.
:class:`DatabaseFile` records the identity (device, inode) of the file and its
``-wal`` as connections open them, checks them after every write and after a
failed read (one ``stat`` of the directory while it is unchanged), and from the
first change on refuses every call::

    watched = DatabaseFile(engine.url.database, track_wal=True)
    watched.watch(engine.sync_engine)  # record what each new connection opens
    ...
    watched.check(None, (len(events), len(snapshots)))  # after a write: still there?
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine, event

from casty_sa.errors import DatabaseFileReplaced

__all__ = ["DatabaseFile", "insert_numbered_and_look", "run_and_look"]

#: key of a pooled SQLite connection's info: (device, inode) of the file it opened
_FILE = "casty_sa_file"
#: key of a pooled SQLite connection's info: (device, inode) of the -wal it opened
_WAL_FILE = "casty_sa_wal"

#: How the file at the journal's path changed when it is another file now.
_REPLACED = "was replaced by another file"
#: How it changed when its -wal file was deleted or replaced under the journal's connections.
_WAL_LOST = (
    "lost its write-ahead log (the -wal file beside it was deleted or replaced by another file)"
)
_RESTART = (
    "Every call of this journal fails from now on: restart the node, so it opens the file "
    "now at the path (events written into the old file after it was removed are not there)"
)

#: identity of a file: (device, inode)
FileId = tuple[int, int]


class DatabaseFile:
    """The file at a SQLite URL's path, and the ``-wal`` beside it, as the journal opened them.

    Parameters
    ----------
    database : str | None
        The URL's database (a path or a ``file:`` URI); ``None`` for a memory
        database, which has no file: every check passes.
    track_wal : bool
        Record the ``-wal`` each new connection opened, so its commits can be
        checked from its first one on (casty-sa's own file engines, whose
        connections hold the ``-wal`` open: see :meth:`_wal_changed`).
    """

    def __init__(self, database: str | None, *, track_wal: bool) -> None:
        self.path = _sqlite_path(database)
        self._track_wal = track_wal
        # the file's identity, checked after every write and after a failed read (see
        # check): recorded when the first connection opens it, since the file at the path
        # before then is not one the journal opened
        self._identity: FileId | None = None
        # the -wal file's identity, recorded when the shared reader opens (see _wal_changed)
        self._wal_identity: FileId | None = None
        #: where SQLite keeps the -wal: beside the file it opened, symbolic links resolved
        #: (set again when the first connection opens the file)
        self._wal_path = f"{self.path}-wal"
        self._folder = os.path.dirname(self.path) if self.path is not None else ""
        #: the directory (device, inode, ctime) and writer's -wal when both files were last
        #: found in place: see changed
        self._folder_seen: tuple[Any, ...] | None = None
        self._gone: str | None = None

    def watch(self, engine: Engine) -> None:
        """Record the file each new connection of ``engine`` opens; open none once it is gone."""
        if self.path is not None:
            event.listen(engine, "do_connect", self._refuse_other_file)
            event.listen(engine, "connect", self._note_file)

    def unwatch(self, engine: Engine) -> None:
        if self.path is not None:
            for name, listener in (
                ("do_connect", self._refuse_other_file),
                ("connect", self._note_file),
            ):
                if event.contains(engine, name, listener):
                    event.remove(engine, name, listener)

    def check_kept(self) -> None:
        """Refuse at once once the file was found replaced: every connection has the old one."""
        if self._gone is not None:
            raise DatabaseFileReplaced(
                f"{self._gone}; this call was refused and nothing of it was stored. {_RESTART}"
            )

    def on_other_file(self, fairy: Any) -> bool:
        """Whether a connection opened a file other than the journal's (one at the path later)."""
        opened: FileId | None = fairy.info.get(_FILE, self._identity)
        return opened != self._identity

    def unsent(self, events: int, snapshots: int) -> DatabaseFileReplaced:
        """The error of a write refused since its connection opened another file."""
        return self._fail(
            self.changed() or _REPLACED,
            f"this write ({events} events and {snapshots} snapshots) was not sent; nothing "
            f"of it is stored at {self.path}",
        )

    @staticmethod
    def wal_of(fairy: Any) -> FileId | None:
        """The ``-wal`` a connection has held open since it connected, if recorded."""
        return fairy.info.get(_WAL_FILE)  # type: ignore[no-any-return]

    def note_wal(self) -> None:
        """Record the ``-wal`` a connection just opened that stays open (the shared reader)."""
        # its connection opened the -wal (the connect-time journal_mode pragma reads the
        # file), and SQLite keeps that -wal while any connection is open
        if self.path is not None and self._identity is not None:
            try:
                self._wal_identity = _stat(self._wal_path)
            except OSError:
                self._wal_identity = None

    def forget_wal(self) -> None:
        """The connection :meth:`note_wal` recorded for is closed."""
        self._wal_identity = None

    def changed(self, wal: FileId | None = None) -> str | None:
        """How the path stopped naming the file the journal opened, if it did (one ``stat``).

        ``wal``: the ``-wal`` a writer's connection opened (see :meth:`_wal_changed`).
        """
        if self.path is None:
            return None
        if self._identity is None:
            return None  # not opened yet: whatever file is at the path is the one it will open
        # Deleting, renaming or creating a file changes its directory's ctime (so does
        # setting its times back, as a restore with rsync -a does; nothing sets ctime
        # itself). While the directory is as it was when both files were last found in
        # place (for this writer's -wal), one stat of it stands for the two of the files.
        try:
            folder = os.stat(self._folder)
        except FileNotFoundError:
            return "was deleted (or its directory removed)"
        except OSError:
            return None  # cannot tell (permissions): the statements themselves will say
        seen = (folder.st_dev, folder.st_ino, folder.st_ctime_ns, wal)
        if seen == self._folder_seen:
            return None
        try:
            identity = _stat(self.path)
        except OSError:
            return None
        if identity is None:
            return "was deleted (or its directory removed)"
        if identity != self._identity:
            return _REPLACED
        how = self._wal_changed(wal)
        # a path that is a symbolic link names an entry of another directory (and its -wal
        # is there too), whose changes leave this one's ctime alone: no shortcut for it
        if how is None and _settled(folder.st_ctime_ns) and not os.path.islink(self.path):
            self._folder_seen = seen
        return how

    def check(
        self,
        failure: Exception | None,
        written: tuple[int, int] | None,
        how: str | None = None,
    ) -> None:
        """Before a call is answered: is the file still at its path? (One ``stat``.)

        ``written``: the events and snapshots of a write, None for a read.
        Connections keep the file they opened. Once it is deleted or replaced (a
        backup restored over it), their commits go into a file no later process
        will open, so an acknowledgement would be a lie. From then on every call
        fails: opening new connections would silently start a new, empty journal
        at the path.
        """
        if isinstance(failure, DatabaseFileReplaced):
            return  # the failure already says so
        self.check_kept()
        how = how or self.changed()
        if how is None:
            return
        if written is None:
            what, done = "this read", "failed"
        else:
            what = f"this write ({written[0]} events and {written[1]} snapshots)"
            done = (
                "was committed into the old file, which the path no longer names and no "
                f"later process will open: it is NOT stored at {self.path}"
            )
            if how == _WAL_LOST:
                done = (
                    "was committed into that deleted write-ahead log, which no later process "
                    f"will read: it is NOT durably stored at {self.path} (a crash loses it)"
                )
        if failure is not None:
            done = f"failed ({type(failure).__name__}: {failure})"
            if written is not None:
                done += f"; nothing of it is stored at {self.path}"
        raise self._fail(how, f"{what} {done}") from failure

    def _refuse_other_file(self, *_args: Any) -> None:
        """Open no new connection once the file is gone: SQLite would create an empty one."""
        self.check_kept()
        if self._identity is not None and (how := self.changed()) is not None:
            raise self._fail(how, "this call was refused before anything was sent")

    def _note_file(self, _dbapi_connection: Any, record: Any) -> None:
        """Record the file a new connection opened (the journal's, unless it was replaced)."""
        try:
            identity = None if self.path is None else _stat(self.path)
        except OSError:
            return  # cannot tell (permissions): the statements themselves will say
        if identity is None:
            return
        if self._identity is None:
            self._identity = identity  # the first connection: the file the journal opened
            # SQLite names the -wal after the file's real path: a path that is a symbolic
            # link has its -wal beside the link's target, not beside the link
            self._wal_path = f"{os.path.realpath(str(self.path))}-wal"
        record.info[_FILE] = identity
        if self._track_wal:
            # the -wal it opened (the connect-time journal_mode pragma ran before this
            # listener): SQLite keeps it while this connection is open, so the connection's
            # commits can be checked from its first one on, not only once the shared
            # reader is open (the schema check's connection holds the -wal from start())
            with contextlib.suppress(OSError):
                record.info[_WAL_FILE] = _stat(self._wal_path)

    def _wal_changed(self, wal: FileId | None = None) -> str | None:
        """Whether the ``-wal`` file the journal writes into is gone from beside the file.

        SQLite itself deletes the ``-wal`` when the last connection to the database
        closes (and the next one creates a new file), so a missing or different
        ``-wal`` only means tampering while a connection has stayed open since its
        identity was recorded: the shared reader, kept from the start until
        ``close()`` (its replacement records the identity anew), or the writer's
        connection, whose ``-wal`` is ``wal`` (recorded when it connected, so a
        ``-wal`` deleted before the shared reader opens is caught too). Without a
        shared reader (an application's engine) there is no such record, and no
        check. A checkpoint truncates the file in place, which keeps its identity.
        """
        expected = wal if wal is not None else self._wal_identity
        if expected is None or self.path is None:
            return None
        try:
            found = _stat(self._wal_path)
        except OSError:
            return None
        return None if found == expected else _WAL_LOST

    def _fail(self, how: str, outcome: str) -> DatabaseFileReplaced:
        """The error for the call that found the file gone; every later call fails too."""
        old = "deleted write-ahead log" if how == _WAL_LOST else "old file"
        self._gone = (
            f"the SQLite file {self.path} that this journal opened {how} while the journal "
            f"was running. The journal's connections still write to the {old}"
        )
        return DatabaseFileReplaced(f"{self._gone}; {outcome}. {_RESTART}")


def run_and_look(
    connection: sqlite3.Connection,
    sql: str,
    params: Sequence[Any],
    look: Callable[[FileId | None], str | None],
    wal: FileId | None,
) -> str | None:
    """On the driver's thread: run ``sql`` (which commits), then ``look`` at the file."""
    connection.execute(sql, params).close()
    return look(wal)


def insert_numbered_and_look(
    connection: sqlite3.Connection,
    sql: str,
    highest: str,
    rows: Sequence[Sequence[Any]],
    committing: list[bool],
    look: Callable[[FileId | None], str | None],
    wal: FileId | None,
) -> str | None:
    """On the driver's thread: ``rows`` with the next positions, in one transaction; then
    ``look`` at the file.

    ``sql`` inserts the rows with their positions bound (the last value of each);
    ``highest`` reads the highest stored position, inside the transaction, where no
    other writer can come in. ``committing[0]`` turns true when the ``COMMIT`` is sent:
    before that, a failure rolled everything back.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        top = connection.execute(highest).fetchone()[0]
        values = [value for k, row in enumerate(rows, top + 1) for value in (*row, k)]
        connection.execute(sql, values).close()
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")
        raise
    committing[0] = True
    try:
        connection.execute("COMMIT")
    except BaseException:
        # a COMMIT that failed before committing leaves the transaction open
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")
        raise
    return look(wal)


def _settled(ctime_ns: int) -> bool:
    """Whether a directory's next change is sure to move its ctime past ``ctime_ns``.

    File systems that keep sub-millisecond digits (ext4, xfs, btrfs, tmpfs) stamp
    times at a clock tick of a few milliseconds: a change within the same tick
    leaves the time where it was, so it is trusted only once the tick is over.
    Coarser stamps (whole milliseconds, seconds, FAT's two seconds, and FAT's
    root directory, which it never stamps at all) are never trusted: there the
    journal looks at both files every time.
    """
    return ctime_ns % 1_000_000 != 0 and time.time_ns() - ctime_ns > 50_000_000


def _stat(path: str) -> FileId | None:
    """(device, inode) of the file at ``path``; None when there is none."""
    try:
        found = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (found.st_dev, found.st_ino)


def _sqlite_path(database: str | None) -> str | None:
    """The absolute path of a SQLite URL's file (``file:`` URIs included), if it has one."""
    if not database:
        return None
    if database.startswith("file:"):
        # the query and the fragment are not part of the name
        database = database[len("file:") :].partition("?")[0].partition("#")[0]
        if database.startswith("//"):  # file:///abs/path, file://localhost/abs/path
            authority, slash, rest = database[2:].partition("/")
            database = slash + rest if authority.lower() in ("", "localhost") else database
    return os.path.abspath(database) if database else None
