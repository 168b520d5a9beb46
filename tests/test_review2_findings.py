"""Second adversarial review of issue 10: reproductions of the defects it found.

Each test fails on the code it was written against and names the defect in its docstring.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import casty_sa
from casty_sa import SAJournal


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


_STARTED_THEN_WRITES = textwrap.dedent(
    """
    import asyncio, os, sys
    from casty import PersistedEvent
    from casty_sa import JournalError, SAJournal

    async def main(url, go):
        journal = SAJournal(url)
        await journal.start()  # the schema check: a pooled connection opens the -wal
        print("ready", flush=True)
        while not os.path.exists(go):
            await asyncio.sleep(0.01)
        for seq in range(1, 5):
            try:
                await journal.persist("acct", [PersistedEvent(seq, f"e{seq}", 1.0)])
                print("acked", seq, flush=True)
            except JournalError as exc:
                print("failed", seq, type(exc).__name__, flush=True)
        print("done", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def test_a_wal_deleted_before_the_first_write_is_not_acknowledged_and_lost(
    tmp_path: Path,
) -> None:
    """Defect: the ``-wal`` identity is recorded only when the shared reader opens, after the
    journal's first write (``SqliteBackend._keep_wal``). The pooled connection of the schema
    check holds the ``-wal`` from ``start()`` on, so a ``-wal`` deleted between ``start()``
    and the first write is missed: the writer commits into the unlinked log, the reader then
    opens a fresh ``-wal`` and records *its* identity, and every later write is acknowledged
    too. A node killed before a checkpoint loses them all."""
    path = tmp_path / "journal.db"
    url = sqlite_url(path)
    await casty_sa.upgrade(url)
    script, go = tmp_path / "writer.py", tmp_path / "go"
    script.write_text(_STARTED_THEN_WRITES)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), url, str(go), stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    acked: list[int] = []
    try:
        async with asyncio.timeout(60):
            assert (await proc.stdout.readline()).decode().strip() == "ready"
            os.unlink(f"{path}-wal")
            go.touch()
            while (line := (await proc.stdout.readline()).decode().split()) != ["done"]:
                assert line, "the writer ended early"
                if line[0] == "acked":
                    acked.append(int(line[1]))
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)  # the node dies before any checkpoint
        await proc.wait()
    async with asyncio.timeout(60), SAJournal(url) as journal:
        stored = {event.sequence_nr for event in await journal.load("acct")}
    lost = sorted(set(acked) - stored)
    assert not lost, f"acknowledged after the -wal was deleted, then lost: {lost}"
