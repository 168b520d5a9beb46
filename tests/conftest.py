"""Shared fixtures: real SQLite files, a real PostgreSQL server and a real MariaDB server.

PostgreSQL comes from ``CASTY_SA_TEST_POSTGRES_URL`` when set, otherwise the
suite starts its own server with the ``pgserver`` wheel; MySQL from
``CASTY_SA_TEST_MYSQL_URL``, otherwise the suite starts Debian's ``mariadbd``
on a private data directory (:mod:`support.mariadb`). Neither is ever skipped:
a server that cannot start fails the run.

Every test that takes ``db_url`` (or ``journal``, ``backend``…) runs once per
setup of :data:`DEFAULT_SETUPS`: ``[sqlite]`` (a file), ``[postgresql]``
(asyncpg), ``[psycopg]`` (PostgreSQL through psycopg 3) and ``[mariadb]``
(through asyncmy). The protocol and semantics suites (``pytestmark =
pytest.mark.matrix``) run on every :data:`MATRIX` setup instead: SQLite file,
SQLite memory, an application's engine, each server database and driver, each
with group commit on (``-gc``) and off (``-direct``). Each test gets a fresh
database (a SQLite file in its tmp dir, a private memory database, a
PostgreSQL database cloned from a template migrated to head, or a MySQL
database whose tables are copied from one), and every journal
made through ``make_journal`` or ``new_journal`` is checked, after the test, to
have no connection left checked out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import signal
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import casty_sa
from casty_sa import SAJournal

from support import dbtools, mariadb, pools

os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="casty-sa-xdg-"))  # for pgserver

collect_ignore = ["app_fixture"]  # an Alembic script folder, imported only by Alembic

#: Seconds a test that timed out (pyproject's ``timeout``) has to end once failed, before
#: the run stops.
_TIMEOUT_GRACE = 60.0


def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """pytest-timeout's ``signal`` method, telling what an event loop waits for.

    A hung event loop sits idle in ``select()``: the threads' stacks show only that, so
    the stacks of its pending tasks are printed too. A test whose failure does not end
    it (the failure raised inside a task instead of the loop) stops the run after
    :data:`_TIMEOUT_GRACE` seconds, with the stacks again.
    """
    import pytest_timeout  # type: ignore[import-untyped]

    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None  # pytest-timeout's own timer

    def stop_the_run(_signum: int, _frame: Any) -> None:
        _print_pending_tasks(item)
        pytest_timeout.timeout_timer(item, settings)  # every stack, then os._exit(1)

    def fail_the_test(_signum: int, _frame: Any) -> None:
        __tracebackhide__ = True
        _print_pending_tasks(item)
        signal.signal(signal.SIGALRM, stop_the_run)
        signal.setitimer(signal.ITIMER_REAL, _TIMEOUT_GRACE)
        pytest_timeout.timeout_sigalrm(item, settings)  # every thread's stack, then fail

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # pytest-timeout's cancel hook
    signal.signal(signal.SIGALRM, fail_the_test)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True


def _print_pending_tasks(item: pytest.Item) -> None:
    """The await chain of each unfinished task of the running event loop, on the terminal
    (``Task.print_stack`` shows a suspended task's outermost coroutine only)."""
    loop = asyncio._get_running_loop()  # the loop the signal interrupted, if any
    if loop is None:
        return
    tasks = asyncio.all_tasks(loop)
    terminal = item.config.get_terminal_writer()
    terminal.sep("+", title=f"Timeout: {len(tasks)} pending asyncio task(s)")
    for task in tasks:
        terminal.line(repr(task))
        awaited: Any = task.get_coro()
        while awaited is not None:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is None:  # a future, or a coroutine of C code: the end of the chain
                terminal.line(f"  awaiting {awaited!r}")
                break
            code = frame.f_code
            terminal.line(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}')
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)


#: The migrated database each test's is cloned from: one per pytest-xdist worker, which may
#: share a server given by the environment.
_TEMPLATE = f"casty_sa_template_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
_counter = itertools.count()


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[URL]:
    """An admin URL (``postgresql+asyncpg://…/postgres``) of a running server."""
    given = os.environ.get("CASTY_SA_TEST_POSTGRES_URL")
    if given:
        yield casty_sa.urls.to_async_url(given)
        return
    import pgserver  # type: ignore[attr-defined,unused-ignore]

    data = Path(tempfile.mkdtemp(prefix="casty-sa-pg-"))
    server = pgserver.get_server(data, cleanup_mode="delete")  # type: ignore[attr-defined]
    try:
        yield casty_sa.urls.to_async_url(server.get_uri())
    finally:
        server.cleanup()


