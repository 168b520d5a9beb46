#!/usr/bin/env python3
"""Draw the ratios of a benchmark run as an SVG bar chart.

Reads the JSON that ``benchmarks/run.py --json FILE`` writes and draws, per
workload, how many times faster casty-sa is than the reference journals of the
same run: ``sa-sqlite`` against casty's ``SqliteJournal`` and against raw
aiosqlite, ``sa-postgresql`` against raw asyncpg; for the read-side catch-up
(R1), each journal's ``events()`` against its own replay of the same events;
for the projections (P1), each journal's projection against its own read of
the same events; for issue 15, casty end to end (W7) against casty's
``InMemoryJournal`` too, each row on a grown table against the same row on an
empty one, several writer processes (M2, M4) against one, and group commit
(W2) against its own ceiling (W3). The axis is logarithmic (the ratios span 0.1x to 30x) with a
line at 1x: a bar right of it is faster. A ratio the run could not measure (a
journal that answered wrongly) is left out and named under the chart; the
live-tail latencies (R2) are written under it, against their targets, and the
live projection's lag (P2). Plain SVG, no plotting library.

Examples
--------
``python benchmarks/run.py --json results.json``, then
``python benchmarks/chart.py results.json docs/assets/benchmark-ratios.svg``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

#: (label, journal, reference journal, colour) of each bar of a workload: the same row of both
SERIES = (
    ("sa-sqlite vs casty SqliteJournal", "sa-sqlite", "casty-sqlite", "#2f6db5"),
    ("sa-sqlite vs raw aiosqlite", "sa-sqlite", "raw-aiosqlite", "#8fb4e3"),
    ("sa-postgresql vs raw asyncpg", "sa-postgresql", "raw-asyncpg", "#d9822b"),
    ("sa-pg-psycopg vs sa-postgresql (asyncpg)", "sa-pg-psycopg", "sa-postgresql", "#7a4fa3"),
    ("sa-mariadb vs raw asyncmy", "sa-mariadb", "raw-asyncmy", "#3a9a5b"),
)
#: rows compared with another row of the same journal, and that row
SAME_JOURNAL = {
    "R1 catch-up": "R1 replay",
    "P1 projection": "P1 read",
    "P1 batched": "P1 read",
    "P1 other db": "P1 read",
    # issue 15: a grown table against an empty one, more writer processes against one
    "W1 grown": "W1 empty",
    "W2 grown": "W2 empty",
    "W4 tail grown": "W4 tail empty",
    "W5 grown": "W5 empty",
    "M2": "M1",
    "M4": "M1",
}
#: bars of their own, not rows of the run: (label, row, against row), each journal against itself
DERIVED = (("W2 vs W3", "W2", "W3"),)
#: more bars of one row: (label, journal, reference journal), in the journal's colour
CEILINGS = {
    "W7": (
        ("sa-sqlite vs casty InMemoryJournal", "sa-sqlite", "casty-memory"),
        ("sa-postgresql vs casty InMemoryJournal", "sa-postgresql", "casty-memory"),
    ),
}
#: rows that are no rate (bytes, a fill's time): written under the chart, never bars
NOT_RATES = ("D ", "G build")
#: rows only other rows are compared with: no bars of their own
YARDSTICKS = ("W1 empty", "W2 empty", "W4 tail empty", "W5 empty")

#: the legend: two entries a line, then a line of notes, then the bars
_LEGEND_COLUMNS, _LEGEND_WIDTH, _LINE = 2, 335, 16
_LEGEND_LINES = -(-len(SERIES) // _LEGEND_COLUMNS)
_LEFT, _RIGHT, _TOP = 90, 30, 54 + _LINE * _LEGEND_LINES
_BAR, _GAP, _GROUP_GAP = 12, 2, 16
_WIDTH = 760
_LOW, _HIGH = 0.125, 64.0  # the axis: ratios outside are drawn at its edge, labelled truly


def comparisons(workload: str) -> list[tuple[str, tuple[str, str], tuple[str, str]]]:
    """The bars a workload row may have: (label, (row, journal), (row, reference journal))."""
    if workload.startswith(NOT_RATES) or workload in YARDSTICKS:
        return []
    derived = {label: (row, against) for label, row, against in DERIVED}
    if workload in SAME_JOURNAL or workload in derived:
        row, against = derived.get(workload, (workload, SAME_JOURNAL.get(workload, "")))
        return [
            (f"{journal} vs its {against}", (row, journal), (against, journal))
            for journal in dict.fromkeys(journal for _, journal, _, _ in SERIES)
        ]
    return [
        (label, (workload, journal), (workload, reference))
        for label, journal, reference, _colour in SERIES
    ] + [
        (label, (workload, journal), (workload, reference))
        for label, journal, reference in CEILINGS.get(workload, ())
    ]


def ratios(report: dict[str, Any]) -> tuple[list[str], dict[tuple[str, str], float], list[str]]:
    """Workloads in run order, the ratio of each (workload, label), and what is missing.

    A comparison whose rows the run did not have at all (a journal it left out, a
    read-side row of a journal without a read side) is no bar and not missing.
    """
    rates = {(r["workload"], r["journal"]): r["rate"] for r in report["results"]}
    workloads: list[str] = []
    found: dict[tuple[str, str], float] = {}
    missing: list[str] = []
    names = [*dict.fromkeys(r["workload"] for r in report["results"])]
    for workload in [*names, *(label for label, _, _ in DERIVED)]:
        measured = False
        for label, ours, theirs in comparisons(workload):
            if ours not in rates or theirs not in rates:
                continue
            measured = True
            if rates[ours] and rates[theirs]:
                found[(workload, label)] = rates[ours] / rates[theirs]
            else:
                missing.append(f"{workload}: {label}")
        if measured:
            workloads.append(workload)
    return workloads, found, missing


def colour(label: str) -> str:
    """The colour of a comparison: its series', or its journal's for a same-journal bar."""
    for name, journal, _reference, shade in SERIES:
        if label == name or label.startswith((f"{journal} vs its ", f"{journal} vs casty In")):
            return shade
    return "#888"


def latencies(report: dict[str, Any]) -> list[str]:
    """A line per latency target of the run (R2): the p99 measured, the bound, the verdict;
    and a line per journal of the live projection's lag (P2), which has no target."""
    lines = [
        f"{t['description']}: {t['shown']} ({t['status']})"
        for t in report.get("targets", [])
        if "maximum_p99_ms" in t
    ]
    rows = {(r["workload"], r["journal"]): r for r in report["results"]}
    lines += _not_rates(rows)
    for (workload, journal), row in rows.items():
        end = rows.get(("P2 end lag", journal), {}).get("rate")
        if workload == "P2" and row["rate"] and end is not None:
            lines.append(
                f"P2 live projection under W2 load, {journal}: lag p50 {row['p50_ms']:.1f} ms, "
                f"p99 {row['p99_ms']:.1f} ms, {end:.0f} ms at the end"
            )
    return lines


