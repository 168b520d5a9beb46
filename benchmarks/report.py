"""The report of a run: the Markdown table, the targets of issues 4, 12 and 13, and the JSON.

Every ratio is a ratio of medians of the same run: against casty's
``SqliteJournal`` (``REFERENCE``) and against the raw driver of the same
database (``RAW_OF``); a read-side target compares two rows of one journal
(catch-up against replay, a projection against a read of the same events) or
bounds a latency. ``benchmarks/chart.py`` draws the JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .machine import peak_rss_mb
from .measure import Results

REFERENCE = "casty-sqlite"
#: the raw driver each journal is compared with ("vs raw")
RAW_OF = {
    "sa-sqlite": "raw-aiosqlite",
    "casty-sqlite": "raw-aiosqlite",
    "raw-aiosqlite": "raw-aiosqlite",
    "sa-postgresql": "raw-asyncpg",
    "raw-asyncpg": "raw-asyncpg",
}


@dataclass(frozen=True)
class Target:
    """``row`` of ``journal`` at least ``minimum`` times ``reference_row`` (default: the same
    row) of ``reference``."""

    description: str
    row: str
    journal: str
    reference: str
    minimum: float
    reference_row: str | None = None


@dataclass(frozen=True)
class LatencyTarget:
    """The median p99 of ``row`` of ``journal`` below ``maximum_p99_ms``."""

    description: str
    row: str
    journal: str
    maximum_p99_ms: float


TARGETS = (
    Target("SQLite W2 >= 15x casty SqliteJournal", "W2", "sa-sqlite", "casty-sqlite", 15.0),
    Target("SQLite W1 >= 0.9x casty SqliteJournal", "W1", "sa-sqlite", "casty-sqlite", 0.9),
    Target("SQLite W3 >= 1.0x casty SqliteJournal", "W3", "sa-sqlite", "casty-sqlite", 1.0),
    Target("SQLite W4 all >= 1.0x casty SqliteJournal", "W4 all", "sa-sqlite", REFERENCE, 1.0),
    Target("SQLite W4 tail >= 1.0x casty SqliteJournal", "W4 tail", "sa-sqlite", REFERENCE, 1.0),
    Target("SQLite W6 save >= 1.0x casty SqliteJournal", "W6 save", "sa-sqlite", REFERENCE, 1.0),
    Target("SQLite W6 load >= 1.0x casty SqliteJournal", "W6 load", "sa-sqlite", REFERENCE, 1.0),
    Target("SQLite W5 correct and >= 1.0x raw aiosqlite", "W5", "sa-sqlite", "raw-aiosqlite", 1.0),
    Target("PostgreSQL W2 >= 10x raw asyncpg", "W2", "sa-postgresql", "raw-asyncpg", 10.0),
    Target("PostgreSQL W1 >= 0.9x raw asyncpg", "W1", "sa-postgresql", "raw-asyncpg", 0.9),
    Target("PostgreSQL W3 >= 0.9x raw asyncpg", "W3", "sa-postgresql", "raw-asyncpg", 0.9),
    Target("PostgreSQL W4 all >= 0.8x raw asyncpg", "W4 all", "sa-postgresql", "raw-asyncpg", 0.8),
    Target(
        "PostgreSQL W4 tail >= 0.8x raw asyncpg", "W4 tail", "sa-postgresql", "raw-asyncpg", 0.8
    ),
    Target(
        "SQLite R1 catch-up >= 0.8x its replay", "R1 catch-up", "sa-sqlite", "sa-sqlite", 0.8,
        "R1 replay",
    ),
    Target(
        "PostgreSQL R1 catch-up >= 0.8x its replay", "R1 catch-up", "sa-postgresql",
        "sa-postgresql", 0.8, "R1 replay",
    ),
    Target(
        "SQLite P1 projection >= 0.5x its catch-up read", "P1 projection", "sa-sqlite",
        "sa-sqlite", 0.5, "P1 read",
    ),
    Target(
        "PostgreSQL P1 projection >= 0.5x its catch-up read", "P1 projection", "sa-postgresql",
        "sa-postgresql", 0.5, "P1 read",
    ),
    Target(
        "SQLite P1 batched (writes per batch) >= 0.5x its catch-up read", "P1 batched",
        "sa-sqlite", "sa-sqlite", 0.5, "P1 read",
    ),
    Target(
        "PostgreSQL P1 batched (writes per batch) >= 0.5x its catch-up read", "P1 batched",
        "sa-postgresql", "sa-postgresql", 0.5, "P1 read",
    ),
)  # fmt: skip
LATENCY_TARGETS = (
    LatencyTarget("SQLite R2 live tail p99 < 250 ms (polling)", "R2", "sa-sqlite", 250.0),
    LatencyTarget("PostgreSQL R2 live tail p99 < 50 ms (NOTIFY)", "R2", "sa-postgresql", 50.0),
)


def ratio(
    results: Results,
    row: str,
    journal: str,
    reference: str | None,
    reference_row: str | None = None,
) -> float | None:
    if reference is None or reference not in results.journals:
        return None
    mine, theirs = results.rate(row, journal), results.rate(reference_row or row, reference)
    return None if mine is None or not theirs else mine / theirs


def evaluate_targets(results: Results) -> list[dict[str, Any]]:
    """Each target this run measured: its figure (``shown``) and whether it is met."""
    evaluated = []
    for target in TARGETS:
        against = (target.reference_row or target.row, target.reference)
        if (target.row, target.journal) not in results.cells or against not in results.cells:
            continue
        cell = results.cells[(target.row, target.journal)]
        measured = ratio(results, target.row, target.journal, target.reference, against[0])
        if cell.failure:
            status = f"NOT met ({target.journal} {cell.failure})"
        elif measured is None:
            status = f"n/a (reference {results.cells[against].failure or 'missing'})"
        else:
            status = "met" if measured >= target.minimum else "NOT met"
        shown = _fmt(measured, ".2f", "x")
        evaluated.append({**asdict(target), "ratio": measured, "shown": shown, "status": status})
    for latency in LATENCY_TARGETS:
        tail = results.cells.get((latency.row, latency.journal))
        if tail is None:
            continue
        p99 = None if tail.failure else tail.median("p99_ms")
        if tail.failure or p99 is None:
            status = f"NOT met ({latency.journal} {tail.failure or 'no latency'})"
        else:
            status = "met" if p99 < latency.maximum_p99_ms else "NOT met"
        shown = _fmt(p99, ".1f", " ms")
        evaluated.append({**asdict(latency), "p99_ms": p99, "shown": shown, "status": status})
    return evaluated


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def render_table(results: Results) -> str:
    lines = [*_heading(results), *_table(results), "", "Workloads:"]
    lines += [f"- {row.key}: {row.description} ({row.unit})" for row in results.rows]
    targets = evaluate_targets(results)
    if targets:
        lines += ["", "Targets of issues 4, 12 and 13 (medians of this run):"]
        lines += [f"- {t['description']}: {t['shown']} -> {t['status']}" for t in targets]
    failures = [
        (row, name, cell.failure) for (row, name), cell in results.cells.items() if cell.failure
    ]
    if failures:
        lines += ["", "Failures (a wrong answer is reported, never a number):"]
        lines += [f"- {row} {name}: {failure}" for row, name, failure in failures]
    return "\n".join(lines)


def _heading(results: Results) -> list[str]:
    """What ran, on what machine, when."""
    m = results.machine
    pg = m["postgresql"]
    return [
        f"casty journal benchmark: median of {results.sizes.reps} repetition(s), "
        f"{results.seconds:.0f} s in all",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; {m['os']}",
        f"- Python {m['python']}, SQLite {m['sqlite']}"
        + (
            f", PostgreSQL {pg['server_version']} (fsync={pg['fsync']}, "
            f"synchronous_commit={pg['synchronous_commit']}, "
            f"wal_sync_method={pg['wal_sync_method']})"
            if pg
            else ""
        ),
        "- packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()),
        f"- SQLite files in {m['sqlite_files']}; synchronous: "
        + (", ".join(f"{k} {v}" for k, v in m["sqlite_synchronous"].items()) or "—"),
        f"- peak RSS: {results.rss_method}",
        f"- {m['date']}; load average (1 min) at start {m['load_average']['start']}, "
        f"at end {m['load_average']['end']}",
        "",
    ]


def _table(results: Results) -> list[str]:
    """A line per (workload row, journal): the figures, or the verdict of a failure."""
    lines = [
        "| workload | journal | rate | p50 ms | p99 ms | vs casty-sqlite | vs raw driver "
        "| spread | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results.rows:
        for name in results.journals:
            cell = results.cells.get((row.key, name))
            if cell is None:
                continue  # a read-side row of a journal without a read side
            if cell.failure:
                verdict = cell.failure.split(":", 1)[0]
                lines.append(f"| {row.key} | {name} | **{verdict}** | | | | | | |")
                continue
            rate = cell.median("rate")
            rates = [s.rate for s in cell.samples]
            spread = (max(rates) - min(rates)) / rate * 100 if rate and len(rates) > 1 else None
            lines.append(
                f"| {row.key} | {name} | {_fmt(rate, ',.0f')} {row.unit} "
                f"| {_fmt(cell.median('p50_ms'), '.2f')} | {_fmt(cell.median('p99_ms'), '.2f')} "
                f"| {_fmt(ratio(results, row.key, name, REFERENCE), '.2f', 'x')} "
                f"| {_fmt(ratio(results, row.key, name, RAW_OF.get(name)), '.2f', 'x')} "
                f"| {_fmt(spread, '.0f', '%')} | {cell.peak_rss_mb:.0f} |"
            )
    return lines


def to_json(results: Results) -> dict[str, Any]:
    rows = []
    for row in results.rows:
        for name in results.journals:
            cell = results.cells.get((row.key, name))
            if cell is None:
                continue
            rows.append(
                {
                    "workload": row.key,
                    "journal": name,
                    "unit": row.unit,
                    "rate": None if cell.failure else cell.median("rate"),
                    "p50_ms": cell.median("p50_ms"),
                    "p99_ms": cell.median("p99_ms"),
                    "vs_casty_sqlite": ratio(results, row.key, name, REFERENCE),
                    "vs_raw_driver": ratio(results, row.key, name, RAW_OF.get(name)),
                    "samples": [asdict(s) for s in cell.samples],
                    "peak_rss_mb": cell.peak_rss_mb,
                    "failure": cell.failure,
                }
            )
    return {
        "machine": results.machine,
        "sizes": asdict(results.sizes),
        "seconds": results.seconds,
        "rss_method": results.rss_method,
        "process_peak_rss_mb": peak_rss_mb(since_reset=False),
        "workloads": {row.key: f"{row.description} ({row.unit})" for row in results.rows},
        "results": rows,
        "targets": evaluate_targets(results),
    }


def write_json(report: dict[str, Any], path: str) -> None:
    """Write ``report`` to ``path``, or to stdout when ``path`` is ``-``."""
    text = json.dumps(report, indent=2, default=str)
    if path == "-":
        print(text)
    else:
        Path(path).write_text(text + "\n")
