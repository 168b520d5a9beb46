"""The command line of ``benchmarks/run.py``: its flags, and ``main``.

``main`` returns 1 when one of casty-sa's journals or a raw baseline fails;
casty's own journals failing a check is a finding, not an error of the run.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .base import QUICK, Sizes
from .journals import JOURNALS, THIRD_PARTY
from .measure import run_benchmark
from .report import render_table, to_json, write_json
from .rss_scan import rss_scan
from .workloads import OPT_IN, WORKLOADS


def _names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none)'}; choose from {', '.join(allowed)}"
        )
    return [n for n in allowed if n in names]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Side-by-side benchmark of casty event journals (see the module docstring)."
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repetition (smoke)")
    parser.add_argument(
        "--journals",
        type=lambda t: _names(t, JOURNALS, "journal"),
        default=list(JOURNALS),
        help=f"comma-separated, from {','.join(JOURNALS)} (default: all)",
    )
    parser.add_argument(
        "--workloads",
        type=lambda t: _names(t.upper(), WORKLOADS, "workload"),
        help=f"comma-separated, from {','.join(WORKLOADS)} (default: all but "
        f"{','.join(sorted(OPT_IN))}; --quick: all)",
    )
    parser.add_argument(
        "--grown",
        type=int,
        metavar="N",
        help="add G: W1, W2, W4 tail and W5 on a table of N events (10,000,000 for the "
        "README) and on an empty one beside it (SQLite and PostgreSQL)",
    )
    parser.add_argument("--reps", type=int, help="repetitions per measurement (default 5)")
    parser.add_argument("--entities", type=int, help="W2: number of concurrent entities (200)")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds before one measurement is failed"
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write the results as JSON to PATH ('-' or no value: stdout, instead of the table)",
    )
    parser.add_argument(
        "--rss-scan",
        metavar="N,N",
        help="instead: W2 alone in a fresh process per journal and entity count, "
        "reporting each process's peak RSS (e.g. 200,2000)",
    )
    return parser.parse_args(argv)


def _selected(args: argparse.Namespace) -> list[str]:
    """The workloads of the run: as asked, plus G with ``--grown``."""
    if args.workloads is not None:
        chosen = set(args.workloads)
    else:
        chosen = {w for w in WORKLOADS if args.quick or w not in OPT_IN}
    if args.grown is not None:
        chosen.add("G")
    return [w for w in WORKLOADS if w in chosen]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    overrides: dict[str, Any] = {}
    if args.reps is not None:
        overrides["reps"] = max(1, args.reps)
    if args.entities is not None:
        overrides["w2_entities"] = max(1, args.entities)
    if args.grown is not None:
        overrides["grown_events"] = max(1, args.grown)
    sizes = replace(sizes, **overrides)
    workloads = _selected(args)
    if args.rss_scan:
        counts = [int(n) for n in args.rss_scan.split(",") if n.strip()]
        report = rss_scan(counts, args.journals, sizes.reps, args.json is not None)
        if args.json is not None:
            write_json(report, args.json)
        return 0
    results = asyncio.run(run_benchmark(sizes, args.journals, workloads, args.timeout))
    if args.json != "-":
        print(render_table(results))
    if args.json is not None:
        write_json(to_json(results), args.json)
    ours_failed = [
        key for key, cell in results.cells.items() if cell.failure and key[1] not in THIRD_PARTY
    ]
    return 1 if ours_failed else 0
