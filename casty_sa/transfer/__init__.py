"""Copy journals between casty's own ``SqliteJournal`` file and a casty-sa database.

``casty-sa import`` and ``casty-sa export`` run on these functions. A copy
reads the source in key order (entity id, then sequence number), writes it to
the target in batches (one transaction per batch, Core inserts), and then
verifies by content: every source event and snapshot is looked up in the
target by its key, and its payload bytes and timestamp (bit for bit) must be
equal.

A copy never mixes two histories. An entity both sides hold must be proven,
before anything is written, to be one history; the proof is by content only
(payloads are never decoded), so the copy is refused, leaving the target
untouched, unless all of these hold for the entity:

1. every key both sides hold has the same content: an event's payload bytes
   and timestamp, a snapshot's at the same position (another history under
   the same keys: the application ran on the new tables already, or the files
   of two ``local`` nodes were imported one after the other);
2. every event the target holds at or below the source's highest position
   (its last event or its snapshot, whichever is higher) is one of the
   source's events: one the source lacks there cannot be compared (a source
   that starts from a snapshot cannot vouch for the events before it). The
   target's events above that position are its own later history;
3. a target snapshot is the source's own (same position, same content), or
   the target holds every event up to it (from its first, at 1 or below),
   which rule 2 ties to the source: otherwise it may summarize another
   history, and recovery would apply the source's events on top of it;
4. at least one row was compared and found equal: two sides with nothing in
   common are not proven one history.

A source snapshot needs no such proof: it summarizes the source's own events,
and rule 2 makes the target's events below it the source's. So a rerun of the
same copy (also after a crash half-way, when the target holds a prefix of the
source's events), a target that ran on (more events, a newer snapshot), and a
source that ran on since an earlier copy are all accepted.

casty's file format stores timestamps in a ``REAL`` column, which cannot hold
the sign of zero: when a casty file is one side, timestamps are compared as
the file can hold them (``-0.0`` equals ``0.0``, every other bit is compared),
and the report counts those timestamps (``zero_signs_lost``).

A copy is idempotent and resumable: an event whose key the target already
holds (with the same content) is left alone, a snapshot replaces the target's only
when its sequence number is higher, and an entity whose events the target
holds as an unbroken run is skipped up to that run's end without being sent.
A rerun after a crash or Ctrl-C therefore copies only what is missing.

Payloads are copied as the bytes the serializer produced; nothing is decoded.
Both journals default to pickle; a source written with a custom serializer
needs an ``SAJournal`` configured with the same ``deserialize``.

The modules: ``values`` (rows, statistics, the report), ``endpoint`` (what a side offers),
``casty_file`` and ``database`` (the two sides), ``sqlite_paths`` (refusing a missing
SQLite file), ``compare`` (rule 1, and the verification), ``history`` (rules 2 to 4, entity
ids), ``copying`` (the copy), ``directions`` (import and export).

Examples
--------
>>> import asyncio, pathlib, tempfile
>>> from casty import PersistedEvent, SqliteJournal
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> old = SqliteJournal(folder / "casty.db")
>>> asyncio.run(old.persist("acct-1", [PersistedEvent(1, "opened", 1.5)]))
>>> old.close()
>>> report = asyncio.run(import_casty_file(folder / "casty.db", f"sqlite:///{folder}/sa.db"))
>>> (report.events_copied, report.verified)
(1, True)
>>> asyncio.run(import_casty_file(folder / "casty.db", f"sqlite:///{folder}/sa.db")).events_copied
0
"""

from __future__ import annotations

from casty_sa.transfer.casty_file import CastyFile, JournalFileError
from casty_sa.transfer.copying import copy_journal
from casty_sa.transfer.database import JournalDatabase
from casty_sa.transfer.directions import export_casty_file, import_casty_file
from casty_sa.transfer.endpoint import Endpoint
from casty_sa.transfer.sqlite_paths import missing_sqlite_file, require_existing_database
from casty_sa.transfer.values import (
    DEFAULT_BATCH_SIZE,
    MAX_REPORTED_MISMATCHES,
    EntityStats,
    JournalStats,
    Mismatch,
    Progress,
    ProgressCallback,
    Row,
    TransferReport,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "MAX_REPORTED_MISMATCHES",
    "CastyFile",
    "Endpoint",
    "EntityStats",
    "JournalDatabase",
    "JournalFileError",
    "JournalStats",
    "Mismatch",
    "Progress",
    "ProgressCallback",
    "Row",
    "TransferReport",
    "copy_journal",
    "export_casty_file",
    "import_casty_file",
    "missing_sqlite_file",
    "require_existing_database",
]
