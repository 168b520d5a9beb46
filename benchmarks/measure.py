"""The run: every selected workload over every selected journal.

The repetitions of the journals are interleaved (journal A, B, C, then A, B, C
again), so a slow minute of the machine does not fall on one journal only. A
failure (an error, a wrong answer, a timeout) is recorded in the journal's
cells for the whole workload, and the run goes on without that journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import Row, Sample, Sizes, Workload
from .data import WrongAnswer
from .journals import ON_MYSQL, ON_POSTGRES, Opened, Stores
from .machine import describe_machine, load_average, peak_rss_mb, reset_peak_rss
from .mysql import MySQLStores, mysql_server
from .postgres import PostgresStores, postgres_server
from .progress import progress
from .workloads import make_workloads


@dataclass
class Cell:
    """Everything measured for one row of one journal."""

    samples: list[Sample] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    failure: str | None = None

    def median(self, name: str) -> float | None:
        values = [getattr(s, name) for s in self.samples if getattr(s, name) is not None]
        return statistics.median(values) if values else None


@dataclass
class Results:
    machine: dict[str, Any]
    sizes: Sizes
    journals: list[str]
    rows: list[Row]
    cells: dict[tuple[str, str], Cell]  # (row key, journal)
    seconds: float = 0.0
    rss_method: str = ""

    def rate(self, row: str, journal: str) -> float | None:
        cell = self.cells.get((row, journal))
        return None if cell is None or cell.failure else cell.median("rate")


async def run_benchmark(
    sizes: Sizes, journals: list[str], workload_keys: list[str], limit: float
) -> Results:
    started = time.perf_counter()
    workloads = make_workloads(sizes)
    selected = [workloads[key] for key in workload_keys]
    rows = [row for workload in selected for row in workload.rows]
    cells = {
        (row.key, name): Cell()
        for workload in selected
        for row in workload.rows
        for name in journals
        if workload.runs_on(name)
    }
    needs_pg = any(name in ON_POSTGRES for name in journals)
    needs_mysql = any(name in ON_MYSQL for name in journals)
    resettable = reset_peak_rss()
    load_at_start = load_average()
    if load_at_start > 0.5 * (os.cpu_count() or 1):
        progress(
            f"warning: load average {load_at_start:.2f} on {os.cpu_count()} cores: other "
            "processes are busy, so the figures will be noisy"
        )
    with contextlib.ExitStack() as exits:
        postgres: PostgresStores | None = None
        pg_settings: dict[str, str] = {}
        if needs_pg:
            postgres = PostgresStores(exits.enter_context(postgres_server()))
            await postgres.setup()
            pg_settings = await postgres.describe()
        mysql: MySQLStores | None = None
        mysql_settings: dict[str, str] = {}
        if needs_mysql:
            mysql = MySQLStores(exits.enter_context(mysql_server()))
            await mysql.setup()
            mysql_settings = await mysql.describe()
        root = Path(exits.enter_context(tempfile.TemporaryDirectory(prefix="casty-sa-bench-")))
        total = sum(
            (sizes.reps + (0 if w.fresh_per_rep else 1)) * sum(map(w.runs_on, journals))
            for w in selected
        )
        stores = Stores(root, postgres, mysql)
        run = _Run(journals, sizes.reps, stores, cells, limit, resettable, total)
        try:
            for workload in selected:
                await run.workload(workload)
        finally:
            for server in (postgres, mysql):
                if server is not None:
                    await server.teardown()
        machine = describe_machine(root, pg_settings, mysql_settings, run.synchronous)
        machine["load_average"] = {"start": load_at_start, "end": load_average()}
    return Results(
        machine=machine,
        sizes=sizes,
        journals=journals,
        rows=rows,
        cells=cells,
        seconds=time.perf_counter() - started,
        rss_method="peak RSS of this process during the measurement (kernel VmHWM, reset before it)"
        if resettable
        else "peak RSS of this process since it started (getrusage ru_maxrss)",
    )


@dataclass
class _Run:
    """What the workloads of one run share: the journals, the stores, the cells, the count."""

    journals: list[str]
    reps: int
    stores: Stores
    cells: dict[tuple[str, str], Cell]
    limit: float
    resettable: bool
    total: int
    #: each SQLite journal's ``synchronous`` setting, as its first store reported it
    synchronous: dict[str, str | None] = field(default_factory=dict)
    step: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def _say(self, text: str) -> None:
        progress(f"[{next(self.step)}/{self.total}] {text}")

    async def workload(self, workload: Workload) -> None:
        """Prepare a read workload's data once per journal, then every repetition in turn."""
        prepared: dict[str, Opened] = {}
        beside: list[Opened] = []  # the second store of a workload that compares two
        journals = [name for name in self.journals if workload.runs_on(name)]
        try:
            if not workload.fresh_per_rep:
                for name in journals:
                    self._say(f"{workload.key} {name}: writing the data (untimed)")
                    try:
                        async with asyncio.timeout(workload.prepare_limit(self.limit)):
                            opened = await self.stores.open(name)
                            prepared[name] = opened
                            if workload.two_stores:
                                beside.append(await self.stores.open(name))
                                await workload.prepare_beside(opened.journal, beside[-1].journal)
                            else:
                                await workload.prepare(opened.journal)
                    except Exception as exc:  # noqa: BLE001 - any failure is reported in the table
                        self._fail(workload, name, exc)
            for rep in range(1, self.reps + 1):
                for name in journals:
                    if not self._failed(workload, name):
                        await self._repetition(workload, name, rep, prepared.get(name))
        finally:
            for opened in [*prepared.values(), *beside]:
                with contextlib.suppress(Exception):
                    await opened.close()

    async def _repetition(
        self, workload: Workload, name: str, rep: int, prepared: Opened | None
    ) -> None:
        """One timed repetition on a prepared store, or on a fresh one closed right after."""
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.limit):
                opened = prepared or await self.stores.open(name)
                self.synchronous.setdefault(name, opened.synchronous)
                try:
                    gc.collect()
                    reset_peak_rss()
                    result = await workload.measure(opened.journal)
                    peak = peak_rss_mb(self.resettable)
                finally:
                    if prepared is None:
                        await opened.close()
        except Exception as exc:  # noqa: BLE001 - any failure is reported in the table
            self._fail(workload, name, exc)
            return
        for key, measured in result.items():
            cell = self.cells[(key, name)]
            cell.samples.append(measured)
            cell.peak_rss_mb = max(cell.peak_rss_mb, peak)
        units = {r.key: "/s" if r.unit.endswith("/s") else f" {r.unit}" for r in workload.rows}
        shown = ", ".join(f"{k} {s.rate:,.0f}{units.get(k, '/s')}" for k, s in result.items())
        self._say(
            f"{workload.key} rep {rep}/{self.reps} {name}: "
            f"{shown} ({time.perf_counter() - t0:.1f} s)"
        )

    def _failed(self, workload: Workload, name: str) -> bool:
        return self.cells[(workload.rows[0].key, name)].failure is not None

    def _fail(self, workload: Workload, name: str, exc: BaseException) -> None:
        label = "wrong" if isinstance(exc, WrongAnswer) else "error"
        if isinstance(exc, TimeoutError):
            label, exc = "timeout", TimeoutError(f"no answer within {self.limit:.0f} s")
        message = f"{label}: {type(exc).__name__}: {exc}"
        for row in workload.rows:
            self.cells[(row.key, name)].failure = message
        self._say(f"{workload.key} {name}: {message}")
