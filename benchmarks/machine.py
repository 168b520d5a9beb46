"""The machine the run is on: its description, its load, and the peak RSS of this process.

The peak RSS of one measurement comes from the kernel's high-water mark
(``VmHWM``), reset before it through ``/proc/self/clear_refs``; where that is
not supported, from ``getrusage`` over the process's whole life.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import sqlite3
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _filesystem(path: Path) -> str:
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], f"{parts[2]} on {parts[0]}"
    return kind


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> float:
    """The 1-minute load average (how busy the machine was besides this run)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


#: the packages whose versions the report records
_PACKAGES = [
    "casty",
    "casty-sa",
    "sqlalchemy",
    "aiosqlite",
    "asyncpg",
    "psycopg",
    "asyncmy",
    "greenlet",
]


def describe_machine(
    root: Path,
    pg_settings: dict[str, str],
    mysql_settings: dict[str, str],
    synchronous: dict[str, str | None],
) -> dict[str, Any]:
    memory_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(memory_kb / 1024 / 1024, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "sqlite_files": f"{root.parent} ({_filesystem(root)})",
        "sqlite_synchronous": {k: v for k, v in synchronous.items() if v is not None},
        "postgresql": pg_settings,
        "mysql": mysql_settings,
        "packages": {name: _version(name) for name in _PACKAGES},
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def peak_rss_mb(since_reset: bool) -> float:
    """Peak RSS since the last reset, or over the process's life when resets are unsupported."""
    if since_reset:
        hwm = _status_kb("VmHWM")
        if hwm is not None:
            return hwm / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
