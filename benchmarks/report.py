"""The report of a run: the Markdown table, the targets met or not, and the JSON.

Every ratio is a ratio of medians of the same run: against casty's
``SqliteJournal`` (``REFERENCE``) and against the raw driver of the same
database (``RAW_OF``); ``targets`` says which ratios the issues asked for.
``benchmarks/chart.py`` draws the JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .machine import peak_rss_mb
from .measure import Results
from .targets import RAW_OF, REFERENCE, evaluate_targets, fmt, ratio


def render_table(results: Results) -> str:
    lines = [*_heading(results), *_table(results), "", "Workloads:"]
    lines += [f"- {row.key}: {row.description} ({row.unit})" for row in results.rows]
    targets = evaluate_targets(results)
    if targets:
        lines += ["", "Targets of issues 4, 12, 13, 14 and 15 (medians of this run):"]
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
    pg, my = m["postgresql"], m.get("mysql")
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
        )
        + (
            f", MariaDB {my['version']} (innodb_flush_log_at_trx_commit="
            f"{my['innodb_flush_log_at_trx_commit']}, log_bin={my['log_bin']}, "
            f"sync_binlog={my['sync_binlog']}, innodb_flush_method={my['innodb_flush_method']}, "
            f"innodb_doublewrite={my['innodb_doublewrite']})"
            if my
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
                f"| {row.key} | {name} | {fmt(rate, ',.0f')} {row.unit} "
                f"| {fmt(cell.median('p50_ms'), '.2f')} | {fmt(cell.median('p99_ms'), '.2f')} "
                f"| {fmt(ratio(results, row.key, name, REFERENCE), '.2f', 'x')} "
                f"| {fmt(ratio(results, row.key, name, RAW_OF.get(name)), '.2f', 'x')} "
                f"| {fmt(spread, '.0f', '%')} | {cell.peak_rss_mb:.0f} |"
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
