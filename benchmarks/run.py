#!/usr/bin/env python3
"""Side-by-side benchmark of casty event journals.

Runs the same workloads over several journals in one process and prints a
Markdown table of absolute figures and ratios:

``sa-sqlite``
    ``casty_sa.SAJournal`` on a SQLite file (WAL, ``synchronous=FULL``).
``sa-postgresql``
    ``casty_sa.SAJournal`` on PostgreSQL (asyncpg: ``postgresql://``).
``sa-pg-psycopg``
    ``casty_sa.SAJournal`` on the same PostgreSQL through psycopg 3
    (``postgresql+psycopg://``).
``sa-mariadb``
    ``casty_sa.SAJournal`` on MariaDB through asyncmy (``mysql+asyncmy://``).
``casty-memory``
    casty's ``InMemoryJournal`` (no I/O: the ceiling of the protocol).
``casty-sqlite``
    casty's ``SqliteJournal`` on a SQLite file (WAL, sqlite3's default
    ``synchronous``, reported in the output).
``raw-aiosqlite``
    The physical reference on SQLite: one aiosqlite connection, same pragmas
    as ``sa-sqlite``, one durable commit per ``persist``.
``raw-asyncpg``
    The physical reference on PostgreSQL: an asyncpg pool with its defaults
    (10 connections), one transaction per ``persist``.
``raw-asyncmy``
    The physical reference on MariaDB: an asyncmy pool of 10 connections in
    autocommit, one ``INSERT`` per ``persist``.

Every journal stores pickled events in the same tables (the raw baselines use
casty-sa's schema). Write workloads get a fresh store (file or database) for
every repetition; read workloads write their data once per journal, untimed,
and repeat the reads. Every result is checked: a wrong answer is reported as
``wrong`` with its error, never as a number.

PostgreSQL comes from ``CASTY_SA_BENCH_POSTGRES_URL`` (an admin URL allowed to
create databases) when set; otherwise a throwaway server is started from the
``pgserver`` wheel in a temporary directory and removed afterwards. MariaDB
likewise comes from ``CASTY_SA_BENCH_MYSQL_URL`` (e.g.
``mysql://root@127.0.0.1:3306/``), or a throwaway ``mariadbd`` (Debian's
``mariadb-server``, as the test suite starts it).

Examples
--------
``python benchmarks/run.py`` (everything, about 3 minutes on 2 cores),
``python benchmarks/run.py --quick`` (smoke run),
``python benchmarks/run.py --journals sa-sqlite,casty-sqlite --workloads W1,W2``,
``python benchmarks/run.py --journals sa-sqlite,sa-postgresql --workloads R1,P1,P2``
(the read side and the projections),
``python benchmarks/run.py --journals sa-postgresql,sa-pg-psycopg,raw-asyncpg --workloads W2``
(psycopg against asyncpg),
``python benchmarks/run.py --rss-scan 200,2000 --journals sa-sqlite,sa-postgresql``,
``python benchmarks/run.py --journals sa-sqlite,sa-postgresql --workloads G --grown 10000000``
(issue 15's grown table: W1, W2, W4 tail and W5 on 10 million stored events and on an
empty table beside it; opt-in).

This file is the entry point; the harness is the ``benchmarks`` package beside
it (its docstring lists the modules).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    # As a script, benchmarks/ itself comes first on sys.path, where the package's modules would
    # pass for top-level ones (and shadow any of the same name); its parent makes it the package.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
