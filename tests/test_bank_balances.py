"""``examples/bank_balances.py``: the bank's accounts and the balances read model a projection
keeps beside them, run as a user runs it (a subprocess), twice on the same database."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from sqlalchemy import URL

from support.dbtools import plain, query

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bank_balances.py"
ROW = re.compile(r"^  (\w+) +balance +(-?\d+)  events (\d+)$", re.M)


async def run_example(url: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--url",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=90)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_the_read_model_follows_the_accounts_across_runs(db_url: URL) -> None:
    url = plain(db_url)
    first = await run_example(url)
    assert "the read model matches the accounts' own state" in first, first
    assert re.search(r"^caught up; +projection 'bank-balances': lag 0 events, ", first, re.M)
    # each account: +100 -30 +25 (one withdrawal refused) +10, four events
    assert ROW.findall(first) == [(name, "105", "4") for name in ("alice", "bob", "carol")]

    second = await run_example(url)  # accounts recovered, the projection resumes at its offset
    assert "the read model matches the accounts' own state" in second, second
    assert ROW.findall(second) == [(name, "210", "8") for name in ("alice", "bob", "carol")]
    # every event applied once: the offsets table counts 24 handled events in all
    handled = await query(
        db_url,
        "SELECT sum(handled) FROM casty_sa_projection_offsets WHERE projection = 'bank-balances'",
    )
    assert handled == [(24,)]
