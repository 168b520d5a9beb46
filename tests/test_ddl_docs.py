"""The DDL the documentation shows is what ``casty-sa upgrade --sql`` prints, on every dialect.

``docs/_sections/ddl.md`` is written by ``tools/ddl_docs.py`` (the site's ``ddl.md`` page
includes it, ``tools/sync_readme.py`` copies it into the README). These tests run the
command itself, in a subprocess as a DBA would, and compare.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from casty_sa.dialects import dialects
from casty_sa.urls import dialect_of, to_async_url

from support import tools

ddl_docs = tools.load("ddl_docs")
TARGETS = {target.heading: target for target in ddl_docs.TARGETS}


def _printed(url: str) -> str:
    """What ``casty-sa upgrade --sql --url URL`` prints, as the page shows it."""
    run = subprocess.run(
        [sys.executable, "-m", "casty_sa.cli", "upgrade", "--sql", "--url", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    normalized: str = ddl_docs.normalize(run.stdout)
    return normalized


def _shown() -> dict[str, str]:
    """Each dialect's DDL as the section shows it, by heading."""
    text = ddl_docs.SECTION.read_text()
    found = re.findall(r"^### (.+?)\n.*?^```sql\n(.*?)^```", text, re.S | re.M)
    return dict(found)


@pytest.mark.parametrize("heading", sorted(TARGETS))
def test_the_page_shows_what_the_command_prints(heading: str) -> None:
    shown = _shown()
    assert heading in shown, f"no DDL for {heading}: run python tools/ddl_docs.py"
    assert shown[heading] == _printed(TARGETS[heading].url), (
        f"the DDL shown for {heading} is stale: run python tools/ddl_docs.py"
    )
    assert "CREATE TABLE casty_sa_events" in shown[heading]


def test_the_section_is_current_as_a_whole() -> None:
    """Nothing but the generated text: the tool's output, byte for byte."""
    assert ddl_docs.render() == ddl_docs.SECTION.read_text(), "run python tools/ddl_docs.py"


def test_every_dialect_has_its_ddl_shown() -> None:
    """A dialect added to casty-sa must appear on the page too."""
    shown = {dialect_of(to_async_url(t.url)).name for t in ddl_docs.TARGETS}
    assert shown == {dialect.name for dialect in dialects()}


@pytest.mark.parametrize(
    ("heading", "url"),
    [
        ("PostgreSQL", "postgresql+psycopg://"),
        ("MySQL 8", "mysql+aiomysql://"),
        ("MariaDB", "mariadb+aiomysql://"),
    ],
)
def test_the_ddl_does_not_depend_on_the_driver(heading: str, url: str) -> None:
    """The page shows one script per database, whichever driver the URL names."""
    assert _printed(url) == _shown()[heading]


def test_mysql_and_mariadb_differ_as_the_page_says() -> None:
    """MySQL 8's binary no-pad collation offline, MariaDB's for mariadb://; LONGBLOB both."""
    shown = _shown()
    assert "utf8mb4_0900_bin" in shown["MySQL 8"] and "utf8mb4_nopad_bin" not in shown["MySQL 8"]
    assert "utf8mb4_nopad_bin" in shown["MariaDB"] and "utf8mb4_0900_bin" not in shown["MariaDB"]
    for heading in ("MySQL 8", "MariaDB"):
        assert "payload LONGBLOB NOT NULL" in shown[heading]
        assert "BEGIN" not in shown[heading] and "COMMIT" not in shown[heading]
