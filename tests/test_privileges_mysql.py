"""The MySQL/MariaDB privileges the documentation gives are enough, and no more than needed.

The ``sql`` blocks of ``docs/_sections/databases.md`` (users and the migrator's grant, the
grants after ``upgrade``, a projection's read model) run as written on the suite's MariaDB,
with the users and the database renamed for this test; then each job runs as its user: the
migrator migrates, the application writes, reads, imports and runs a projection into its read
model, the reader runs the read-only commands, and each is refused what it was not granted.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from casty import PersistedEvent, Snapshot, SqliteJournal
from sqlalchemy import URL, text
from sqlalchemy.ext.asyncio import AsyncSession

from casty_sa import EventEnvelope, Projection, ProjectionFailed, SAJournal
from casty_sa.cli import ExitCode, main

from support.retention import maintainer_deletes

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "_sections" / "databases.md"
PASSWORD = "change-me"  # the documented one

pytestmark = pytest.mark.timeout(240)


def _blocks() -> list[str]:
    return re.findall(r"^```sql\n(.*?)^```", DOC.read_text(), re.S | re.M)


def _statements(block: str) -> list[str]:
    """The statements of a documented SQL block, without their ``--`` comments."""
    return [s.strip() for s in re.sub(r"--[^\n]*", "", block).split(";") if s.strip()]


async def _admin(server: URL, *statements: str) -> None:
    """Run statements as the server's administrator, each committed on its own."""
    import asyncmy  # type: ignore[import-untyped,unused-ignore]

    conn = await asyncmy.connect(
        host=server.host,
        port=server.port or 3306,
        user=server.username,
        password=server.password or "",
        autocommit=True,
    )
    try:
        async with conn.cursor() as cursor:
            for statement in statements:
                await cursor.execute(statement)
    finally:
        conn.close()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class Names:
    """The documented users and database, renamed so parallel tests never share them."""

    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.database = f"casty_priv_{suffix}"
        jobs = ("migrator", "app", "reader", "maintainer")
        self.users = {job: f"casty_{job}_{suffix}" for job in jobs}

    def sql(self, block: str) -> list[str]:
        jobs = r"\bcasty_(migrator|app|reader|maintainer)\b"
        renamed = re.sub(jobs, lambda m: self.users[m[1]], block)
        return _statements(re.sub(r"\bapp\.", f"{self.database}.", renamed))

    def url(self, server: URL, job: str) -> str:
        return (
            server.set(drivername="mysql", username=self.users[job], password=PASSWORD)
            .set(database=self.database)
            .render_as_string(hide_password=False)
        )


@pytest.fixture
def names(mysql_server_url: URL) -> Iterator[Names]:
    made = Names()
    asyncio.run(_admin(mysql_server_url, f"CREATE DATABASE `{made.database}`"))
    try:
        yield made
    finally:
        users = ", ".join(f"'{user}'@'%'" for user in made.users.values())
        asyncio.run(
            _admin(
                mysql_server_url,
                f"DROP USER IF EXISTS {users}",
                f"DROP DATABASE IF EXISTS `{made.database}`",
            )
        )


def _casty_file(path: Path, entity: str) -> Path:
    """A journal file of casty's own SqliteJournal, one event of ``entity`` in it."""
    journal = SqliteJournal(path)
    try:
        asyncio.run(journal.persist(entity, [PersistedEvent(1, ("ev", 1), 1.5)]))
    finally:
        journal.close()
    return path


async def _journal_round_trip(url: str) -> None:
    async with asyncio.timeout(60), SAJournal(url) as journal:
        await journal.persist("acct-9", [PersistedEvent(1, "opened", 1.0)])
        await journal.save_snapshot("acct-9", Snapshot(1, "open", 1.0))
        await journal.save_snapshot("acct-9", Snapshot(1, "open again", 2.0))
        assert [e.event for e in await journal.load("acct-9")] == ["opened"]
        snapshot = await journal.load_snapshot("acct-9")
        assert snapshot is not None and snapshot.state == "open again"
        (first,) = [envelope async for envelope in journal.events()]
        assert [e async for e in journal.entity_ids()] == ["acct-9"]

        async def next_live() -> object:
            async for envelope in journal.events(after=first.offset, live=True):
                return envelope.event
            raise AssertionError("the live reader ended")

        reader = asyncio.create_task(next_live())
        await journal.persist("acct-9", [PersistedEvent(2, "deposited", 2.0)])
        assert await reader == "deposited"


