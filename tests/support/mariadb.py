"""A private MariaDB server for the suite: Debian's ``mariadbd`` on a data directory of its own.

The suite starts one per test process (like its PostgreSQL, from ``pgserver``),
listening on 127.0.0.1 at a free port and on a socket in its directory, with
a server default character set and collation that compare case-insensitively
(``utf8mb4_general_ci``, like a stock MySQL 8's ``utf8mb4_0900_ai_ci``), so the
tests prove casty-sa's own columns are binary. ``make test`` installs
``mariadb-server`` where it is missing (``.ci/install-mariadb``).

::

    server = MariaDBServer.start(Path("/tmp/x"))
    url = server.url  # mysql+asyncmy://root@127.0.0.1:PORT/
    server.stop()
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import URL

__all__ = ["MariaDBServer", "find_program"]

#: Seconds the server has to accept connections after it starts.
_START_WITHIN = 60.0


def find_program(*names: str) -> str:
    """The first of ``names`` on ``PATH`` or in ``/usr/sbin`` (where Debian puts mariadbd)."""
    for name in names:
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
        if found:
            return found
    raise RuntimeError(
        f"none of {', '.join(names)} is installed: the suite needs Debian's mariadb-server "
        "(`make test` installs it; or set CASTY_SA_TEST_MYSQL_URL to a server of your own)"
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class MariaDBServer:
    """A running ``mariadbd``; :meth:`stop` ends it and removes its directory."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes]
    #: the server's command line, to :meth:`restart` it on the same data directory
    command: list[str] = field(default_factory=list)

    @property
    def socket_path(self) -> Path:
        return self.directory / "mysqld.sock"

    @property
    def url(self) -> URL:
        """``root`` (no password) over TCP, no database selected."""
        return URL.create("mysql+asyncmy", username="root", host="127.0.0.1", port=self.port)

    @classmethod
    def start(cls, directory: Path, *extra_options: str) -> MariaDBServer:
        """Initialise a data directory in ``directory`` and start a server on it."""
        data = directory / "data"
        install = find_program("mariadb-install-db", "mysql_install_db")
        server = find_program("mariadbd", "mysqld")
        user = ["--user=root"] if os.geteuid() == 0 else []
        subprocess.run(
            [
                install,
                "--no-defaults",
                f"--datadir={data}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                *user,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        port = _free_port()
        log = directory / "error.log"
        command = [
            server,
            "--no-defaults",
            f"--datadir={data}",
            f"--socket={directory / 'mysqld.sock'}",
            f"--pid-file={directory / 'mysqld.pid'}",
            f"--log-error={log}",
            f"--port={port}",
            "--bind-address=127.0.0.1",
            "--skip-name-resolve",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_general_ci",
            "--innodb-buffer-pool-size=128M",
            "--max-connections=500",
            # MySQL 8's default (MariaDB's is 16 MiB): rows of tens of MiB round-trip
            "--max-allowed-packet=64M",
            *user,
            *extra_options,
        ]
        running = cls(directory, port, _launch(command), command)
        running._wait_until_up(log)
        return running

    def kill(self) -> None:
        """SIGKILL the server (a crash: nothing flushed, no clean shutdown)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def restart(self) -> None:
        """Start the server again on its data directory and port (after :meth:`kill`)."""
        self.process = _launch(self.command)
        self._wait_until_up(self.directory / "error.log")

    def _wait_until_up(self, log: Path) -> None:
        deadline = time.monotonic() + _START_WITHIN
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1.0),
            ):
                return
            time.sleep(0.05)
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
        self.stop()
        raise RuntimeError(f"mariadbd did not start on port {self.port}:\n{tail}")

    def freeze(self) -> None:
        """SIGSTOP the server (a hung database); :meth:`thaw` resumes it."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        """End the server (SIGTERM, then SIGKILL) and remove its directory."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGCONT)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        shutil.rmtree(self.directory, ignore_errors=True)


def _launch(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a ^C of the test run is the suite's to handle
    )
