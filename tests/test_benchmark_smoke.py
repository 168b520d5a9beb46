"""The benchmark script runs end to end: ``benchmarks/run.py --quick`` on every backend.

``--quick`` runs every workload at tiny sizes, issue 15's too: casty end to end
(W7), several writer processes (M), bytes on disk (D) and the opt-in grown table
(G, a few thousand events here).

Timings are not asserted (they depend on the machine); what is asserted is that
the run succeeds, that every journal and workload appears in the table (the
read-side workloads R1 and R2 and the projection workloads P1 and P2 on
casty-sa's journals only), and that every figure of casty-sa's journals and of
the raw baselines is a verified measurement rather than a failure: SQLite,
PostgreSQL through asyncpg and psycopg, MariaDB through asyncmy, and the raw
aiosqlite, asyncpg and asyncmy baselines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

from sqlalchemy import URL

from benchmarks.base import QUICK
from benchmarks.chart import DERIVED, comparisons
from benchmarks.journals import JOURNALS, READ_SIDE, THIRD_PARTY
from benchmarks.workloads import make_workloads

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
CHART = SCRIPT.with_name("chart.py")
WORKLOADS = make_workloads(QUICK).values()
#: every (row, journal) the run measures: the read-side rows on casty-sa's journals only
CELLS = [
    (row.key, journal)
    for workload in WORKLOADS
    for row in workload.rows
    for journal in JOURNALS
    if workload.runs_on(journal)
]
# casty's own journals (THIRD_PARTY) may fail a check (SqliteJournal's concurrent reads do):
# a finding, not a failure of the run


def test_quick_run_covers_every_journal_and_workload(
    postgres_server_url: URL, mysql_server_url: URL, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "CASTY_SA_BENCH_POSTGRES_URL": postgres_server_url.render_as_string(hide_password=False),
        "CASTY_SA_BENCH_MYSQL_URL": mysql_server_url.render_as_string(hide_password=False),
    }
    report = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(report)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,  # 110 s measured under a load of 3 on 2 cores
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    table = done.stdout
    for row, journal in CELLS:
        assert f"| {row} | {journal} |" in table, (row, journal)
    for kind in ("R", "P"):
        assert {journal for row, journal in CELLS if row.startswith(kind)} == READ_SIDE
    facts = ("machine:", "Python ", "SQLite ", "PostgreSQL ", "MariaDB ", "packages:")
    for fact in (*facts, "casty-sa ", "psycopg ", "asyncmy "):
        assert fact in table, fact
    assert "[bench]" in done.stderr  # progress goes to stderr, not into the table

    results = json.loads(report.read_text())
    cells = {(r["workload"], r["journal"]): r for r in results["results"]}
    assert set(cells) == set(CELLS)
    for (row, journal), cell in cells.items():
        if journal in THIRD_PARTY and cell["failure"] is not None:
            assert cell["rate"] is None, (row, journal)  # a wrong answer is never a number
            continue
        assert cell["failure"] is None, (row, journal, cell["failure"])
        if cell["unit"] == "bytes/event":  # a part a store does not have is not measured
            assert cell["rate"] is None or cell["rate"] >= 0, (row, journal)
            if row in ("D total", "D payload", "D table"):
                assert cell["rate"] > 0, (row, journal)
        elif cell["unit"] == "ms":  # a lag: the read model may be there when the writers return
            assert cell["rate"] >= 0, (row, journal)
        else:
            assert cell["rate"] > 0, (row, journal)
    assert results["machine"]["postgresql"]["server_version"]
    assert {"version", "innodb_flush_log_at_trx_commit"} <= set(results["machine"]["mysql"])
    assert results["machine"]["sqlite_synchronous"]["sa-sqlite"] == "FULL"
    assert results["machine"]["sqlite_synchronous"]["raw-aiosqlite"] == "FULL"

    # the chart of the same run: one bar per measured ratio, the rest named as not measured
    chart = tmp_path / "ratios.svg"
    drawn = subprocess.run(
        [sys.executable, str(CHART), str(report), str(chart)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    svg = ElementTree.parse(chart).getroot()
    bars = {
        (title.text or "").rsplit(": ", 1)[0]
        for rect in svg.iter("{http://www.w3.org/2000/svg}rect")
        for title in rect.iter("{http://www.w3.org/2000/svg}title")
    }
    expected = {
        f"{row}, {label}"
        for row in [*dict.fromkeys(row for row, _ in CELLS), *(label for label, _, _ in DERIVED)]
        for label, ours, theirs in comparisons(row)
        if ours in cells and theirs in cells and cells[ours]["rate"] and cells[theirs]["rate"]
    }
    assert bars == expected
    assert {f"R1 catch-up, {journal} vs its R1 replay" for journal in READ_SIDE} <= bars
    assert {f"P1 projection, {journal} vs its P1 read" for journal in READ_SIDE} <= bars
    texts = " ".join(text.text or "" for text in svg.iter("{http://www.w3.org/2000/svg}text"))
    assert "R2 live tail p99 < 250 ms" in texts and "R2 live tail p99 < 50 ms" in texts
    assert "MariaDB R2 live tail" in texts and "psycopg R2 live tail" in texts
    for new in ("sa-pg-psycopg vs sa-postgresql (asyncpg)", "sa-mariadb vs raw asyncmy"):
        assert f"W2, {new}" in bars, new
    # issue 15: end to end against the ceiling, a grown table against an empty one, processes,
    # group commit against its ceiling; bytes per event and the fill's time as lines
    assert "W7, sa-sqlite vs casty InMemoryJournal" in bars
    assert {
        "W5 grown, sa-sqlite vs its W5 empty",
        "W5 grown, sa-postgresql vs its W5 empty",
    } <= bars
    assert {"M2, sa-postgresql vs its M1", "W2 vs W3, sa-sqlite vs its W3"} <= bars
    assert "D bytes on disk per event" in texts and "G: the grown table filled in" in texts
    assert "SQLite W7 (casty end to end) >= 0.5x casty InMemoryJournal" in table
    assert "PostgreSQL W4 tail with the table grown >= 0.85x empty" in table

    # psycopg against asyncpg: a target per row with a rate, printed and evaluated
    psycopg = {
        t["row"]
        for t in results["targets"]
        if (t["journal"], t.get("reference")) == ("sa-pg-psycopg", "sa-postgresql")
    }
    rated = {row for row, journal in CELLS if journal == "sa-pg-psycopg"} - {"P2 end lag"}
    assert psycopg == rated
    assert "PostgreSQL psycopg W1 >= 0.8x asyncpg" in table
    assert "MariaDB W2 >= 10x raw asyncmy" in table
    for journal in READ_SIDE:
        assert f"P2 live projection under W2 load, {journal}: lag p50" in texts