async def admin_execute(server: URL, *statements: str) -> None:
    """Run statements on the server's admin database (outside any transaction)."""
    conn = await asyncpg.connect(**dbtools.asyncpg_args(server))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_template(postgres_server_url: URL) -> str:
    """A database migrated to head, cloned for each test."""

    async def make() -> None:
        await admin_execute(postgres_server_url, f'DROP DATABASE IF EXISTS "{_TEMPLATE}"')
        await admin_execute(postgres_server_url, f'CREATE DATABASE "{_TEMPLATE}"')
        await casty_sa.upgrade(postgres_server_url.set(database=_TEMPLATE))

    _run_outside_loop(make())
    return _TEMPLATE


@pytest.fixture
def new_postgres_db(
    postgres_server_url: URL, postgres_template: str
) -> Iterator[Callable[..., Awaitable[URL]]]:
    """Factory of fresh databases: ``await new_postgres_db(migrated=True)``.

    A sync fixture (its clean-up runs outside the loop): an async fixture's
    ``request.getfixturevalue`` may ask for it inside the test's running loop."""
    made: list[str] = []

    async def create(*, migrated: bool = True) -> URL:
        name = f"t_{os.getpid()}_{next(_counter)}"
        template = postgres_template if migrated else "template0"
        await admin_execute(postgres_server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        made.append(name)
        return postgres_server_url.set(database=name)

    yield create

    async def drop() -> None:
        for name in made:
            await admin_execute(
                postgres_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
            )

    _run_outside_loop(drop())


@pytest.fixture(scope="session")
def mysql_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[URL]:
    """An admin URL (``mysql+asyncmy://root@…/``, no database) of a running MariaDB (or
    MySQL): ``CASTY_SA_TEST_MYSQL_URL`` when set, else a private server the suite starts."""
    given = os.environ.get("CASTY_SA_TEST_MYSQL_URL")
    if given:
        yield casty_sa.urls.to_async_url(given).set(database=None)
        return
    server = mariadb.MariaDBServer.start(Path(tempfile.mkdtemp(prefix="casty-sa-mariadb-")))
    try:
        yield server.url
    finally:
        server.stop()


async def mysql_admin_execute(server: URL, *statements: str) -> list[Any]:
    """Run statements on a MySQL server without a database; the last one's rows."""
    return await dbtools.mysql_execute(server.set(database=None), *statements)


@pytest.fixture(scope="session")
def mysql_template(mysql_server_url: URL) -> str:
    """A database migrated to head, copied table by table for each test (MySQL has no
    template databases)."""

    async def make() -> None:
        await mysql_admin_execute(
            mysql_server_url,
            f"DROP DATABASE IF EXISTS `{_TEMPLATE}`",
            f"CREATE DATABASE `{_TEMPLATE}` CHARACTER SET utf8mb4",
        )
        await casty_sa.upgrade(mysql_server_url.set(database=_TEMPLATE))

    _run_outside_loop(make())
    return _TEMPLATE


def _run_outside_loop(work: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run(work)`` in a thread of its own: a session fixture first requested by an
    async fixture's ``request.getfixturevalue`` is set up inside the test's running loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, work).result()


@pytest.fixture
def new_mysql_db(
    mysql_server_url: URL, mysql_template: str
) -> Iterator[Callable[..., Awaitable[URL]]]:
    """Factory of fresh MySQL databases: ``await new_mysql_db(migrated=True)`` (a sync
    fixture, as :func:`new_postgres_db`)."""
    made: list[str] = []

    async def create(*, migrated: bool = True) -> URL:
        name = f"t_{os.getpid()}_{next(_counter)}"
        made.append(name)
        statements = [f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"]
        if migrated:
            tables = await mysql_admin_execute(
                mysql_server_url,
                "SELECT table_name FROM information_schema.tables "
                f"WHERE table_schema = '{mysql_template}' ORDER BY table_name",
            )
            for (table,) in tables:
                statements += [
                    f"CREATE TABLE `{name}`.`{table}` LIKE `{mysql_template}`.`{table}`",
                    f"INSERT INTO `{name}`.`{table}` SELECT * FROM `{mysql_template}`.`{table}`",
                ]
        await mysql_admin_execute(mysql_server_url, *statements)
        return mysql_server_url.set(database=name)

    yield create

    async def drop() -> None:
        for name in made:
            await mysql_admin_execute(mysql_server_url, f"DROP DATABASE IF EXISTS `{name}`")

    _run_outside_loop(drop())


@dataclass(frozen=True)
class Setup:
    """One way to run a journal: its database, who owns its engine, group commit on or off."""

    #: "sqlite-file", "sqlite-memory", "postgresql" (asyncpg), "postgresql-psycopg" or
    #: "mysql" (MariaDB through asyncmy)
    database: str
    #: the test creates the ``AsyncEngine``, gives it to ``SAJournal`` and disposes it
    app_engine: bool = False
    group_commit: bool = True
    name: str = ""  # the test id, when not the one the fields spell

    @property
    def backend(self) -> str:
        """The dialect: ``sqlite``, ``postgresql`` or ``mysql``."""
        return self.database.partition("-")[0]

    @property
    def driver(self) -> str:
        """The async driver: ``aiosqlite``, ``asyncpg``, ``psycopg`` or ``asyncmy``."""
        return {
            "sqlite": "aiosqlite",
            "postgresql": "asyncpg",
            "postgresql-psycopg": "psycopg",
            "mysql": "asyncmy",
        }[self.database.removesuffix("-file").removesuffix("-memory")]

    @property
    def shared(self) -> bool:
        """Whether a second journal, or a new one, reaches the same database: not in memory,
        where the database lives and dies with its journal's one connection."""
        return self.database != "sqlite-memory"

    @property
    def id(self) -> str:
        engine = ["app-engine"] if self.app_engine else []
        commits = "gc" if self.group_commit else "direct"
        database = {"postgresql-psycopg": "psycopg", "mysql": "mariadb"}.get(
            self.database, self.database
        )
        return self.name or "-".join([database, *engine, commits])


#: every test on a database runs on these, with their ids since before the matrix
DEFAULT_SETUPS = (
    Setup("sqlite-file", name="sqlite"),
    Setup("postgresql", name="postgresql"),
    Setup("postgresql-psycopg", name="psycopg"),
    Setup("mysql", name="mariadb"),
)
#: the suites marked ``matrix`` run on all of these
MATRIX = tuple(
    Setup(database, app_engine, group_commit)
    for database, app_engine in [
        ("sqlite-file", False),
        ("sqlite-memory", False),
        ("sqlite-file", True),
        ("postgresql", False),
        ("postgresql", True),
        ("postgresql-psycopg", False),
        ("postgresql-psycopg", True),
        ("mysql", False),
        ("mysql", True),
    ]
    for group_commit in (True, False)
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each test on a database runs once per setup: :data:`MATRIX` for the suites marked
    ``matrix``, :data:`DEFAULT_SETUPS` otherwise; a test marked ``shared_database`` leaves
    out the setups whose database no second journal can reach, and one marked
    ``only_backends("postgresql")`` runs on those backends alone (what it tests exists
    nowhere else), and one marked ``only_drivers("asyncpg")`` on those drivers alone (what
    it tests is the server's, the same whatever the driver)."""
    if "journal_setup" not in metafunc.fixturenames:
        return
    matrix = metafunc.definition.get_closest_marker("matrix") is not None
    only = metafunc.definition.get_closest_marker("only_backends")
    drivers = metafunc.definition.get_closest_marker("only_drivers")
    setups = [
        setup
        for setup in (MATRIX if matrix else DEFAULT_SETUPS)
        if setup.shared or metafunc.definition.get_closest_marker("shared_database") is None
        if only is None or setup.backend in only.args
        if drivers is None or setup.driver in drivers.args
    ]
    metafunc.parametrize("journal_setup", setups, ids=[s.id for s in setups], indirect=True)


@pytest.fixture
def journal_setup(request: pytest.FixtureRequest) -> Setup:
    """The setup the test runs on (see :func:`pytest_generate_tests`)."""
    setup: Setup = request.param
    return setup


@pytest.fixture
def backend(journal_setup: Setup) -> str:
    """``"sqlite"``, ``"postgresql"`` or ``"mysql"``: the test's dialect (the driver is
    :attr:`Setup.driver`)."""
    return journal_setup.backend


@pytest.fixture
def new_server_db(
    journal_setup: Setup, request: pytest.FixtureRequest
) -> Callable[..., Awaitable[URL]]:
    """Factory of fresh databases on the test's server (PostgreSQL or MySQL), with the
    setup's driver: ``await new_server_db(migrated=True)``.

    A plain fixture, so the server's (async) fixtures are set up outside any running loop
    (pytest-asyncio cannot set one up from inside another async fixture); on SQLite it
    starts no server, and its factory refuses."""
    if journal_setup.backend == "sqlite":

        async def no_server(*, migrated: bool = True) -> URL:
            raise RuntimeError(f"{journal_setup.id} has no database server")

        return no_server
    if journal_setup.backend == "mysql":
        new_mysql: Callable[..., Awaitable[URL]] = request.getfixturevalue("new_mysql_db")
        return new_mysql
    new_postgres: Callable[..., Awaitable[URL]] = request.getfixturevalue("new_postgres_db")
    if journal_setup.driver == "asyncpg":
        return new_postgres

    async def create(*, migrated: bool = True) -> URL:
        url = await new_postgres(migrated=migrated)
        return url.set(drivername=f"postgresql+{journal_setup.driver}")

    return create


@pytest.fixture
async def db_url(
    journal_setup: Setup, tmp_path: Path, new_server_db: Callable[..., Awaitable[URL]]
) -> URL:
    """A fresh database at head on the test's backend (in memory: a private one, that a
    journal migrates when it starts)."""
    if journal_setup.database == "sqlite-memory":
        return make_url("sqlite+aiosqlite://")
    if journal_setup.database == "sqlite-file":
        url = make_url(f"sqlite+aiosqlite:///{tmp_path / 'journal.db'}")
        await casty_sa.upgrade(url)
        return url
    return await new_server_db(migrated=True)


@pytest.fixture
async def empty_db_url(
    backend: str, tmp_path: Path, new_server_db: Callable[..., Awaitable[URL]]
) -> URL:
    """A fresh database without casty-sa's tables on the test's backend."""
    if backend == "sqlite":
        return make_url(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    return await new_server_db(migrated=False)


@pytest.fixture
async def journal_target(journal_setup: Setup, db_url: URL) -> AsyncIterator[URL | AsyncEngine]:
    """What the setup's journals are opened on: the database's URL, or an engine of the
    test's own (the application's), disposed by the test after its journals closed."""
    if not journal_setup.app_engine:
        yield db_url
        return
    engine = create_async_engine(db_url)
    pools.watch(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


class _Journals:
    """The journals a fixture opened; each is closed after the test, with no connection leaked."""

    def __init__(self) -> None:
        self.opened: list[SAJournal] = []

    def open(self, target: Any, **options: Any) -> SAJournal:
        journal = SAJournal(target, **options)
        pools.watch(journal.engine)
        self.opened.append(journal)
        return journal

    async def close_checked(self) -> None:
        for journal in self.opened:
            checked_out = await _settled_checkouts(journal)
            await journal.close()
            assert checked_out == 0, f"{journal!r} left {checked_out} connection(s) checked out"


@pytest.fixture
async def new_journal(
    journal_setup: Setup, journal_target: URL | AsyncEngine
) -> AsyncIterator[Callable[..., SAJournal]]:
    """Factory of journals on the test's database, as its setup says (``**options`` go to
    ``SAJournal``); each is closed after the test (before an application's engine is
    disposed), with no connection leaked."""
    journals = _Journals()

    def make(**options: Any) -> SAJournal:
        options.setdefault("group_commit", journal_setup.group_commit)
        return journals.open(journal_target, **options)

    yield make
    await journals.close_checked()


@pytest.fixture
async def make_journal() -> AsyncIterator[Callable[..., SAJournal]]:
    """Factory of journals on any URL or engine; each is closed after the test, with no
    connection leaked."""
    journals = _Journals()
    yield journals.open
    await journals.close_checked()


async def _settled_checkouts(journal: SAJournal, within: float = 5.0) -> int:
    """Connections still checked out once work a cancelled caller left running has ended."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        checked_out = pools.checked_out(journal.engine)
        if checked_out == 0 or asyncio.get_running_loop().time() > deadline:
            return checked_out
        await asyncio.sleep(0.02)


@pytest.fixture
async def journal(new_journal: Callable[..., SAJournal]) -> SAJournal:
    """A started journal on a fresh database of the test's setup."""
    j = new_journal()
    await j.start()
    return j
