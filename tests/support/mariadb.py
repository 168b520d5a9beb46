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
#: Ports tried before giving up (another process may bind a free port before the server)
_START_ATTEMPTS = 5


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
        # a temporary directory of its own: a starting server clears its tmpdir of the
        # '#sql…' files other servers sharing it are working on
        tmp = directory / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        installed = subprocess.run(
            [
                install,
                "--no-defaults",
                f"--datadir={data}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                f"--tmpdir={tmp}",
                *user,
            ],
            capture_output=True,
            timeout=120,
        )
        if installed.returncode != 0:
            said = (installed.stdout + installed.stderr).decode(errors="replace")[-2000:]
            raise RuntimeError(f"{install} failed ({installed.returncode}):\n{said}")
        log = directory / "error.log"
        for _ in range(_START_ATTEMPTS - 1):
            port = _free_port()
            command = [*cls._command(server, data, directory, port, user), *extra_options]
            logged = log.stat().st_size if log.exists() else 0
            running = cls(directory, port, _launch(command), command)
            with contextlib.suppress(_PortTaken):
                running._wait_until_up(log, logged)
                return running
        port = _free_port()  # the last attempt: its failure is the caller's
        command = [*cls._command(server, data, directory, port, user), *extra_options]
        running = cls(directory, port, _launch(command), command)
        running._wait_until_up(log, log.stat().st_size if log.exists() else 0)
        return running

    @staticmethod
    def _command(server: str, data: Path, directory: Path, port: int, user: list[str]) -> list[str]:
        log = directory / "error.log"
        return [
            server,
            "--no-defaults",
            f"--datadir={data}",
            f"--socket={directory / 'mysqld.sock'}",
            f"--pid-file={directory / 'mysqld.pid'}",
            f"--tmpdir={directory / 'tmp'}",
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
        ]

    def kill(self) -> None:
        """SIGKILL the server (a crash: nothing flushed, no clean shutdown)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def restart(self) -> None:
        """Start the server again on its data directory and port (after :meth:`kill`)."""
        log = self.directory / "error.log"
        logged = log.stat().st_size if log.exists() else 0
        self.process = _launch(self.command)
        self._wait_until_up(log, logged)

    def _wait_until_up(self, log: Path, logged: int) -> None:
        """Until this server (its own log, after byte ``logged``: a TCP connection could
        reach another test process's server on a port taken meanwhile) is ready."""
        deadline = time.monotonic() + _START_WITHIN
        said = ""
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), log.open("rb") as lines:
                lines.seek(logged)
                said = lines.read().decode(errors="replace")
            if "ready for connections" in said and self.process.poll() is None:
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop(remove=False)
        if "Address already in use" in said:
            raise _PortTaken(self.port)
        shutil.rmtree(self.directory, ignore_errors=True)
        raise RuntimeError(f"mariadbd did not start on port {self.port}:\n{said[-2000:]}")

    def freeze(self) -> None:
        """SIGSTOP the server (a hung database); :meth:`thaw` resumes it."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self, *, remove: bool = True) -> None:
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
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)


class _PortTaken(RuntimeError):
    """Another process bound the port between its choice and the server's start."""


def _launch(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a ^C of the test run is the suite's to handle
    )
