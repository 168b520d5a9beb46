"""W1/W2 persists on MySQL/MariaDB: casty-sa (with and without the counter) vs raw asyncmy.

Usage: python tools/mysql_write_cost.py PORT   (root without password on 127.0.0.1; it
creates and drops databases b_*). "Without the counter" numbers positions from
UUID_SHORT() instead: unsafe for readers, measurement only.
"""

import asyncio
import pickle
import sys
import time

import asyncmy
from casty import PersistedEvent

import casty_sa
from casty_sa import SAJournal

PORT = int(sys.argv[1])
N1, N2, C2 = 2000, 10000, 200


async def admin(*qs):
    c = await asyncmy.connect(host="127.0.0.1", port=PORT, user="root", autocommit=True)
    async with c.cursor() as cur:
        for q in qs:
            await cur.execute(q)
    c.close()


async def fresh(name):
    await admin(f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}")
    url = f"mysql://root@127.0.0.1:{PORT}/{name}"
    await casty_sa.upgrade(url)
    return url


async def raw(name, n, conc):
    await fresh(name)
    conns = [
        await asyncmy.connect(host="127.0.0.1", port=PORT, user="root", db=name, autocommit=True)
        for _ in range(min(conc, 10))
    ]
    sql = (
        "INSERT INTO casty_sa_events (entity_id, sequence_nr, timestamp, payload, event_type,"
        " era, transaction_id, position) VALUES (%s,%s,%s,%s,%s,0,0,%s)"
    )
    payload = pickle.dumps("event-payload-" * 3)
    counter = iter(range(1, 10**9))
    pool = asyncio.Queue()
    for c in conns:
        pool.put_nowait(c)

    async def one(e, s):
        c = await pool.get()
        try:
            async with c.cursor() as cur:
                await cur.execute(sql, (e, s, time.time(), payload, "str", next(counter)))
        finally:
            pool.put_nowait(c)

    t = time.perf_counter()
    if conc == 1:
        for i in range(n):
            await one(f"e{i % 100}", i // 100 + 1)
    else:

        async def worker(w):
            for i in range(n // conc):
                await one(f"w{w}", i + 1)

        await asyncio.gather(*(worker(w) for w in range(conc)))
    dt = time.perf_counter() - t
    for c in conns:
        c.close()
    return n / dt


async def sa(name, n, conc, counter=True):
    url = await fresh(name)
    j = SAJournal(url)
    await j.start()
    if not counter:
        j._backend._take = (
            "DO LAST_INSERT_ID(0); "
            "SELECT LAST_INSERT_ID((UUID_SHORT() & 0xffffffffff) * 100000 + %s)"
        )
    payload = "event-payload-" * 3
    t = time.perf_counter()
    if conc == 1:
        for i in range(n):
            await j.persist(f"e{i % 100}", [PersistedEvent(i // 100 + 1, payload, time.time())])
    else:

        async def worker(w):
            for i in range(n // conc):
                await j.persist(f"w{w}", [PersistedEvent(i + 1, payload, time.time())])

        await asyncio.gather(*(worker(w) for w in range(conc)))
    dt = time.perf_counter() - t
    await j.close()
    return n / dt


async def main():
    r1 = await raw("b_raw1", N1, 1)
    s1 = await sa("b_sa1", N1, 1)
    s1n = await sa("b_sa1n", N1, 1, counter=False)
    r2 = await raw("b_raw2", N2, C2)
    s2 = await sa("b_sa2", N2, C2)
    s2n = await sa("b_sa2n", N2, C2, counter=False)
    print(f"W1 sequential persists/s: raw asyncmy {r1:,.0f}; casty-sa {s1:,.0f}", end=" ")
    print(f"({s1 / r1:.2f}x); casty-sa without the counter {s1n:,.0f}")
    print(f"W2 {C2} concurrent persists/s: raw asyncmy (10 connections) {r2:,.0f};", end=" ")
    print(f"casty-sa {s2:,.0f} ({s2 / r2:.2f}x); without the counter {s2n:,.0f}")


asyncio.run(main())