async def _projection_round_trip(url: str) -> None:
    """A projection into the documented read model: fails once (stored), catches up, resets."""
    broken = [True]

    async def handler(session: AsyncSession, envelope: EventEnvelope) -> None:
        if broken[0]:
            raise ValueError("read model down")
        await session.execute(
            text(
                "INSERT INTO balances (entity_id, events) VALUES (:e, 1) "
                "ON DUPLICATE KEY UPDATE events = events + 1"
            ),
            {"e": envelope.entity_id},
        )

    async def clear(session: AsyncSession) -> None:
        await session.execute(text("DELETE FROM balances"))

    async with asyncio.timeout(60), SAJournal(url) as journal:
        total = len([e async for e in journal.events()])
        projection = Projection("balances", journal, handler, on_error="stop")
        with pytest.raises(ProjectionFailed):
            await projection.catch_up()
        assert (await projection.status()).last_error is not None
        broken[0] = False
        assert await projection.catch_up() == total
        await projection.reset(clear)
        assert await projection.offset() is None


def test_the_documented_grants_are_enough_and_needed(
    names: Names, mysql_server_url: URL, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before_upgrade, after_upgrade, read_model = _blocks()
    asyncio.run(_admin(mysql_server_url, *names.sql(before_upgrade)))
    code, _, err = run(capsys, "upgrade", "--url", names.url(mysql_server_url, "migrator"))
    assert code == ExitCode.OK, err
    asyncio.run(_admin(mysql_server_url, *names.sql(after_upgrade)))
    app = names.url(mysql_server_url, "app")
    reader = names.url(mysql_server_url, "reader")

    asyncio.run(_journal_round_trip(app))
    code, _, err = run(
        capsys, "import", "--from", str(_casty_file(tmp_path / "c.db", "imported")), "--url", app
    )
    assert code == ExitCode.OK, err
    # the read model: the application's table, made by the application's migrations
    asyncio.run(
        _admin(
            mysql_server_url,
            f"CREATE TABLE `{names.database}`.balances "
            "(entity_id VARCHAR(512) PRIMARY KEY, events INT NOT NULL)",
            *names.sql(read_model),
        )
    )
    asyncio.run(_projection_round_trip(app))
    code, _, err = run(capsys, "projections", "reset", "balances", "--yes", "--url", app)
    assert code == ExitCode.OK, err

    for argv in (
        ["inspect"],
        ["events"],
        ["projections"],
        ["check"],
        ["current"],
        ["export", "--to", str(tmp_path / "out.db")],
    ):
        code, _, err = run(capsys, *argv, "--url", reader)
        assert code == ExitCode.OK, (argv, err)

    # and no more: the reader cannot write, the application cannot drop the tables
    code, _, err = run(
        capsys,
        "import",
        "--from",
        str(_casty_file(tmp_path / "d.db", "not-imported")),
        "--url",
        reader,
    )
    assert code == ExitCode.DATABASE_ERROR and "UPDATE command denied" in err, err
    code, _, err = run(capsys, "projections", "reset", "balances", "--yes", "--url", reader)
    assert code == ExitCode.DATABASE_ERROR and "DELETE command denied" in err, err
    code, _, err = run(capsys, "downgrade", "--yes", "--url", app)
    assert code == ExitCode.DATABASE_ERROR and "DROP command denied" in err, err
    # deleting is the maintainer's alone
    asyncio.run(maintainer_deletes(app, names.url(mysql_server_url, "maintainer")))
    code, _, err = run(
        capsys, "downgrade", "--yes", "--url", names.url(mysql_server_url, "migrator")
    )
    assert code == ExitCode.OK, err
