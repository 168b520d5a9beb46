"""Peak RSS against the number of entities: W2 alone in a fresh process per journal and count.

The peak RSS of the main run includes the interpreter and everything earlier
workloads left behind; a fresh process running only W2 gives a clean figure.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .base import Sizes
from .journals import ON_MYSQL, ON_POSTGRES
from .mysql import mysql_server
from .postgres import postgres_server
from .progress import progress

#: the entry point each fresh process runs
SCRIPT = Path(__file__).with_name("run.py")


def rss_scan(counts: list[int], journals: list[str], reps: int, as_json: bool) -> dict[str, Any]:
    """Run W2 alone in a fresh process per journal and entity count; compare peak RSS."""
    scans = []
    with contextlib.ExitStack() as exits:
        env = dict(os.environ)
        if any(name in ON_POSTGRES for name in journals):
            url = exits.enter_context(postgres_server())
            env["CASTY_SA_BENCH_POSTGRES_URL"] = url.render_as_string(hide_password=False)
        if any(name in ON_MYSQL for name in journals):
            url = exits.enter_context(mysql_server())
            env["CASTY_SA_BENCH_MYSQL_URL"] = url.render_as_string(hide_password=False)
        for name in journals:
            for count in counts:
                progress(f"rss scan: {name}, W2 with {count:,} entities, in a fresh process")
                command = [
                    sys.executable, str(SCRIPT), "--journals", name, "--workloads", "W2",
                    "--entities", str(count), "--reps", str(reps), "--json", "-",
                ]  # fmt: skip
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    sys.stderr.write(done.stderr)
                    raise SystemExit(f"rss scan: {name} at {count} entities failed")
                child = json.loads(done.stdout)
                (result,) = child["results"]
                scans.append(
                    {
                        "journal": name,
                        "entities": count,
                        "events": count * Sizes().w2_persists,
                        "rate": result["rate"],
                        "process_peak_rss_mb": child["process_peak_rss_mb"],
                        "w2_peak_rss_mb": result["peak_rss_mb"],
                    }
                )
    if not as_json:
        _print_table(scans)
    return {"scan": scans, "method": "ru_maxrss of a fresh process running only W2"}


def _print_table(scans: list[dict[str, Any]]) -> None:
    print("| journal | W2 entities | events | events/s | process peak RSS MB |")
    print("|---|---:|---:|---:|---:|")
    for s in scans:
        print(
            f"| {s['journal']} | {s['entities']:,} | {s['events']:,} | {s['rate']:,.0f} "
            f"| {s['process_peak_rss_mb']:.0f} |"
        )
