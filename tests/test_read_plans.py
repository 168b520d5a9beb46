"""Every statement of the read side, and the writers' place-taking, goes through an index.

On a SQLite file and on PostgreSQL, a table of 200,000 events over 2,000 entities
(one in ten stored as before migration ``0002``) plus journal writes, analyzed;
then ``tools/read_plans.py`` runs the read side's calls through the backend,
recording the SQL and values it sends, and explains each: the event page in every
filter variant from the start, the middle and the end of the global order, the
entity id walks, ``highest_sequence_nr`` and the ``INSERT`` that takes the era
(PostgreSQL) or the next position (SQLite). PostgreSQL's generic plans (the
ones asyncpg's prepared statements switch to) are checked too. SQLite's plan text
does not show how far a seek steps before its first row, so its statements are
also run, counting the instructions they take.
"""

from __future__ import annotations

import pytest
from sqlalchemy import URL

from support import tools

#: a page of events (or of entity ids) costs SQLite about 40 instructions a row
STEPS_PER_ROW = 60

plans_tool = tools.load("read_plans")


@pytest.mark.only_backends(
    "sqlite", "postgresql"
)  # MySQL: tools/read_plans.py has no EXPLAIN of it yet
async def test_every_statement_uses_its_index(db_url: URL, backend: str) -> None:
    await plans_tool.fill(db_url, 200_000)
    plans = await plans_tool.read_plans(db_url)

    names = {plan.statement.name.split(" (")[0] for plan in plans}
    pages = {name for name in names if name.startswith("event page")}
    assert len(pages) == 12, pages  # 4 filter variants x start, middle, end
    expected = {
        "entity ids, from the start",
        "entity ids, from the middle",
        "entity ids with a prefix",
        "highest sequence nr",
        "highest sequence nr, unknown id",
        "insert",
    }
    if backend == "postgresql":
        assert sum(plan.generic for plan in plans) == len(plans) // 2
    assert expected <= names, names - expected

    for plan in plans:
        assert not plans_tool.full_scans(plan), (plan.title, plan.lines)
        index = plan.statement.index
        assert index is not None and plans_tool.uses_index(plan, index), (plan.title, plan.lines)
        filtered = plan.statement.name.startswith("event page") and "no filter" not in plan.title
        if plan.steps is not None and not filtered:
            # bounded by the page, whatever lies before it (a filter walks the global order
            # until its page is full: that is its cost, see docs/reading-events.md)
            assert plan.steps <= STEPS_PER_ROW * plans_tool.PAGE, (plan.title, plan.steps)
