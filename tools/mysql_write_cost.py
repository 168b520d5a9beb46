"""W1-W4 on MySQL/MariaDB: casty-sa against raw asyncmy, side by side, repeated.

Usage: ``python tools/mysql_write_cost.py PORT [REPS] [--no-counter]`` (root without
password on 127.0.0.1; it creates and drops databases ``b_*``). Each repetition runs
raw asyncmy and casty-sa one after the other on fresh databases, so both meet the same
machine; the ratios are printed per repetition, then their range.

The workloads are the benchmark's (``benchmarks/workloads.py``) at its default sizes:
W1 2,000 sequential persists of one event; W2 200 entities at once, 20 persists each;
W3 200 persists of 100 events; W4 a replay of 20,000 events (and 10 loads of the last
1,000). Raw asyncmy: a pool of 10 autocommit connections, one ``INSERT`` (one commit)
per persist, positions from a client counter (no lock: the baseline pays nothing for
the read side's order). ``--no-counter`` also runs casty-sa with positions from
``UUID_SHORT()`` instead of the counter: unsafe for readers, to measure the counter.
"""

from __future__ import annotations

import asyncio
import itertools
import pickle
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

import asyncmy  # type: ignore[import-untyped,unused-ignore]
from casty import PersistedEvent

import casty_sa
from casty_sa import SAJournal

W1, W2_ENTITIES, W2_PERSISTS, W3, W3_BATCH, W4, W4_TAIL, W4_CALLS = (
    2000, 200, 20, 200, 100, 20_000, 1_000, 10,
)  # fmt: skip
PAYLOAD = "event-payload-" * 3
_INSERT = (
    "INSERT INTO casty_sa_events (entity_id, sequence_nr, timestamp, payload, event_type,"
    " era, transaction_id, position) VALUES (%s, %s, %s, %s, %s, 0, 0, %s)"
)
_SELECT = (
    "SELECT sequence_nr, payload, timestamp FROM casty_sa_events "
    "WHERE entity_id = %s AND sequence_nr >= %s ORDER BY sequence_nr"
)
_NO_COUNTER = (
    "DO LAST_INSERT_ID(0); SELECT LAST_INSERT_ID((UUID_SHORT() & 0xffffffffff) * 100000 + %s)"
)

Persist = Callable[[str, list[PersistedEvent[Any]]], Awaitable[None]]
Load = Callable[[str, int], Awaitable[list[Any]]]


class Raw:
    """A minimal asyncmy journal: 10 autocommit connections, one commit per persist."""

    def __init__(self, port: int, database: str) -> None:
        self.port, self.database = port, database
        self.pool: asyncio.Queue[Any] = asyncio.Queue()
        self.positions: Iterator[int] = itertools.count(1)

    async def open(self) -> None:
        for _ in range(10):
            conn = await asyncmy.connect(
                host="127.0.0.1", port=self.port, user="root", db=self.database, autocommit=True
            )
            self.pool.put_nowait(conn)

    def close(self) -> None:
        while not self.pool.empty():
            self.pool.get_nowait().close()

    async def persist(self, entity_id: str, events: list[PersistedEvent[Any]]) -> None:
        positions = self.positions
        rows = [
            (entity_id, e.sequence_nr, e.timestamp, pickle.dumps(e.event), "str", next(positions))
            for e in events
        ]
        conn = await self.pool.get()
        try:
            async with conn.cursor() as cursor:
                if len(rows) == 1:
                    await cursor.execute(_INSERT, rows[0])
                else:
                    await cursor.executemany(_INSERT, rows)  # one multi-row INSERT
        finally:
            self.pool.put_nowait(conn)

    async def load(self, entity_id: str, from_nr: int) -> list[Any]:
        conn = await self.pool.get()
        try:
            async with conn.cursor() as cursor:
                await cursor.execute(_SELECT, (entity_id, from_nr))
                rows = await cursor.fetchall()
        finally:
            self.pool.put_nowait(conn)
        return [PersistedEvent(seq, pickle.loads(payload), ts) for seq, payload, ts in rows]


