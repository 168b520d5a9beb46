"""The targets of issues 4, 12, 13, 14 and 15, and how a run's figures meet them.

Every ratio is a ratio of medians of the same run: against casty's
``SqliteJournal`` (``REFERENCE``), against the raw driver of the same database
(``RAW_OF``), or against another row of the same journal (catch-up against
replay, a projection against a read of the same events). ``SIBLINGS`` are two
drivers of one database: on every row with a rate, the first must keep at
least a share of the second's (psycopg against asyncpg). A latency target
bounds a p99.

>>> [t.description for t in sibling_targets(["W1", "P2 end lag"], {"P2 end lag": "ms"})]
['PostgreSQL psycopg W1 >= 0.8x asyncpg (sa-pg-psycopg vs sa-postgresql)']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .measure import Results

REFERENCE = "casty-sqlite"
#: the raw driver each journal is compared with ("vs raw")
RAW_OF = {
    "sa-sqlite": "raw-aiosqlite",
    "casty-sqlite": "raw-aiosqlite",
    "raw-aiosqlite": "raw-aiosqlite",
    "sa-postgresql": "raw-asyncpg",
    "sa-pg-psycopg": "raw-asyncpg",
    "raw-asyncpg": "raw-asyncpg",
    "sa-mariadb": "raw-asyncmy",
    "raw-asyncmy": "raw-asyncmy",
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


def _against_raw(database: str, journal: str, raw: str) -> tuple[Target, ...]:
    """Issue 4's targets of a server database, against its raw one-commit-per-persist driver."""
    name = raw.removeprefix("raw-")
    return (
        Target(f"{database} W2 >= 10x raw {name}", "W2", journal, raw, 10.0),
        Target(f"{database} W1 >= 0.9x raw {name}", "W1", journal, raw, 0.9),
        Target(f"{database} W3 >= 0.9x raw {name}", "W3", journal, raw, 0.9),
        Target(f"{database} W4 all >= 0.8x raw {name}", "W4 all", journal, raw, 0.8),
        Target(f"{database} W4 tail >= 0.8x raw {name}", "W4 tail", journal, raw, 0.8),
    )


def _read_side(database: str, journal: str) -> tuple[Target, ...]:
    """Issues 12 and 13: the catch-up against the replay, a projection against its read."""
    return (
        Target(
            f"{database} R1 catch-up >= 0.8x its replay", "R1 catch-up", journal, journal, 0.8,
            "R1 replay",
        ),
        Target(
            f"{database} P1 projection >= 0.5x its catch-up read", "P1 projection", journal,
            journal, 0.5, "P1 read",
        ),
        Target(
            f"{database} P1 batched (writes per batch) >= 0.5x its catch-up read", "P1 batched",
            journal, journal, 0.5, "P1 read",
        ),
    )  # fmt: skip


def _issue_15(database: str, journal: str) -> tuple[Target, ...]:
    """Issue 15: group commit against its own ceiling, and a grown table against an empty one."""
    grown = (
        Target(
            f"{database} {row} with the table grown >= 0.85x empty", f"{row} grown",
            journal, journal, 0.85, f"{row} empty",
        )
        for row in ("W1", "W2", "W4 tail", "W5")
    )  # fmt: skip
    return (
        Target(f"{database} W2 >= 0.85x its W3 (group commit's ceiling)", "W2", journal, journal,
               0.85, "W3"),
        *grown,
    )  # fmt: skip


ISSUE_15 = (
    Target(
        "SQLite W7 (casty end to end) >= 0.5x casty InMemoryJournal", "W7", "sa-sqlite",
        "casty-memory", 0.5,
    ),
    *_issue_15("SQLite", "sa-sqlite"),
    *_issue_15("PostgreSQL", "sa-postgresql"),
)  # fmt: skip

TARGETS = (
    Target("SQLite W2 >= 15x casty SqliteJournal", "W2", "sa-sqlite", "casty-sqlite", 15.0),
    Target("SQLite W1 >= 0.9x casty SqliteJournal", "W1", "sa-sqlite", "casty-sqlite", 0.9),
    Target("SQLite W3 >= 1.0x casty SqliteJournal", "W3", "sa-sqlite", "casty-sqlite", 1.0),
    Target("SQLite W4 all >= 1.0x casty SqliteJournal", "W4 all", "sa-sqlite", REFERENCE, 1.0),
    Target("SQLite W4 tail >= 1.0x casty SqliteJournal", "W4 tail", "sa-sqlite", REFERENCE, 1.0),
    Target("SQLite W6 save >= 1.0x casty SqliteJournal", "W6 save", "sa-sqlite", REFERENCE, 1.0),
    Target("SQLite W6 load >= 1.0x casty SqliteJournal", "W6 load", "sa-sqlite", REFERENCE, 1.0),
    Target("SQLite W5 correct and >= 1.0x raw aiosqlite", "W5", "sa-sqlite", "raw-aiosqlite", 1.0),
    *_against_raw("PostgreSQL", "sa-postgresql", "raw-asyncpg"),
    *_against_raw("MariaDB", "sa-mariadb", "raw-asyncmy"),
    *_read_side("SQLite", "sa-sqlite"),
    *_read_side("PostgreSQL", "sa-postgresql"),
    *_read_side("PostgreSQL psycopg", "sa-pg-psycopg"),
    *_read_side("MariaDB", "sa-mariadb"),
    *ISSUE_15,
)
LATENCY_TARGETS = (
    LatencyTarget("SQLite R2 live tail p99 < 250 ms (polling)", "R2", "sa-sqlite", 250.0),
    LatencyTarget("PostgreSQL R2 live tail p99 < 50 ms (NOTIFY)", "R2", "sa-postgresql", 50.0),
    LatencyTarget(
        "PostgreSQL psycopg R2 live tail p99 < 50 ms (NOTIFY)", "R2", "sa-pg-psycopg", 50.0
    ),
    LatencyTarget("MariaDB R2 live tail p99 < 250 ms (polling)", "R2", "sa-mariadb", 250.0),
)
#: (label, journal, its sibling on the same database, the share of the sibling's rate it keeps)
SIBLINGS = (("PostgreSQL psycopg", "sa-pg-psycopg", "sa-postgresql", 0.8, "asyncpg"),)


def sibling_targets(rows: Iterable[str], units: Mapping[str, str]) -> list[Target]:
    """A target per row with a rate (not a lag in ms) for each pair of ``SIBLINGS``."""
    return [
        Target(
            f"{label} {row} >= {minimum}x {name} ({journal} vs {sibling})",
            row, journal, sibling, minimum,
        )
        for label, journal, sibling, minimum, name in SIBLINGS
        for row in rows
        if units.get(row) != "ms"
    ]  # fmt: skip


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
    units = {row.key: row.unit for row in results.rows}
    evaluated = []
    for target in (*TARGETS, *sibling_targets(units, units)):
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
        shown = fmt(measured, ".2f", "x")
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
        shown = fmt(p99, ".1f", " ms")
        evaluated.append({**asdict(latency), "p99_ms": p99, "shown": shown, "status": status})
    return evaluated


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` formatted, or a dash when there is none."""
    return "—" if value is None else f"{value:{spec}}{suffix}"