def _not_rates(rows: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """A line for the bytes per event (D) and one for the grown table's fill (G build)."""
    lines = []
    total = [(j, r["rate"]) for (w, j), r in rows.items() if w == "D total" and r["rate"]]
    if total:
        shown = ", ".join(f"{journal} {rate:.0f}" for journal, rate in total)
        lines.append(f"D bytes on disk per event (table and indexes): {shown}")
    built = [(j, r) for (w, j), r in rows.items() if w == "G build" and r["rate"]]
    if built:
        shown = ", ".join(f"{journal} {r['p50_ms'] / 1000:.1f} s" for journal, r in built)
        lines.append(f"G: the grown table filled in {shown}")
    return lines


def _x(ratio: float) -> float:
    span = math.log(_HIGH) - math.log(_LOW)
    clamped = min(max(ratio, _LOW), _HIGH)
    return _LEFT + (math.log(clamped) - math.log(_LOW)) / span * (_WIDTH - _LEFT - _RIGHT)


def render(report: dict[str, Any], title: str) -> str:
    """The SVG document for a run's JSON report."""
    workloads, found, missing = ratios(report)
    notes = latencies(report)
    groups = [len(comparisons(w)) * (_BAR + _GAP) + _GROUP_GAP for w in workloads]
    tops = [_TOP + sum(groups[:row]) for row in range(len(workloads))]
    height = _TOP + sum(groups) + 40 + 16 * (len(missing) + len(notes))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
        f'viewBox="0 0 {_WIDTH} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{_WIDTH}" height="{height}" fill="white"/>',
        f'<text x="{_LEFT}" y="20" font-size="15" font-weight="bold">{escape(title)}</text>',
    ]
    for index, (label, _journal, _reference, shade) in enumerate(SERIES):
        key = _LEFT + index % _LEGEND_COLUMNS * _LEGEND_WIDTH
        top = 32 + index // _LEGEND_COLUMNS * _LINE
        parts.append(f'<rect x="{key}" y="{top}" width="12" height="12" fill="{shade}"/>')
        parts.append(f'<text x="{key + 16}" y="{top + 10}">{escape(label)}</text>')
    parts.append(
        f'<text x="{_LEFT}" y="{_TOP - 12}" font-size="10">a bar "J vs its R": journal J against '
        "its own row R (R1, P1, a grown table against an empty one, M processes against one, "
        "W2 against W3), in J's colour</text>"
    )
    bottom = _TOP + sum(groups)
    tick = _LOW
    while tick <= _HIGH:
        x = _x(tick)
        stroke = "#333" if tick == 1 else "#ddd"
        parts.append(
            f'<line x1="{x:.1f}" y1="{_TOP - 8}" x2="{x:.1f}" y2="{bottom}" stroke="{stroke}"/>'
        )
        parts.append(f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{tick:g}x</text>')
        tick *= 2
    for workload, top, group in zip(workloads, tops, groups, strict=True):
        parts.append(
            f'<text x="{_LEFT - 8}" y="{top + group / 2 - _GROUP_GAP / 2 + 4:.1f}" '
            f'text-anchor="end">{escape(workload)}</text>'
        )
        for index, (label, _ours, _theirs) in enumerate(comparisons(workload)):
            ratio = found.get((workload, label))
            if ratio is None:
                continue
            y = top + index * (_BAR + _GAP)
            start, end = sorted((_x(1.0), _x(ratio)))
            parts.append(
                f'<rect x="{start:.1f}" y="{y}" width="{max(end - start, 1):.1f}" '
                f'height="{_BAR}" fill="{colour(label)}"><title>{escape(workload)}, '
                f"{escape(label)}: {ratio:.2f}x</title></rect>"
            )
            anchor, shift = ("start", 4) if ratio >= 1 else ("end", -4)
            label_x = (end if ratio >= 1 else start) + shift
            parts.append(
                f'<text x="{label_x:.1f}" y="{y + _BAR - 2}" text-anchor="{anchor}" '
                f'font-size="10">{ratio:.2f}x</text>'
            )
    for line, text in enumerate(missing):
        parts.append(
            f'<text x="{_LEFT}" y="{bottom + 34 + 16 * line}" fill="#a00">not measured: '
            f"{escape(text)} (a journal answered wrongly)</text>"
        )
    for line, text in enumerate(notes, len(missing)):
        parts.append(f'<text x="{_LEFT}" y="{bottom + 34 + 16 * line}">{escape(text)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("report", type=Path, help="JSON written by benchmarks/run.py --json")
    parser.add_argument("output", type=Path, help="the SVG file to write")
    parser.add_argument("--title", default="casty-sa: times as fast as the reference (log scale)")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(report, args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
