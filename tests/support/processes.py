"""Free ports and the helper processes the tests start.

The scripts live next to this module; a test names them through the paths below, so a
move of the scripts is one edit here.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CRASH_WRITER = HERE / "crash_writer.py"
EIO_WRITER = HERE / "eio_writer.py"
CLUSTER_NODE = HERE / "cluster_node.py"
EVENT_WRITER = HERE / "event_writer.py"
PROJECTION_NODE = HERE / "projection_node.py"
PRUNE_RUNNER = HERE / "prune_runner.py"
WAL_FSYNC_SHIM = HERE / "fail_wal_fsync.c"


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports on ``host`` that nothing listens on, ascending.

    All are bound at once before any is released, so they are distinct.
    """
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return sorted(int(sock.getsockname()[1]) for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on (connecting to it is refused)."""
    [port] = free_ports(1, host)
    return port


def start_writer(url: str, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``crash_writer.py URL LOG *extra`` in a process of its own, its output piped."""
    return subprocess.Popen(
        [sys.executable, str(CRASH_WRITER), url, str(log), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
