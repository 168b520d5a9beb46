"""M: several writer processes on one PostgreSQL, W2 in each: the aggregate rate.

For each process count (1, 2 and 4), that many fresh Python processes each
open their own ``SAJournal`` on the same database, warm up, and wait; when all
are ready they are told to go at once, and each runs W2 (its own entities,
under a prefix of its own). The rate is every process's events over the time
from the first start to the last finish; p50/p99 are the processes' medians
and worst p99. Each process checks its own entities' events, as W2 does. The
benchmark's own process only waits (the cores are shared with the server).

``python -m benchmarks.writers`` is the writer process itself: it reads the
database URL from ``CASTY_SA_BENCH_WRITER_URL`` (never from its command line,
which ``ps`` shows) and prints one JSON line of its figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

from casty_sa import SAJournal

from .base import Row, Sample, Sizes, Workload
from .data import check_events, event_of
from .grown import Prefixed
from .journals import Journal

_ROOT = Path(__file__).resolve().parent.parent
_URL = "CASTY_SA_BENCH_WRITER_URL"


class M(Workload):
    key = "M"
    journals = frozenset({"sa-postgresql"})

    def __init__(self, sizes: Sizes) -> None:
        self.sizes = sizes
        self.counts = sizes.m_processes
        per = sizes.w2_entities * sizes.m_persists
        self.rows = tuple(
            Row(
                f"M{n}",
                "events/s",
                f"{n} writer process{'es' if n > 1 else ''} on one PostgreSQL, each running W2 "
                f"({sizes.m_persists} persists per entity, {per:,} events each), aggregate rate",
            )
            for n in self.counts
        )

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        if not isinstance(journal, SAJournal):
            raise TypeError(f"M runs on casty-sa's journals, not {type(journal).__name__}")
        url = journal.engine.url.render_as_string(hide_password=False)
        return {f"M{n}": await self._processes(url, n) for n in self.counts}

    async def _processes(self, url: str, count: int) -> Sample:
        env = {**os.environ, _URL: url, "PYTHONPATH": str(_ROOT)}
        sizes = [str(self.sizes.w2_entities), str(self.sizes.m_persists)]
        children = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "benchmarks.writers", f"m{count}-{k}/", *sizes,
                env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for k in range(count)
        ]  # fmt: skip
        try:
            for child in children:
                assert child.stdout is not None
                line = await child.stdout.readline()
                if line.strip() != b"ready":
                    raise RuntimeError(f"a writer process did not start: {await _err(child)}")
            for child in children:  # go, all at once
                assert child.stdin is not None
                child.stdin.write(b"go\n")
                await child.stdin.drain()
            results = []
            for child in children:
                out, err = await child.communicate()
                if child.returncode != 0:
                    raise RuntimeError(f"a writer process failed: {err.decode()[-800:]}")
                results.append(json.loads(out))
        finally:
            for child in children:
                if child.returncode is None:
                    child.kill()
                    await child.wait()
        events = sum(r["events"] for r in results)
        elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
        p50 = statistics.median(r["p50_ms"] for r in results)
        return Sample(events / elapsed, p50, max(r["p99_ms"] for r in results))


async def _err(child: asyncio.subprocess.Process) -> str:
    child.kill()
    _, err = await child.communicate()
    return err.decode()[-800:]


async def _write(prefix: str, entities: int, persists: int) -> dict[str, float]:
    """One writer process: W2 under ``prefix``, started when the parent says go."""
    from .workloads import W2

    workload = W2(Sizes(w2_entities=entities, w2_persists=persists))
    async with SAJournal(os.environ[_URL]) as journal:
        await journal.persist(prefix + "warm-up", [event_of(prefix + "warm-up", 1)])
        check_events(prefix + "warm-up", await journal.load(prefix + "warm-up"), 1, 1)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        start = time.monotonic()  # one clock for every process of the machine
        sample = (await workload.measure(Prefixed(journal, prefix)))["W2"]
    count = entities * persists
    return {
        "events": count,
        "start": start,
        "end": start + count / sample.rate,  # the check after the timing is not counted
        "p50_ms": sample.p50_ms or 0.0,
        "p99_ms": sample.p99_ms or 0.0,
    }


if __name__ == "__main__":
    prefix, entities, persists = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(asyncio.run(_write(prefix, entities, persists))), flush=True)