async def admin(port: int, *statements: str) -> None:
    conn = await asyncmy.connect(host="127.0.0.1", port=port, user="root", autocommit=True)
    async with conn.cursor() as cursor:
        for statement in statements:
            await cursor.execute(statement)
    conn.close()


async def fresh(port: int, name: str) -> str:
    await admin(port, f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}")
    url = f"mysql://root@127.0.0.1:{port}/{name}"
    await casty_sa.upgrade(url)
    return url


def ev(seq: int) -> PersistedEvent[Any]:
    return PersistedEvent(seq, PAYLOAD, time.time())


async def workloads(persist: Persist, load: Load) -> dict[str, float]:
    """events/s of W1, W2, W3, W4 all and W4 tail through ``persist`` and ``load``."""
    clock = time.perf_counter
    rates: dict[str, float] = {}
    start = clock()
    for seq in range(1, W1 + 1):
        await persist("w1", [ev(seq)])
    rates["W1"] = W1 / (clock() - start)

    async def writer(entity: str) -> None:
        for seq in range(1, W2_PERSISTS + 1):
            await persist(entity, [ev(seq)])

    start = clock()
    await asyncio.gather(*(writer(f"w2-{i:05d}") for i in range(W2_ENTITIES)))
    rates["W2"] = W2_ENTITIES * W2_PERSISTS / (clock() - start)
    start = clock()
    for first in range(1, W3 * W3_BATCH + 1, W3_BATCH):
        await persist("w3", [ev(seq) for seq in range(first, first + W3_BATCH)])
    rates["W3"] = W3 * W3_BATCH / (clock() - start)
    for first in range(1, W4 + 1, 1000):
        await persist("w4", [ev(seq) for seq in range(first, first + 1000)])
    start = clock()
    assert len(await load("w4", 0)) == W4
    rates["W4 all"] = W4 / (clock() - start)
    start = clock()
    for _ in range(W4_CALLS):
        assert len(await load("w4", W4 - W4_TAIL + 1)) == W4_TAIL
    rates["W4 tail"] = W4_TAIL * W4_CALLS / (clock() - start)
    return rates


async def raw(port: int, name: str) -> dict[str, float]:
    await fresh(port, name)
    journal = Raw(port, name)
    await journal.open()
    try:
        return await workloads(journal.persist, journal.load)
    finally:
        journal.close()


async def sa(port: int, name: str, *, counter: bool = True) -> dict[str, float]:
    journal = SAJournal(await fresh(port, name))
    await journal.start()
    if not counter:
        cast(Any, journal)._backend._take = _NO_COUNTER

    async def load(entity_id: str, from_nr: int) -> list[Any]:
        return list(await journal.load(entity_id, from_nr))

    try:
        return await workloads(journal.persist, load)
    finally:
        await journal.close()


async def main(port: int, reps: int, no_counter: bool) -> None:
    ratios: dict[str, list[float]] = {}
    for rep in range(1, reps + 1):
        base = await raw(port, "b_raw")
        ours = await sa(port, "b_sa")
        line = []
        for key, rate in ours.items():
            ratios.setdefault(key, []).append(rate / base[key])
            line.append(f"{key} {base[key]:,.0f} -> {rate:,.0f} ({rate / base[key]:.2f}x)")
        if no_counter:
            bare = await sa(port, "b_sa_bare", counter=False)
            line.append(f"[no counter: W1 {bare['W1']:,.0f}, W2 {bare['W2']:,.0f}]")
        print(f"rep {rep}: raw asyncmy -> casty-sa events/s: " + "; ".join(line), flush=True)
    print("casty-sa / raw asyncmy:", end=" ")
    print("; ".join(f"{key} {min(r):.2f}-{max(r):.2f}x" for key, r in ratios.items()))


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if not a.startswith("--")]
    asyncio.run(
        main(
            int(arguments[0]),
            int(arguments[1]) if len(arguments) > 1 else 1,
            "--no-counter" in sys.argv,
        )
    )
